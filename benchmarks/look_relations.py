"""Does a looking model compare the places of the two tokens it looked up? Relations teacher forced.

    python benchmarks/look_relations.py --model runs/tiny-stage3-look --data data/shapes/val/instruct.json \
        [--limit 0] [--threads 2] [--out benchmarks/results/look_relations_val.json]

A model trained with looking answers (models/setokim/look.py) answers "Is the red circle above
the blue star?" with "<image> <image>: yes": the circle's token, the star's, then the answer. `setok
ask` writes those tokens itself (each at the place head's most likely cell, or with `--snap` as the
image's nearest token at its own seed). Here they are given instead, as in training: the true
source tokens of the two objects (`attend.object_tokens`) at their true seeds. Each relation
question is scored twice, with the answer "yes" and with "no", and the answer with the lower text
loss is the model's. Printed: accuracy (chance 0.5 on balanced questions) and the share of "yes",
over the file's relation questions whose two objects the scene names (`look.look_objects`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image


@torch.no_grad()
def teacher_forced(model, entries: list[dict], root: Path) -> list[dict]:
    """-> per relation question {"id", "answer", "pred"} with the true looked-up tokens."""
    from setok_cli.data.conversations import world_files
    from setok_cli.models.setokim.attend import object_tokens
    from setok_cli.models.setokim.look import look_answer, look_objects
    out = []
    for e in entries:
        img = root / e["image"]
        scene, inst = world_files(img)
        objects = json.loads(scene.read_text())["objects"]
        q = str(e["conversations"][0]["value"]).replace("<image>", " ")
        ids = look_objects("relation", q, objects)
        if len(ids) != 2:
            continue
        with Image.open(img) as im:
            arr = np.asarray(im.convert("RGB"))
        tok = model.setok.tokenize([arr])
        sets, seeds = model.token_sets_of(tok, seeds=True)
        with Image.open(inst) as im:
            k = object_tokens(model, tok, 0, np.asarray(im))
        kk = [int(k[i + 1]) for i in ids]
        images = [sets[0]] + [sets[0][j:j + 1] for j in kk]
        sds = [seeds[0]] + [seeds[0][j:j + 1] for j in kk]
        losses = {}
        for ans in ("yes", "no"):
            conv = [dict(e["conversations"][0]), {"from": "gpt", "value": look_answer(ans, 2)}]
            kw = model.collate([{"conversations": conv, "images": images, "seeds": sds}])
            losses[ans] = float(model(**{k2: v.to(model.device) for k2, v in kw.items()}).text_loss)
        out.append({"id": e.get("id"), "answer": str(e["conversations"][1]["value"]).split(": ")[-1].strip(),
                    "pred": min(losses, key=losses.get)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a Setokim run trained with looking answers")
    ap.add_argument("--data", required=True, help="an instruct file of the world (its relation questions are used)")
    ap.add_argument("--limit", type=int, default=0, help="the first N relation questions (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write the figures and each question's prediction here (JSON)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from setok_cli.tasks.setokim import load_setokim
    model = load_setokim(a.model)
    if not model.config.look_answers:
        ap.error(f"{a.model} answers without looking (no look row trained it)")
    entries = [e for e in json.loads(Path(a.data).read_text()) if e.get("type") == "relation"]
    entries = entries[:a.limit] if a.limit else entries
    rows = teacher_forced(model, entries, Path(a.data).parent)
    acc = float(np.mean([r["pred"] == r["answer"] for r in rows])) if rows else float("nan")
    yes = float(np.mean([r["pred"] == "yes" for r in rows])) if rows else float("nan")
    res = {"model": a.model, "data": a.data, "questions": len(rows), "accuracy": round(acc, 4),
           "answered_yes": round(yes, 4), "truth_yes": round(float(np.mean([r["answer"] == "yes" for r in rows])), 4)}
    print(json.dumps(res))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({**res, "predictions": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
