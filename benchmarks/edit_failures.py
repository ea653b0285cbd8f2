"""Why do moves and additions fail? The changed object of each edit, looked for in the edited image.

    python benchmarks/edit_failures.py --data data/shapes/val/edits.json --pred F [--ops add,move]

F is the predictions JSON of `setok edit --data ... --pred-out F`. For each edit of the named
ops, the edited image is parsed (`scene_parser.parse_scene`, as `setok eval edit` parses it)
and the target's changed object is matched as the evaluation matches it (colour, shape and a
centre within 0.1). Each miss is put in one bin: the right colour and shape drawn elsewhere
(nearest such object within 0.2 of the true centre, or further), or an object at the place
(within 0.1) with the wrong colour or shape, or nothing there. Prints one count per (op, bin).
"""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np

from setok_cli.data.formats import load
from setok_cli.data.scene_parser import match_objects, parse_scene
from setok_cli.images import load_image


def _dist(a: dict, b: dict) -> float:
    return float(np.hypot(a["center"][0] - b["center"][0], a["center"][1] - b["center"][1]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="an edits.json of the shapes world (with its scenes)")
    ap.add_argument("--pred", required=True, help="`setok edit --pred-out` of it")
    ap.add_argument("--ops", default="add,move")
    a = ap.parse_args(argv)
    pred_dir = Path(a.pred).resolve().parent
    preds = {p["index"]: p for p in json.loads(Path(a.pred).read_text())}     # by the entry's index in --data
    c: collections.Counter = collections.Counter()
    for i, e in enumerate(load(a.data, "edits")):
        op = (e.get("edit") or {}).get("op")
        if op not in a.ops.split(","):
            continue
        p = preds.get(i)
        if p is None or p["instruction"] != e["instruction"]:
            c[op, "no prediction"] += 1
            continue
        target = json.loads(Path(e["target_scene"]).read_text())["objects"]
        keep = set(e["edit"]["preserved"])
        changed = next(o for j, o in enumerate(target) if o.get("id", j + 1) not in keep)
        image = Path(p["image"]) if Path(p["image"]).is_absolute() else pred_dir / p["image"]
        parsed = parse_scene(load_image(image))
        if match_objects(parsed, [changed], 0.1)["correct"]:
            c[op, "right"] += 1
            continue
        same = [_dist(o, changed) for o in parsed if o["color"] == changed["color"] and o["shape"] == changed["shape"]]
        near = [o for o in parsed if _dist(o, changed) < 0.1]
        if same:
            c[op, "right object, elsewhere: " + ("within 0.2" if min(same) < 0.2 else "further")] += 1
        elif near:
            o = min(near, key=lambda o: _dist(o, changed))
            wrong = [w for w in ("colour", "shape") if o[{"colour": "color"}.get(w, w)] != changed[{"colour": "color"}
                                                                                                 .get(w, w)]]
            c[op, "an object at the place, wrong " + " and ".join(wrong)] += 1
        else:
            c[op, "nothing at the place"] += 1
    for k in sorted(c):
        print(f"{k[0]:6s} {k[1]:45s} {c[k]}")


if __name__ == "__main__":
    main()
