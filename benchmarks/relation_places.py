"""Relations answered with their places (`look_places`): are the written places right, and does the answer follow them?

    setok ask --data data/shapes/val/instruct.json --pred-out out/vqa.json --model runs/exp-P0
    python benchmarks/relation_places.py --data data/shapes/val/instruct.json --pred out/vqa.json [--json]

A model trained with `look_places` rows (models/setokim/look.py) answers "Is the red circle above the
blue star?" with "<image> 1 <image> 5: yes": the circle's token and its row bin (0..6), the star's token
and its row bin, then the answer. For each relation question of the data file this reads the two
written bins and scores them against the scene's centres (`look.relation_places`), exactly and within
one bin; for the answers whose two bins differ, it checks whether yes / no is what the bins say
(the comparison step alone). With `look_places: chain` ("<image> 1 <image> 5, 1 2 3 4 5: yes") the places are those
before the ", ", and it also checks whether the written count is the one the written places give
(`drills.relation_chain`: "chain_follows", over the answers with a count, "chained"). Printed: counts and shares
over the relation questions.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from setok_cli.data.conversations import world_files
from setok_cli.data.drills import relation_chain, relation_holds
from setok_cli.data.shapes_text import RELATION_QUESTION
from setok_cli.models.setokim.look import look_objects, relation_places

def score(entries: list[dict], preds: list[dict], root: Path) -> dict:
    """Instruct entries + `setok ask` predictions -> {"questions", "right", "places_given", "first_place",
    "second_place", "first_within_1", "second_within_1", "untied", "follows_places", "answered_yes", "chained",
    "chain_follows"}."""
    by_id = {p["question_id"]: p for p in preds}
    c = dict.fromkeys(["questions", "right", "places_given", "first_place", "second_place", "first_within_1",
                       "second_within_1", "untied", "follows_places", "answered_yes", "chained", "chain_follows"], 0)
    for e in entries:
        if e.get("type") != "relation" or e["id"] not in by_id:
            continue
        p = by_id[e["id"]]
        scene, _ = world_files(root / e["image"])
        objects = json.loads(scene.read_text())["objects"]
        q = str(e["conversations"][0]["value"]).replace("<image>", " ")
        want = relation_places(q, objects, look_objects("relation", q, objects, resolve=True))
        c["questions"] += 1
        c["right"] += p["answer"] == e["conversations"][1]["value"]
        c["answered_yes"] += p["answer"] == "yes"
        placed, _, counted = str(p.get("reasons", "")).rsplit(": ", 1)[0].partition(", ")
        got = [int(w) for w in re.findall(r"\b\d\b", placed)]
        if want is None or len(got) != 2:
            continue
        if counted:
            c["chained"] += 1
            c["chain_follows"] += re.findall(r"\b\d\b", counted) == [
                str(k) for k in relation_chain(RELATION_QUESTION.search(q).group(2), *got)]
        c["places_given"] += 1
        for k, name in enumerate(("first", "second")):
            c[f"{name}_place"] += got[k] == want[k]
            c[f"{name}_within_1"] += abs(got[k] - want[k]) <= 1
        if got[0] != got[1]:
            c["untied"] += 1
            holds = relation_holds(RELATION_QUESTION.search(q).group(2), *got)
            c["follows_places"] += (p["answer"] == "yes") == holds
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="an instruct file of the world (relation questions are scored)")
    ap.add_argument("--pred", required=True, help="`setok ask --pred-out` of a model trained with look_places")
    ap.add_argument("--json", action="store_true", help="print the counts as JSON")
    a = ap.parse_args()
    data = Path(a.data)
    c = score(json.loads(data.read_text()), json.loads(Path(a.pred).read_text()), data.parent)
    if a.json:
        print(json.dumps(c))
        return
    n = max(c["questions"], 1)
    for k, v in c.items():
        base = c["untied"] if k == "follows_places" else c["chained"] if k == "chain_follows" else (
            c["places_given"] if "place" in k or "within" in k or k == "chained" else n)
        print(f"{k:16s} {v:5d}" + ("" if k == "questions" else f"  {v / max(base, 1):.3f}"))


if __name__ == "__main__":
    main()
