"""Questions that need one lookup and the found object's place: "Is the red circle at the top?"

    python benchmarks/side_questions.py data/shapes/train      # -> data/shapes/train/instruct_side.json

A diagnosis set for Setokim's relation questions (README, stage III: "Relations"). A relation
question ("Is the red circle above the blue square?") needs two lookups, each object's place,
and their comparison; this set asks for one lookup and one place. For every object of an
image that the world can name alone (`referring_expression`: "the red object", "the
hexagon", "the leftmost red circle") and whose centre is more than 0.1 from the middle along
an axis, one question about that axis' sides ("top" / "bottom" or "left" / "right", one drawn
when both apply), answered "yes" or "no". Only words of the tiny recipe's vocabulary. SPEC
instruct entries of type "side" (`setok eval vqa` reports accuracy/side), ids
`<stem>_s<object>`; one seeded draw over the images in order.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def side_questions(split: Path, seed: int = 0) -> list[dict]:
    from setok_cli.data.shapes_text import referring_expression
    pairs = json.loads((split / "pairs.json").read_text())
    out = []
    rng = np.random.default_rng(seed)
    for e in pairs:
        stem = Path(e["image"]).stem
        objs = json.loads((split / e["scene"]).read_text())["objects"]
        for k, o in enumerate(objs):
            name = referring_expression(objs, k)
            x, y = o["center"]
            opts = ([("top", y < 0.5), ("bottom", y > 0.5)] if abs(y - 0.5) > 0.1 else []) + \
                   ([("left", x < 0.5), ("right", x > 0.5)] if abs(x - 0.5) > 0.1 else [])
            if not name or not opts:
                continue
            side, yes = opts[int(rng.integers(len(opts)))]
            out.append({"id": f"{stem}_s{k}", "image": e["image"], "type": "side",
                        "conversations": [{"from": "human", "value": f"<image>\nIs {name} at the {side}?"},
                                          {"from": "gpt", "value": "yes" if yes else "no"}]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("split", help="a written split of the shapes world (pairs.json, scenes/)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    split = Path(a.split)
    if not (split / "pairs.json").is_file():
        sys.exit(f"error: {split / 'pairs.json'} not found: give a split written by `setok data shapes`")
    from setok_cli.files import atomic_write_json
    out = side_questions(split, a.seed)
    atomic_write_json(split / "instruct_side.json", out, indent=None)
    print(f"{len(out)} questions -> {split / 'instruct_side.json'}")


if __name__ == "__main__":
    main()
