"""Can a small Llama learn the world's relation questions from SeTok tokens and their places?

    python benchmarks/relation_probe.py --model runs/tiny-stage2 --data data/shapes [--task relation|side]
        [--with-side] [--layers 4 8] [--steps 1500] [--batch 128] [--threads 2]
        [--out benchmarks/results/relation_probe.json]

Setokim answers "Is the red circle above the blue square?" at the "yes" prior, even trained on
relation questions alone (README, stage III: "Relations"). This separates the tokens and the
LM's shape from Setokim's training set-up, as `lookup_probe.py` does for the lookup by shape:

- The inputs: the frozen SeTok tokens of the world's train (2,000) and val (250) images as
  Setokim reads them (generation order, standardised with the model's token statistics), each
  plus its seed cell's place embedding (a linear map of `place_features`, as `place_input`
  gives Setokim), or without it (`--no-places`).
- The task: for every ordered pair of objects each named by its colour and shape alone (the
  pair unique in the image) and apart by more than 0.08 along the asked axis (the world's
  rule, `shapes_text._relation`), "is A left of / right of / above / below B?", yes or no,
  each direction asked. The question is five learnt embeddings (A's colour, A's shape, the
  relation, B's colour, B's shape) after the image. `--task side` asks one lookup and one place
  instead ("is A at the top / bottom / left / right?", centre more than 0.1 from the middle;
  three embeddings), and `--with-side` trains every other batch on those (a curriculum).
  `--task given` asks the comparison alone: the "image" is the two objects' tokens, A's then
  B's, at their cells (the token seeded nearest each centre; as a looking answer writes them
  before its yes / no), and the question is one embedding, the relation; `--no-content` zeroes
  the tokens, leaving their places.
- The model: a Llama of the tiny recipe's width (256, 4 heads) from scratch with --layers
  layers, the recipe's projector, a linear read-out at the last position; AdamW lr 1e-3, wd
  1e-3, batch --batch, fp32.
Printed: val accuracy (chance 0.5, balanced) every 250 steps, per depth.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

RELATIONS = ("to the left of", "to the right of", "above", "below")


def collect(model, root: Path, n: int) -> list[dict]:
    """-> per image: {"x": (K, T) standardised tokens, "cells": (K,) place classes, "objects": [dict]}."""
    pairs = json.loads((root / "pairs.json").read_text())[:n]
    items = []
    with torch.no_grad():
        for a in range(0, len(pairs), 64):
            ents = pairs[a:a + 64]
            sets, seeds = model.image_token_sets([str(root / e["image"]) for e in ents], seeds=True)
            for e, t, s in zip(ents, sets, seeds):
                items.append({"x": model.normalize(t.float()), "cells": model.place_head.classes(s),
                              "objects": json.loads((root / e["scene"]).read_text())["objects"]})
    return items


def questions(items: list[dict], task: str = "relation", content: bool = True) -> list[tuple]:
    """(item, query ids, answer 0 = no / 1 = yes, relation index) for every askable pair
    (`relation`: 5 ids; `given`: 1 id, the item A's and B's tokens alone, zeroed without
    `content`) or object (`side`: A's colour, A's shape, the side; 3 ids)."""
    from setok_cli.data.shapes import COLOR_NAMES, SHAPES
    out = []
    C, S = len(COLOR_NAMES), len(SHAPES)
    for it in items:
        objs = it["objects"]
        key = [(o["color"], o["shape"]) for o in objs]
        if task == "side":
            for i, a in enumerate(objs):
                x, y = a["center"]
                if key.count(key[i]) > 1:
                    continue
                sides = ([(0, x < 0.5), (1, x > 0.5)] if abs(x - 0.5) > 0.1 else []) + \
                        ([(2, y < 0.5), (3, y > 0.5)] if abs(y - 0.5) > 0.1 else [])
                for r, yes in sides:
                    out.append((it, [COLOR_NAMES.index(a["color"]), C + SHAPES.index(a["shape"]), C + S + 4 + r],
                                int(yes), r))
            continue
        for i, a in enumerate(objs):
            for j, b in enumerate(objs):
                if i == j or key.count(key[i]) > 1 or key.count(key[j]) > 1:
                    continue
                dx, dy = b["center"][0] - a["center"][0], b["center"][1] - a["center"][1]
                truth = []
                if abs(dx) > 0.08:
                    truth += [(0, dx > 0), (1, dx < 0)]
                if abs(dy) > 0.08:
                    truth += [(2, dy > 0), (3, dy < 0)]
                for r, yes in truth:
                    if task == "given":              # A's token, then B's, at their cells; the relation
                        ja, jb = _nearest_token(it["cells"], a["center"]), _nearest_token(it["cells"], b["center"])
                        x = it["x"][[ja, jb]] if content else it["x"].new_zeros(2, it["x"].shape[1])
                        out.append(({"x": x, "cells": it["cells"][[ja, jb]]}, [C + S + r], int(yes), r))
                        continue
                    q = [COLOR_NAMES.index(a["color"]), C + SHAPES.index(a["shape"]), C + S + r,
                         COLOR_NAMES.index(b["color"]), C + SHAPES.index(b["shape"])]
                    out.append((it, q, int(yes), r))
    return out


def _nearest_token(cells: torch.Tensor, center, side: int = 16) -> int:
    """An image's token cells (K,) (class side * side: no seed) and an object's centre (x, y) in
    [0, 1] -> the token whose seed cell lies nearest the centre (an object's seed lies inside it
    for 351 of 358 val objects)."""
    r, c = torch.div(cells, side, rounding_mode="floor").float(), (cells % side).float()
    d = (r + 0.5 - center[1] * side) ** 2 + (c + 0.5 - center[0] * side) ** 2
    return int(torch.where(cells < side * side, d, torch.full_like(d, float("inf"))).argmin())


class Probe(nn.Module):
    def __init__(self, token_dim: int, place_dim: int, queries: int, layers: int, width: int = 256):
        super().__init__()
        from transformers import LlamaConfig, LlamaModel
        self.lm = LlamaModel(LlamaConfig(vocab_size=8, hidden_size=width, intermediate_size=3 * width,
                                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=64))
        self.projector = nn.Sequential(nn.Linear(token_dim, width), nn.GELU(), nn.Linear(width, width))
        self.place = nn.Linear(place_dim, width) if place_dim else None
        self.query = nn.Embedding(queries, width)
        self.marks = nn.Parameter(torch.randn(2, width) * 0.02)          # [Img], [/Img]
        self.readout = nn.Linear(width, 2)
        nn.init.normal_(self.query.weight, std=0.02)

    def forward(self, x: torch.Tensor, p: torch.Tensor, m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """x (B, K, T), p (B, K, F) place features, m (B, K) bool, q (B, Q) -> logits (B, 2)."""
        B, K = m.shape
        W = self.marks.shape[1]
        v = self.projector(x) + (self.place(p) if self.place is not None else 0)
        rep = lambda t: t[None].expand(B, -1, -1)                        # noqa: E731
        h = torch.cat([rep(self.marks[:1]), v, rep(self.marks[1:]), self.query(q)], 1)
        keep = torch.cat([torch.ones(B, 1, dtype=torch.bool), m, torch.ones(B, 1 + q.shape[1], dtype=torch.bool)], 1)
        order = torch.argsort((~keep).long(), dim=1, stable=True)          # right padding, as Setokim's rows
        h = torch.gather(h, 1, order[..., None].expand(-1, -1, W))
        keep = torch.gather(keep, 1, order)
        hs = self.lm(inputs_embeds=h, attention_mask=keep.long()).last_hidden_state
        return self.readout(hs[torch.arange(B), keep.sum(1) - 1])


def batch(samples: list[tuple], features: torch.Tensor):
    K = max(s[0]["x"].shape[0] for s in samples)
    T = samples[0][0]["x"].shape[1]
    x = torch.zeros(len(samples), K, T)
    p = torch.zeros(len(samples), K, features.shape[1])
    m = torch.zeros(len(samples), K, dtype=torch.bool)
    for i, (it, *_) in enumerate(samples):
        k = it["x"].shape[0]
        x[i, :k], p[i, :k], m[i, :k] = it["x"], features[it["cells"]], True
    q = torch.tensor([s[1] for s in samples])
    return x, p, m, q, torch.tensor([s[2] for s in samples])


def run(train: list, val: list, layers: int, places: bool, steps: int, bs: int, seed: int,
        also: list = (), cells: int = 16 * 16) -> list[dict]:
    """Train a probe on `train` (and, every other step, on `also`), score val every 250 steps."""
    from setok_cli.data.shapes import COLOR_NAMES, SHAPES
    from setok_cli.models.setokim.place import place_features
    torch.manual_seed(seed)
    rng = random.Random(seed)
    features = place_features(cells)                    # the model's patch grid, as its place head reads it
    D = train[0][0]["x"].shape[1]
    net = Probe(D, features.shape[1] if places else 0, len(COLOR_NAMES) + len(SHAPES) + 2 * len(RELATIONS), layers)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-3)
    xv, pv, mv, qv, yv = batch(val, features)
    log, t0 = [], time.time()
    for step in range(1, steps + 1):
        x, p, m, q, y = batch(rng.sample(also if also and step % 2 == 0 else train, bs), features)
        loss = F.cross_entropy(net(x, p, m, q), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == steps:
            with torch.no_grad():
                ok = (net(xv, pv, mv, qv).argmax(1) == yv).float()
            row = {"layers": layers, "places": places, "with_side": bool(also), "step": step,
                   "loss": round(loss.item(), 4),
                   "val_accuracy": round(float(ok.mean()), 3), "seconds": round(time.time() - t0)}
            print(json.dumps(row), flush=True)
            log.append(row)
    return log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a Setokim run that reads places (its SeTok and token statistics)")
    ap.add_argument("--data", required=True, help="a shapes world (train/ and val/)")
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--task", choices=["relation", "side", "given"], default="relation",
                    help="side: one object's side of the image instead (\"is A at the top?\"), one lookup; "
                         "given: the comparison alone, over the two objects' tokens at their cells")
    ap.add_argument("--with-side", action="store_true",
                    help="relation: every other training batch is side questions (scored on relations alone)")
    ap.add_argument("--no-places", action="store_true", help="the tokens alone, without their cells")
    ap.add_argument("--no-content", action="store_true", help="--task given: the places alone, tokens zeroed")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/relation_probe.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from setok_cli.models.setokim import Setokim
    model = Setokim.from_pretrained(a.model).eval()
    if model.place_head is None:
        ap.error(f"{a.model} has no place head: its tokens' cells are not known")
    if a.task == "given" and model.place_head.cells != 16 * 16:
        ap.error("--task given reads the tiny tokenizer's 16 x 16 grid")
    tr = questions(collect(model, Path(a.data) / "train", 2000), a.task, not a.no_content)
    va = questions(collect(model, Path(a.data) / "val", 250), a.task, not a.no_content)
    also = questions(collect(model, Path(a.data) / "train", 2000), "side") if a.with_side else []
    res = {"model": a.model, "task": a.task, "with_side": a.with_side, "content": not a.no_content,
           "train_questions": len(tr), "val_questions": len(va),
           "val_yes": round(sum(s[2] for s in va) / max(len(va), 1), 3), "runs": []}
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}), flush=True)
    for n in a.layers:
        res["runs"] += run(tr, va, n, not a.no_places, a.steps, a.batch, a.seed, also, model.place_head.cells)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
