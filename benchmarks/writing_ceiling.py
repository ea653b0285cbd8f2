"""How well can Setokim write at best? Decode each target image's own SeTok tokens.

    python benchmarks/writing_ceiling.py --model runs/tiny-stage2 --data data/shapes/val \
        [--limit 150] [--decode-steps N] [--detokenizer RUN] [--out benchmarks/results/writing_ceiling.json]

A generated or edited image is the stage-1 detokenizer's picture of the tokens the LM wrote.
An LM that wrote the target image's tokens exactly (in the order Setokim writes them) would
score what this script prints: the target of each caption (`pairs_reading.json`, else
`pairs.json`) and of each edit (`edits.json`) is tokenized, decoded at the model's settings
(its detokenizer's steps, seed 0, 64 px as the tiny recipes' figures), and scored by the same
`setok eval generate|edit` code. The goals of the writing tasks can only be met below these
figures. Predictions go to a temporary folder; the figures to --out.

`--diff` scores edits written as token diffs instead (`setok edit --diff`,
models/setokim/edit_diff.py): the source's tokens without the changed object's true old
token, plus its true new token (the training targets, `edit_diff.diff_tokens`), decoded, and
with `--keep-pixels GROW` the source's pixels pasted back over the copied objects: what an
LM that wrote every diff exactly would score.
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from setok_cli.data.formats import load
from setok_cli.eval.harness import eval_edit, eval_generate
from setok_cli.models.setokim import use_detokenizer
from setok_cli.tasks.setokim import Sampling, _decode, keep_source_pixels, load_setokim, save_png


def diff_sets(model, chunk: list[dict]) -> tuple[list, list, list, list]:
    """Edits -> (the token sets of their exact diffs, the sources' token sets, their layouts,
    per edit the layout cells never pasted: the dropped token's and the new token's)."""
    import numpy as np
    from PIL import Image

    from setok_cli.models.setokim.bank import token_sets_with_layouts
    from setok_cli.models.setokim.edit_diff import apply_diff, diff_spec, diff_tokens
    rgb = lambda p: np.asarray(Image.open(p).convert("RGB"))          # noqa: E731
    src, lay = token_sets_with_layouts(model, [e["source"] for e in chunk])
    tgt, tlay = token_sets_with_layouts(model, [e["target"] for e in chunk])
    picks = diff_tokens(model, [diff_spec(e) for e in chunk], [rgb(e["source"]) for e in chunk],
                        [rgb(e["target"]) for e in chunk])
    sets, excluded = [], []
    for s, ly, t, tl, (o, n) in zip(src, lay, tgt, tlay, picks):
        tokens, dropped = apply_diff(s, None if o is None else s[o], None if n is None else t[n], model.normalize)
        ex = torch.zeros(ly.shape[1], dtype=torch.bool)
        if dropped is not None:
            ex |= ly[dropped]
        if n is not None:
            ex |= tl[n]
        sets.append(tokens)
        excluded.append(ex)
    return sets, src, lay, excluded


def ceiling(model, task: str, data: Path, limit: int, size: int, tmp: Path, steps=None, diff: bool = False,
            keep=None) -> dict:
    entries = load(data, "edits" if task == "edit" else "pairs")[:limit]
    sub = tmp / f"{task}.json"                                        # the scored entries, as a data file
    raw = json.load(open(data))[:limit]
    for e in raw:                                                     # paths made absolute: the file moves
        for k, v in e.items():
            if isinstance(v, str) and (data.parent / v).exists():
                e[k] = str((data.parent / v).resolve())
    json.dump(raw, open(sub, "w"))
    preds, key = [], "target" if task == "edit" else "image"
    for start in range(0, len(entries), 16):
        chunk = entries[start:start + 16]
        if diff:
            sets, src, lay, excluded = diff_sets(model, chunk)
        else:
            sets = model.image_token_sets([e[key] for e in chunk])
        ims = _decode(model, sets, Sampling(decode_steps=steps), torch.Generator().manual_seed(0), size)
        if diff and keep is not None:
            import numpy as np
            from PIL import Image
            ims = [keep_source_pixels(np.asarray(Image.open(e["source"]).convert("RGB").resize(im.shape[1::-1])), im,
                                      s, ly, w, keep, exclude=x)
                   for e, im, s, ly, w, x in zip(chunk, ims, src, lay, sets, excluded)]
        for k, (e, im) in enumerate(zip(chunk, ims)):
            name = f"{task}_images/{start + k:06d}.png"
            save_png(tmp / name, im)
            p = {"index": start + k, "image": name}
            p.update({"source": os.path.relpath(e["source"], tmp), "instruction": e["instruction"]}
                     if task == "edit" else {"caption": e["caption"]})
            preds.append(p)
    json.dump(preds, open(tmp / f"{task}_pred.json", "w"))
    score = (eval_edit if task == "edit" else eval_generate)(str(sub), str(tmp / f"{task}_pred.json"))
    return {k: v for k, v in score.items() if isinstance(v, (int, float))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a Setokim run folder (its SeTok and detokenizer)")
    ap.add_argument("--data", required=True, help="a split folder of the synthetic world")
    ap.add_argument("--limit", type=int, default=150)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-steps", type=int, help="the detokenizer's sampling steps (default: its config's)")
    ap.add_argument("--detokenizer", help="decode with this stage-1 run's detokenizer (same tokenizer; "
                                          "`setok generate --detokenizer`)")
    ap.add_argument("--diff", action="store_true", help="edits as exact token diffs (see above); edits only")
    ap.add_argument("--keep-pixels", type=int, metavar="GROW", help="with --diff: the source's pixels pasted back")
    ap.add_argument("--out", default="benchmarks/results/writing_ceiling.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_setokim(a.model)
    if a.detokenizer:
        use_detokenizer(model, a.detokenizer)
    split = Path(a.data)
    pairs = split / "pairs_reading.json" if (split / "pairs_reading.json").is_file() else split / "pairs.json"
    res = {"model": a.model, "detokenizer": a.detokenizer, "data": a.data, "limit": a.limit, "size": a.size,
           "decode_steps": a.decode_steps, "diff": a.diff, "keep_pixels": a.keep_pixels}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if not a.diff:
            res["generate"] = ceiling(model, "generate", pairs, a.limit, a.size, Path(tmp), a.decode_steps)
        res["edit"] = ceiling(model, "edit", split / "edits.json", a.limit, a.size, Path(tmp), a.decode_steps,
                              a.diff, a.keep_pixels)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    for task in [t for t in ("generate", "edit") if t in res]:
        s = res[task]
        extra = f", count {s['count_accuracy']:.3f}" if task == "generate" else \
            f", kept {s['preservation']:.3f}, applied {s.get('applied', float('nan')):.3f}"
        print(f"{task}: objects recall {s['object_recall']:.3f} / precision {s['object_precision']:.3f}{extra}"
              f" ({s['images']} images)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"{res['seconds']} s -> {a.out}")


if __name__ == "__main__":
    main()
