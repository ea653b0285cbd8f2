"""Existence and counts answered after the scene's list: is the list wrong, or the reading of it?

    setok data explain data/shapes/val/instruct.json --kinds exist_all,count_all \
        --out data/shapes/val/instruct_explained_all.json
    setok ask --data data/shapes/val/instruct.json --pred-out out/vqa.json --model RUN
    python benchmarks/scene_list_cases.py --data data/shapes/val/instruct_explained_all.json --pred out/vqa.json

A model trained on `--kinds exist_all,count_all` answers "Is there a red circle?" and "How many red
objects are there?" after writing every object of the scene in reading order, a caption's list: "a
blue star, a red circle: yes". Each answer then has two steps, writing the list (seeing) and reading
the answer off it (text). For existence and each kind of count ("objects", one "colour", one
"shape") this prints how many questions there are, how many are answered right, how many lists are
the truth's exactly (the same objects in the same order) or as a set of objects (any order), how many
answers follow from their own list (whether or not the list is right), and how many are right among
the exact lists. `--data` is the explained file (its answers hold the true lists). Existence answered by the objects of the asked shape
(`--kinds exist_shape`, the recipe's) is scored the same way against a file explained with that kind.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from setok_cli.data.formats import load
from setok_cli.data.shapes_text import ANSWER_MARK, COUNT_QUESTION, EXIST_QUESTION, PLURALS, final_answer
from setok_cli.eval.harness import vqa_questions

KINDS = ("exist", "objects", "colour", "shape")
FIELDS = ("questions", "right", "list_exact", "list_as_set", "follows_list", "right_if_exact")


def listed(text: str) -> list[tuple[str, ...]]:
    """ "a blue star, an orange circle: yes" -> [("blue", "star"), ("orange", "circle")]; [] without a list. A
    one-word part (the asked colour that `--kinds exist_echo` writes again: "a blue star, red: no") is no object."""
    if ANSWER_MARK not in text:
        return []
    return [tuple(p.split()[1:]) for p in text.rsplit(ANSWER_MARK, 1)[0].split(", ") if len(p.split()) > 1]


def implied(question: str, items: list[tuple[str, ...]]) -> tuple[str, str]:
    """(kind, the answer the list gives) for an existence or count question."""
    m = EXIST_QUESTION.search(question)
    if m:
        return "exist", "yes" if tuple(m.groups()) in items else "no"
    m = COUNT_QUESTION.search(question)
    if m is None:
        raise ValueError(f"neither an existence nor a count question: {question!r}")
    if m.group(1) is not None:
        return "colour", str(sum(1 for it in items if it[:1] == (m.group(1),)))
    if m.group(2) == "objects":
        return "objects", str(len(items))
    shape = {p: s for s, p in PLURALS.items()}[m.group(2)]
    return "shape", str(sum(1 for it in items if it[1:] == (shape,)))


def score(entries: list[dict], preds: list[dict]) -> dict:
    """Explained instruct entries + `setok ask` predictions -> {kind: {FIELDS}} over the existence and
    count questions the predictions answer."""
    by_id = {str(p["question_id"]): p for p in preds}
    out = {k: dict.fromkeys(FIELDS, 0) for k in KINDS}
    for q in vqa_questions(entries):
        p = by_id.get(q["id"])
        if q["type"] not in ("exist", "count") or p is None:
            continue
        said = str(p.get("reasons", p["answer"]))
        truth, mine = listed(q["answer"]), listed(said)
        kind, follows = implied(q["question"], mine)
        right = final_answer(said).strip().lower() == final_answer(q["answer"]).strip().lower()
        row = out[kind]
        row["questions"] += 1
        row["right"] += right
        row["list_exact"] += mine == truth
        row["list_as_set"] += Counter(mine) == Counter(truth)
        row["follows_list"] += final_answer(said).strip().lower() == follows
        row["right_if_exact"] += right and mine == truth
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="instruct file explained with --kinds exist_all,count_all")
    ap.add_argument("--pred", required=True, help="`setok ask --data ... --pred-out`")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    entries = load(a.data, "instruct", check_files=False)
    res = score(entries, json.loads(Path(a.pred).read_text()))
    if a.json:
        print(json.dumps(res))
        return
    print(f"{'kind':<8} " + " ".join(f"{f:>14}" for f in FIELDS))
    for kind, r in res.items():
        print(f"{kind:<8} " + " ".join(f"{r[f]:>14}" for f in FIELDS))


if __name__ == "__main__":
    main()
