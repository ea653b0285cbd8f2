"""Shared fixtures. Keep this small: per-area fixtures live next to their tests."""
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`): a
    second intra-op thread only adds sync cost (on a loaded 2-core machine a 96 x 32 matmul
    took 300 ms with 2 threads, 2 ms with 1)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def photo_dir():
    """Real photos that ship with scikit-image (chelsea.png, astronaut.png, coffee.png...)."""
    skimage = pytest.importorskip("skimage")
    return os.path.join(os.path.dirname(skimage.__file__), "data")


@pytest.fixture(scope="session")
def chelsea_path(photo_dir):
    return os.path.join(photo_dir, "chelsea.png")


@pytest.fixture(scope="session")
def builtin_tokenizer():
    """The default tokenizer (builtin encoder, untrained deterministic merger), shared."""
    from setok_cli.models.setok import load_tokenizer

    return load_tokenizer().eval()


def _write_tiny_stage1(ck, **setok):
    """A tiny stage-1 checkpoint at `ck`: a SeTok with 8-wide tokens (SeTokConfig overrides in
    `setok`), a tiny detokenizer and a tiny mask decoder (reading the builtin encoder's 16
    feature channels), random weights."""
    from setok_cli.models.detokenizer import Detokenizer, DetokenizerConfig, MapperConfig
    from setok_cli.models.mask_decoder import MaskDecoder, MaskDecoderConfig
    from setok_cli.models.setok import SeTok, SeTokConfig
    cfg = dict(image_size=112, max_tokens=8, merger_dim=16, token_dim=8, merger_depth=1, merger_cross_depth=1)
    SeTok(SeTokConfig(**{**cfg, **setok})).save_pretrained(ck / "setok")
    unet = dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, sample_size=16,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
    Detokenizer(DetokenizerConfig(image_size=16, unet=unet, sample_steps=2, mapper=MapperConfig(
        token_dim=8, hidden_size=16, num_queries=4, intermediate_size=32, output_dim=16))).save_pretrained(
        ck / "detokenizer")
    MaskDecoder(MaskDecoderConfig(token_dim=8, feature_dim=16, embed_dim=8, pixel_channels=8, num_convs=1)
                ).save_pretrained(ck / "mask_decoder")
    return ck


@pytest.fixture(scope="session")
def write_tiny_stage1():
    """The function that writes a tiny stage-1 checkpoint folder (see _write_tiny_stage1)."""
    return _write_tiny_stage1


@pytest.fixture(scope="session")
def stage2_world(tmp_path_factory):
    """A tiny shapes world and a tiny stage-1 run folder (random parts, the tiny recipe's
    tokenizer settings at 112 px so that it is quick)."""
    from setok_cli.data.shapes import generate
    root = tmp_path_factory.mktemp("stage2")
    generate(root / "shapes", n=30, size=32, seed=0)
    _write_tiny_stage1(root / "stage1" / "checkpoints" / "step_00000010", image_policy="squash")
    return root


@pytest.fixture(scope="session")
def place_setokim(stage2_world, tmp_path_factory):
    """A factory of tiny Setokims over the tiny stage-1 run, with a place head over its patch
    grid: place_setokim(words_file, positions=256, **config) -> Setokim (its word tokenizer
    built from words_file; the heads start from seed 0)."""
    def make(words, positions: int = 256, **config):
        import numpy as np
        import torch

        from setok_cli.models.setokim import Setokim, SetokimConfig, build_word_tokenizer
        tok = tmp_path_factory.mktemp("words")
        build_word_tokenizer([words]).save_pretrained(tok)
        lm = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=positions)
        common = dict(text_tokenizer=str(tok), stage1=str(stage2_world / "stage1"))
        probe = Setokim.from_config(SetokimConfig(lm=dict(lm), **common))
        cells = int(np.prod(probe.setok.tokenize([np.zeros((32, 32, 3), np.uint8)]).grid))
        torch.manual_seed(0)
        return Setokim.from_config(SetokimConfig(lm=dict(lm), place_head=cells, **common, **config))
    return make


@pytest.fixture(scope="session")
def benchmark_script():
    """load(name) -> benchmarks/NAME.py as a module (the scripts are not a package)."""
    import importlib.util

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load


@pytest.fixture(scope="session")
def overlap_oracle():
    """oracle(out, i, instance map (H, W), instance id) -> per token of image i of a TokenizerOutput,
    in the tokenizer's order, the object's area over the token's patches, by averaging the
    instance map over each patch's pixel block (the grid divides the image): an independent
    count for the token an object's pixels fall in most."""
    import numpy as np

    def oracle(out, i, inst_map, inst):
        labels = out.image_labels(i).numpy()
        gh, gw = labels.shape
        H, W = inst_map.shape
        block = (np.asarray(inst_map) == inst).reshape(gh, H // gh, gw, W // gw).mean((1, 3))
        return np.array([block[labels == k].sum() for k in range(out.tokens.shape[1])])
    return oracle


TINY_LM_SET = ("model.setokim.lm={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
               "num_key_value_heads: 2, max_position_embeddings: 256}")


@pytest.fixture(scope="session")
def stage3_runs(stage2_world):
    """A tiny stage-2 run (40 steps, the world's words in its tokenizer) and a tiny stage-3
    run on top of it (VQA, multi-turn chat, segmentation, edits; LoRA r 8), both written by
    the trainer with the shipped recipes. -> {"world", "stage2", "stage3", "log3"}."""
    import json
    from pathlib import Path

    from setok_cli.train.recipe import load_recipe
    from setok_cli.train.trainer import Trainer
    recipes = Path(__file__).resolve().parents[1] / "recipes" / "tiny"
    tr = stage2_world / "shapes" / "train"
    common = ["data.image_size=32", "train.progress=false", "train.threads=1", "train.log_every=1"]
    s2 = stage2_world / "runs" / "stage2"
    Trainer(load_recipe(recipes / "stage2.yaml", [
        f"model.setokim.stage1={stage2_world / 'stage1'}", f"output_dir={s2}", TINY_LM_SET,
        f"data.mixture=[{{task: caption, path: {tr / 'pairs.json'}}}, {{task: edit, path: {tr / 'edits.json'}}}]",
        f"data.vocab_files=[{tr / 'instruct.json'}, {tr / 'referring.json'}]", "model.setokim.max_visual_tokens=4",
        "data.batch_size=6", "train.max_steps=40", "train.checkpoint_every=40", "optim.lr=1e-2", "optim.warmup_steps=2",
        *common])).train()
    s3 = stage2_world / "runs" / "stage3"
    Trainer(load_recipe(recipes / "stage3.yaml", [
        f"model.setokim_from={s2}", f"output_dir={s3}", "model.lora={r: 8, alpha: 16, dropout: 0.0, modules_to_save: [embed_tokens, lm_head]}",
        "model.text_first=null",
        f"data.mixture=[{{task: instruct, path: {tr / 'instruct.json'}, weight: 2.0}}, "
        f"{{task: chat, path: {tr / 'instruct.json'}}}, {{task: segment, path: {tr / 'referring.json'}}}, "
        f"{{task: edit, path: {tr / 'edits.json'}, weight: 0.2}}]",
        "data.batch_size=8", "train.max_steps=300", "train.checkpoint_every=150", "optim.lr=5e-3",
        "optim.warmup_steps=3", *common])).train()
    log = [json.loads(x) for x in (s3 / "log.jsonl").read_text().splitlines()]
    return {"world": stage2_world, "stage2": s2, "stage3": s3, "log3": log}
