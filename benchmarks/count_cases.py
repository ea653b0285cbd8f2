"""Count questions by case: which counts are wrong, and what the answer said.

    setok ask --data data/shapes/val/instruct.json --pred-out out/vqa.json --model runs/tiny-stage3-relations
    python benchmarks/count_cases.py --data data/shapes/val/instruct.json --pred out/vqa.json [--json]

The world asks three kinds of count: of every object ("How many objects are there?"), of one colour
("How many red objects are there?") and of one shape ("How many circles are there?"); the last two are
0 when the colour or shape is absent. For each kind and true count (0, 1, 2, 3 or more) this prints how
many questions there are, how many are answered right, how many are answered "1", and, for answers
that wrote tokens first (a model that looks at counts: `look: [..., count_by]`) or listed the objects in words
(`setok data explain --kinds count_numbered`: "a red circle 1, a red star 2: 2"), how many wrote as many tokens (or
listed as many objects) as the truth's objects and how many answers say the number they wrote.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from setok_cli.data.formats import load
from setok_cli.data.shapes_text import ANSWER_MARK, COUNT_QUESTION, final_answer
from setok_cli.eval.harness import vqa_questions

KINDS = ("objects", "colour", "shape")
FIELDS = ("questions", "right", "said_1", "tokens_as_truth", "says_its_tokens")


def kind_of(question: str) -> str:
    """A count question -> "objects", "colour" or "shape"."""
    m = COUNT_QUESTION.search(question)
    if m is None:
        raise ValueError(f"not a count question: {question!r}")
    return "colour" if m.group(1) is not None else ("objects" if m.group(2) == "objects" else "shape")


def written(said: str) -> int:
    """The objects an answer wrote before its number: its visual tokens, else the phrases of its word list
    ("a red circle 1, a red star 2: 2" -> 2), else 0. A `count_scene` answer lists the whole scene, so this is the
    scene's objects there, not the counted ones."""
    if "<image>" in said:
        return said.count("<image>")
    return len(said.rsplit(ANSWER_MARK, 1)[0].split(", ")) if ANSWER_MARK in said else 0


def score(entries: list[dict], preds: list[dict]) -> dict:
    """Instruct entries + `setok ask` predictions -> {kind: {truth bin: {FIELDS}}} over the count
    questions the predictions answer; truth bins "0", "1", "2", "3+"."""
    by_id = {str(p["question_id"]): p for p in preds}
    out: dict = {k: {} for k in KINDS}
    for q in vqa_questions(entries):
        p = by_id.get(q["id"])
        if q["type"] != "count" or p is None:
            continue
        truth = int(q["answer"])
        said = str(p.get("reasons", p["answer"]))
        answer = final_answer(said).strip().lower()
        row = out[kind_of(q["question"])].setdefault(str(truth) if truth < 3 else "3+", dict.fromkeys(FIELDS, 0))
        row["questions"] += 1
        row["right"] += answer == str(truth)
        row["said_1"] += answer == "1"
        row["tokens_as_truth"] += written(said) == truth
        row["says_its_tokens"] += answer == str(written(said))
    return {k: dict(sorted(v.items())) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="instruct.json of the shapes world")
    ap.add_argument("--pred", required=True, help="`setok ask --data ... --pred-out`")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    entries = load(a.data, "instruct")                         # validated, image paths absolute
    res = score(entries, json.loads(Path(a.pred).read_text()))
    if a.json:
        print(json.dumps(res))
        return
    print(f"{'kind':<8} {'truth':>5} " + " ".join(f"{f:>15}" for f in FIELDS))
    for kind, rows in res.items():
        for truth, r in rows.items():
            print(f"{kind:<8} {truth:>5} " + " ".join(f"{r[f]:>15}" for f in FIELDS))
        tot = {f: sum(r[f] for r in rows.values()) for f in FIELDS}
        print(f"{kind:<8} {'all':>5} " + " ".join(f"{tot[f]:>15}" for f in FIELDS))


if __name__ == "__main__":
    main()
