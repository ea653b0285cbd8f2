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
wrote as many tokens as the truth, and (shape absent) how many wrote nothing. The shape-absent case is split
once more by whether the asked colour is in the image on another shape ("Is there a red hexagon?" beside a red
circle): a model that picks objects by colour alone says "yes" there. Needs the `reasons` that
`setok ask --data` stores beside each looking answer.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from setok_cli.data.formats import load
from setok_cli.data.shapes_text import final_answer
from setok_cli.eval.harness import vqa_questions
from setok_cli.models.setokim.look import look_entry, world_files

CASES = ("present", "other colour", "shape absent")
COLOUR_THERE = "shape absent, colour there"   # the shape-absent questions whose asked colour is on another shape


def case_of(truth: str) -> str:
    """The looking truth ("<image> <image>: no") -> its case."""
    if final_answer(truth).strip().lower() == "yes":
        return "present"
    return "other colour" if "<image>" in truth else "shape absent"


def score(entries: list[dict], preds: list[dict]) -> dict:
    """Instruct entries (image paths resolved) + `setok ask` predictions -> {case: {"questions", "right",
    "tokens_as_truth", "wrote_nothing"}} over the existence questions the predictions answer; COLOUR_THERE: the
    shape-absent ones whose asked colour is on another object of the image (a world scene beside it)."""
    by_id = {str(p["question_id"]): p for p in preds}
    out = {c: dict.fromkeys(("questions", "right", "tokens_as_truth", "wrote_nothing"), 0)
           for c in (*CASES, COLOUR_THERE)}
    for q in vqa_questions(entries):
        p = by_id.get(q["id"])
        if q["type"] != "exist" or p is None:
            continue
        looked, _ = look_entry(entries[q["entry"]])
        truth = looked["conversations"][1]["value"]
        said = str(p.get("reasons", p["answer"]))
        case = case_of(truth)
        rows = [out[case]]
        if case == "shape absent" and asked_colour_there(entries[q["entry"]], q["question"]):
            rows.append(out[COLOUR_THERE])
        for row in rows:
            row["questions"] += 1
            row["right"] += final_answer(said).strip().lower() == final_answer(truth).strip().lower()
            row["tokens_as_truth"] += said.count("<image>") == truth.count("<image>")
            row["wrote_nothing"] += "<image>" not in said
    return out


def asked_colour_there(entry: dict, question: str) -> bool:
    """Is the colour "Is there a red circle?" asks about on some object of the entry's scene?"""
    m = re.match(r"Is there an? (\w+) ", question)
    scene = world_files(entry["image"])[0]
    return bool(m) and scene.is_file() and any(
        o["color"] == m.group(1) for o in json.loads(scene.read_text())["objects"])


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
        c = "  colour there" if c == COLOUR_THERE else c
        print(f"{c:<14} {r['questions']:>9} {r['right']:>7} {r['tokens_as_truth']:>16} {r['wrote_nothing']:>14}")


if __name__ == "__main__":
    main()
