"""Existence answered by looking: where do the wrong answers come from?

    setok ask --data data/shapes/val/instruct.json --pred-out out/vqa.json --model runs/tiny-stage3-relations
    python benchmarks/existence_cases.py --data data/shapes/val/instruct.json --pred out/vqa.json [--json]

A looking model (models/setokim/look.py) answers "Is there a red circle?" by first writing the tokens
of the objects of the asked shape, then yes or no: "<image> <image>: no" when circles are there but none
is red, a plain "no" when there is no circle. So an existence question is one of three cases:

    present          the asked colour and shape are there (answer yes)
    other colour     objects of the asked shape are there, none of the asked colour (no)
    shape absent     no object of the asked shape (no, nothing written)

For each case this prints how many questions it has, how many are answered right, how many answers
wrote as many tokens as the truth, and (shape absent) how many wrote nothing. Needs the `reasons` that
`setok ask --data` stores beside each looking answer.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from setok_cli.data.formats import load
from setok_cli.data.shapes_text import final_answer
from setok_cli.eval.harness import vqa_questions
from setok_cli.models.setokim.look import look_entry

CASES = ("present", "other colour", "shape absent")


def case_of(truth: str) -> str:
    """The looking truth ("<image> <image>: no") -> its case."""
    if final_answer(truth).strip().lower() == "yes":
        return "present"
    return "other colour" if "<image>" in truth else "shape absent"


def score(entries: list[dict], preds: list[dict]) -> dict:
    """Instruct entries (image paths resolved) + `setok ask` predictions -> {case: {"questions", "right",
    "tokens_as_truth", "wrote_nothing"}} over the existence questions the predictions answer."""
    by_id = {str(p["question_id"]): p for p in preds}
    out = {c: dict.fromkeys(("questions", "right", "tokens_as_truth", "wrote_nothing"), 0) for c in CASES}
    for q in vqa_questions(entries):
        p = by_id.get(q["id"])
        if q["type"] != "exist" or p is None:
            continue
        looked, _ = look_entry(entries[q["entry"]])
        truth = looked["conversations"][1]["value"]
        said = str(p.get("reasons", p["answer"]))
        row = out[case_of(truth)]
        row["questions"] += 1
        row["right"] += final_answer(said).strip().lower() == final_answer(truth).strip().lower()
        row["tokens_as_truth"] += said.count("<image>") == truth.count("<image>")
        row["wrote_nothing"] += "<image>" not in said
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="instruct.json of the shapes world")
    ap.add_argument("--pred", required=True, help="`setok ask --data ... --pred-out` of a looking model")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    entries = load(a.data, "instruct")                         # validated, image paths absolute
    res = score(entries, json.loads(Path(a.pred).read_text()))
    if a.json:
        print(json.dumps(res))
        return
    print(f"{'case':<14} {'questions':>9} {'right':>7} {'tokens as truth':>16} {'wrote nothing':>14}")
    for c, r in res.items():
        print(f"{c:<14} {r['questions']:>9} {r['right']:>7} {r['tokens_as_truth']:>16} {r['wrote_nothing']:>14}")


if __name__ == "__main__":
    main()
