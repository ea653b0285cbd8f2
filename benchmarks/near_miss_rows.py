"""Existence rows where a list of the asked shape says nothing about the answer (a stage-III row for a probe).

    python benchmarks/near_miss_rows.py data/shapes/train/instruct_exist_explained_echo.json \\
        data/shapes/train/instruct_exist_near_echo.json [--seed 0]

From explained existence answers (`setok data explain --kinds exist_shape` or `exist_echo`), keeps every answer
with "no" after a list ("a pink cross, red: no": the asked shape is there in other colours) and as many answers with
"yes" after a list, drawn at random; answers without a list (a plain "no": the shape is absent) are dropped. So a
row of this file cannot be answered by "an object of the asked shape is there" (README: "Where the list is, and a
"no" after it").
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from setok_cli.data.shapes_text import ANSWER_MARK


def near_miss_rows(entries: list[dict], seed: int = 0) -> list[dict]:
    """Explained existence entries -> the "no"-after-a-list ones and as many "yes"-after-a-list ones (drawn with
    `seed`), sorted by id."""
    answer = [e["conversations"][1]["value"] for e in entries]
    no = [e for e, a in zip(entries, answer) if ANSWER_MARK in a and a.endswith(ANSWER_MARK + "no")]
    yes = [e for e, a in zip(entries, answer) if ANSWER_MARK in a and a.endswith(ANSWER_MARK + "yes")]
    random.Random(seed).shuffle(yes)
    return sorted(no + yes[:len(no)], key=lambda e: e["id"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", type=Path, help="explained existence questions (instruct JSON)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = near_miss_rows(json.loads(args.src.read_text()), args.seed)
    args.out.write_text(json.dumps(rows))
    print(f"{len(rows)} rows ({len(rows) // 2} 'no' after a list) -> {args.out}")


if __name__ == "__main__":
    main()
