"""Models, one file per family (configs are dataclasses, save/load with config.json +
model.safetensors):

    encoders.py / builtin_encoder.py   frozen vision encoders -> patch grid (B, h, w, D)
    clustering.py                      the four clustering modes on top of setok_cli.ops
    merger.py                          the cluster merger (packed varlen attention)
    position.py                        2-D sin-cos position embeddings
    setok.py                           SeTok, SeTokConfig, TokenizerOutput, load_tokenizer

Import from the submodules (`from setok_cli.models.setok import load_tokenizer`); this
package imports nothing eagerly so that `import setok_cli.models.x` stays cheap.
"""
