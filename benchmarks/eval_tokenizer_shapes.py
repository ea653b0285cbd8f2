"""FG-ARI, mBO and tokens per object of a tokenizer on the synthetic world, with a
diagnosis of its errors (objects split over several tokens vs objects merged).

    python benchmarks/eval_tokenizer_shapes.py [--n 500] [--sizes 64,128] [--seed 100]
        [--encoder builtin] [--mode hard] [--bandwidth B] [--k K] [--out /tmp/setok_bench]

For each size it renders an n-image test split (seed fixed, so numbers are
reproducible), runs `setok_cli.eval.harness.eval_tokenizer`, and then, on the same
tokenizations, counts per object:

    split   the object's patches fall in more than one token and its largest token holds
            less than 80 % of them (over-segmentation)
    merged  the object's majority token is also the majority token of another object
            (under-segmentation)

with the rate of merges between touching objects, and the share of merged pairs whose
two objects have the same colour.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def diagnose(data: str, tok, batch_size: int = 16, limit: int | None = None) -> dict:
    from PIL import Image
    from scipy import ndimage

    from setok_cli.data import formats
    from setok_cli.eval import metrics as M
    from setok_cli.eval.harness import _np

    entries = formats.load(data, "objects")[:limit]
    n_obj = split = merged = merged_touch = touch_pairs = merged_pairs = merged_same = 0
    for b in range(0, len(entries), batch_size):
        batch = entries[b:b + batch_size]
        out = tok.tokenize([Image.open(e["image"]).convert("RGB") for e in batch])
        labels = _np(out.labels)
        for i, e in enumerate(batch):
            ids = np.asarray(Image.open(e["instances"]))
            colors = {o["id"]: o["color"] for o in json.loads(Path(e["scene"]).read_text())["objects"]} \
                if "scene" in e else {}
            g = M.resample_ids(ids, labels[i].shape)
            lab = labels[i]
            objs = [k for k in np.unique(g) if k > 0]
            major = {}
            for k in objs:
                t, c = np.unique(lab[g == k], return_counts=True)
                major[k] = t[c.argmax()]
                n_obj += 1
                split += c.max() < 0.8 * c.sum()
            for k in objs:
                others = [j for j in objs if j != k and major[j] == major[k]]
                merged += bool(others)
                grown = ndimage.binary_dilation(g == k, iterations=1)
                for j in objs:
                    if j > k and major[j] == major[k]:
                        merged_pairs += 1
                        merged_same += colors.get(j, 1) == colors.get(k, 2)
                    if j > k and (grown & (g == j)).any():
                        touch_pairs += 1
                        merged_touch += major[j] == major[k]
    return {"objects_on_grid": n_obj, "split_rate": split / max(1, n_obj),
            "merged_rate": merged / max(1, n_obj),
            "touching_pairs": touch_pairs, "touching_pairs_merged": merged_touch / max(1, touch_pairs),
            "merged_pairs": merged_pairs, "merged_pairs_same_color": merged_same / max(1, merged_pairs)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--sizes", default="64,128")
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--encoder", default=None)
    ap.add_argument("--mode", default="hard")
    ap.add_argument("--bandwidth", type=float, default=None)
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--out", default="/tmp/setok_bench")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from setok_cli.data.shapes import generate
    from setok_cli.eval.harness import eval_tokenizer
    from setok_cli.models.setok import load_tokenizer

    over = {k: v for k, v in dict(encoder=args.encoder, mode=args.mode, bandwidth=args.bandwidth,
                                  k=args.k).items() if v is not None}
    tok = load_tokenizer(**over)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        root = Path(args.out) / f"shapes{size}_seed{args.seed}_n{args.n}"
        if not (root / "test" / "objects.json").exists():
            generate(root, n=args.n, size=size, seed=args.seed, splits="0,0,1")
        data = str(root / "test" / "objects.json")
        t = time.perf_counter()
        res = eval_tokenizer(data, tokenizer=tok)
        res.update(diagnose(data, tok))
        res.update(size=size, settings=over, seconds=round(time.perf_counter() - t, 1))
        rows.append(res)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=2, default=float))
    if args.json:
        print(json.dumps(rows, default=float))
        return
    from rich.console import Console
    from rich.table import Table

    keys = ["images", "objects", "fg_ari", "mbo", "mbo_grid", "tokens_per_image", "tokens_per_object",
            "images_per_s", "split_rate", "merged_rate", "touching_pairs_merged", "merged_pairs_same_color"]
    table = Table(title=f"tokenizer on the synthetic world ({over})")
    table.add_column("metric")
    for r in rows:
        table.add_column(f"{r['size']} px", justify="right")
    for k in keys:
        table.add_row(k, *(f"{float(r[k]):.3f}" if isinstance(r[k], (float, np.floating)) else str(r[k])
                           for r in rows))
    Console().print(table)


if __name__ == "__main__":
    main()
