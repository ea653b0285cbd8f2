"""Does reading order name an image's objects in the order Setokim writes their tokens?

    python benchmarks/reading_order_alignment.py --model runs/tiny-stage1 --data data/shapes/val \
        [--limit 250] [--rows 16] [--out benchmarks/results/reading_order_alignment.json]

Setokim writes an image's tokens by seed position in raster order (`heads.order_tokens`).
`setok data reading` rewrites each caption's list in reading order (`shapes_text.reading_order`:
the row of a ROWS-row grid holding the object's centre, then x). Each token is given the object
that holds most of its patches (the instance map at each patch's centre pixel; tokens that are
mostly background get none); the script compares the objects in token order with the same
objects in reading order and prints, over the images, the share whose orders agree exactly, the
share of the k-th object agreeing (the caption's k-th phrase naming the k-th object token), and
the same for the world's own caption order (the order the scene drew its objects), as baseline.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from setok_cli.data.formats import load
from setok_cli.data.shapes_text import reading_order
from setok_cli.models.setok import load_tokenizer
from setok_cli.models.setokim.heads import order_tokens


def object_order(out, i: int, inst: np.ndarray) -> list[int]:
    """Image i's tokens in generation order -> the object id each stands for (background skipped)."""
    idx, mask = order_tokens(torch.arange(out.tokens.shape[1], dtype=torch.float32).view(1, -1, 1),
                             out.token_mask[i:i + 1], out.seeds[i:i + 1])      # token indices, reordered
    labels = out.image_labels(i).numpy()                                  # (gh, gw) token of each patch
    gh, gw = labels.shape
    ys = ((np.arange(gh) + 0.5) * inst.shape[0] / gh).astype(int)
    xs = ((np.arange(gw) + 0.5) * inst.shape[1] / gw).astype(int)
    owner = inst[np.ix_(ys, xs)]                                          # (gh, gw) object id at each patch
    order = []
    for k in idx[0, :, 0][mask[0]].long().tolist():
        ids, counts = np.unique(owner[labels == k], return_counts=True)
        if len(ids) and ids[counts.argmax()] != 0 and ids[counts.argmax()] not in order:
            order.append(int(ids[counts.argmax()]))
    return order


def agreement(seqs: list[tuple[list[int], list[int]]]) -> dict:
    exact = [a == b for a, b in seqs]
    pos = [x == y for a, b in seqs for x, y in zip(a, b)]
    return {"images": len(seqs), "order_exact": float(np.mean(exact)), "position_agree": float(np.mean(pos))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a stage-1 run or tokenizer folder")
    ap.add_argument("--data", required=True, help="a shapes-world split (setok data shapes)")
    ap.add_argument("--limit", type=int, default=250)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--out", default="benchmarks/results/reading_order_alignment.json")
    a = ap.parse_args()
    t0 = time.perf_counter()
    setok = load_tokenizer(a.model)
    pairs = load(Path(a.data) / "pairs.json", "pairs")[:a.limit]
    reading, given = [], []
    for b in range(0, len(pairs), a.batch):
        chunk = pairs[b:b + a.batch]
        out = setok.tokenize([p["image"] for p in chunk])
        for i, p in enumerate(chunk):
            inst = np.asarray(Image.open(p["instances"]))
            objs = json.loads(Path(p["scene"]).read_text())["objects"]
            tok = object_order(out, i, inst)
            present = [o["id"] for o in objs if o["id"] in tok]           # objects some token stands for
            reading.append((tok, [o["id"] for o in reading_order(objs, a.rows) if o["id"] in present]))
            given.append((tok, present))
    res = {"model": a.model, "data": a.data, "rows": a.rows, "reading_order": agreement(reading),
           "scene_order": agreement(given), "seconds": round(time.perf_counter() - t0, 1)}
    multi = [(x, y) for x, y in reading if len(y) > 1]
    res["reading_order_two_or_more"] = agreement(multi)
    res["scene_order_two_or_more"] = agreement([(x, y) for x, y in given if len(y) > 1])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
