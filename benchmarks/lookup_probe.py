"""Can a small Llama find an object by its shape among SeTok tokens? A controlled lookup task.

    python benchmarks/lookup_probe.py --model runs/tiny-stage2 --data data/shapes \\
        [--prefix 0 34] [--steps 500] [--batch 128] [--threads 2] [--out benchmarks/results/lookup_probe.json]

Setokim answers "What color is the hexagon?" no better than naming the colour of some object
in the image (README, stage III). This separates the tokens from the training set-up:

- The tokens: the frozen SeTok tokens of the world's train (2,000) and val (250) images, as
  Setokim reads them (generation order, standardised with the model's token statistics); the
  labels are the scene's objects, not the tokens'.
- The task: for every object that its shape alone singles out in an image of two or more
  objects, "shape -> its colour"; for every object its colour singles out, "colour -> its
  shape". One learnt query embedding (the shape or colour asked) follows the image's tokens.
- The model: a Llama of the tiny recipe's shape (4 layers, 256 wide, 4 heads) from scratch,
  the recipe's projector (Linear, GELU, Linear), a linear read-out at the last position;
  AdamW lr 1e-3, wd 1e-3, batch --batch, fp32. Each of --prefix N puts N learnt embeddings
  (the same for every sample, as Setokim's Vicuna system prompt is), `[Img]` and `[/Img]`
  around the tokens, and 3 learnt positions after the query (as "? ASSISTANT:"); rows are
  right-padded, as Setokim pads them. N = 0 still has the markers and the padding.
Printed: val accuracy of each direction every 250 steps, per prefix length; chance is about
1 / (objects in the image).

    python benchmarks/lookup_probe.py --describe out/desc_val.json --data data/shapes

scores a `setok ask --data data/shapes/val/describe_shape.json --pred-out F` file instead (no
training): for each object its shape alone singles out in an image of two or more objects, is
the colour the answer gives that shape the object's? The same lookup, asked of Setokim. Also,
over the images of two or more objects, how often the answer names the right multiset of
shapes, of colours, and of (shape, colour) objects.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))


def collect(model, root: Path, n: int) -> list[dict]:
    """-> per image: {"x": (K, T) standardised tokens, "objects": [(shape, colour)]}."""
    from setok_cli.models.setokim.regions import read_images
    from setokim_binding_probe import ordered
    pairs = json.loads((root / "pairs.json").read_text())[:n]
    items = []
    with torch.no_grad():
        for a in range(0, len(pairs), 64):
            ents = pairs[a:a + 64]
            out = read_images(model, [str(root / e["image"]) for e in ents]).out
            _, tokens, mask = ordered(model, out)
            for i, e in enumerate(ents):
                objects = json.loads((root / e["scene"]).read_text())["objects"]
                items.append({"x": model.normalize(tokens[i][mask[i]].float()),
                              "objects": [(o["shape"], o["color"]) for o in objects]})
    return items


def lookups(items: list[dict]) -> list[tuple]:
    """(tokens, direction 0 = by shape / 1 = by colour, query id, answer id, objects in the image)."""
    from setok_cli.data.shapes import COLOR_NAMES, SHAPES
    out = []
    for it in items:
        objs = it["objects"]
        if len(objs) < 2:
            continue
        for s, c in objs:
            if sum(o[0] == s for o in objs) == 1:
                out.append((it["x"], 0, SHAPES.index(s), COLOR_NAMES.index(c), len(objs)))
            if sum(o[1] == c for o in objs) == 1:
                out.append((it["x"], 1, len(SHAPES) + COLOR_NAMES.index(c), len(COLOR_NAMES) + SHAPES.index(s),
                            len(objs)))
    return out


class Probe(nn.Module):
    def __init__(self, token_dim: int, prefix: int, queries: int, answers: int, width: int = 256):
        super().__init__()
        from transformers import LlamaConfig, LlamaModel
        self.lm = LlamaModel(LlamaConfig(vocab_size=8, hidden_size=width, intermediate_size=3 * width,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=prefix + 64))
        self.projector = nn.Sequential(nn.Linear(token_dim, width), nn.GELU(), nn.Linear(width, width))
        self.query = nn.Embedding(queries, width)
        self.prefix = nn.Parameter(torch.randn(prefix, width) * 0.02)
        self.marks = nn.Parameter(torch.randn(2, width) * 0.02)          # [Img], [/Img]
        self.tail = nn.Parameter(torch.randn(3, width) * 0.02)           # "? ASSISTANT:"
        self.readout = nn.Linear(width, answers)
        nn.init.normal_(self.query.weight, std=0.02)                     # as the LM's word rows

    def forward(self, x: torch.Tensor, m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """x (B, K, T), m (B, K) bool, q (B,) -> logits (B, answers)."""
        B, K = m.shape
        W = self.prefix.shape[1]
        rep = lambda t: t[None].expand(B, -1, -1)                        # noqa: E731
        h = torch.cat([rep(self.prefix), rep(self.marks[:1]), self.projector(x), rep(self.marks[1:]),
                       self.query(q)[:, None], rep(self.tail)], 1)
        n = self.prefix.shape[0] + 1
        keep = torch.cat([torch.ones(B, n, dtype=torch.bool), m, torch.ones(B, 5, dtype=torch.bool)], 1)
        order = torch.argsort((~keep).long(), dim=1, stable=True)          # right padding, as Setokim's rows
        h = torch.gather(h, 1, order[..., None].expand(-1, -1, W))
        keep = torch.gather(keep, 1, order)
        hs = self.lm(inputs_embeds=h, attention_mask=keep.long()).last_hidden_state
        return self.readout(hs[torch.arange(B), keep.sum(1) - 1])


def batch(samples: list[tuple], token_dim: int):
    K = max(s[0].shape[0] for s in samples)
    x = torch.zeros(len(samples), K, token_dim)
    m = torch.zeros(len(samples), K, dtype=torch.bool)
    for i, s in enumerate(samples):
        x[i, :len(s[0])], m[i, :len(s[0])] = s[0], True
    t = lambda j: torch.tensor([s[j] for s in samples])                  # noqa: E731
    return x, m, t(2), t(3), t(1)


def run(train: list, val: list, prefix: int, steps: int, bs: int, seed: int) -> list[dict]:
    from setok_cli.data.shapes import COLOR_NAMES, SHAPES
    torch.manual_seed(seed)
    rng = random.Random(seed)
    D = train[0][0].shape[1]
    net = Probe(D, prefix, len(SHAPES) + len(COLOR_NAMES), len(SHAPES) + len(COLOR_NAMES))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-3)
    xv, mv, qv, yv, kv = batch(val, D)
    log, t0 = [], time.time()
    for step in range(1, steps + 1):
        x, m, q, y, _ = batch(rng.sample(train, bs), D)
        loss = F.cross_entropy(net(x, m, q), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == steps:
            with torch.no_grad():
                ok = net(xv, mv, qv).argmax(1) == yv
            row = {"prefix": prefix, "step": step, "loss": round(loss.item(), 4),
                   "by_shape_colour": round(float(ok[kv == 0].float().mean()), 3),
                   "by_colour_shape": round(float(ok[kv == 1].float().mean()), 3), "seconds": round(time.time() - t0)}
            print(json.dumps(row), flush=True)
            log.append(row)
    return log


def describe_accuracy(pred_file: Path, data: Path) -> dict:
    """Per object its shape singles out (images of 2+ objects): the answer's colour for it is right."""
    import re

    from setok_cli.data.shapes import PLURALS
    singular = {p: s for s, p in PLURALS.items()}
    truth = {e["id"]: e["conversations"][1]["value"] for e in json.loads((data / "val" / "describe_shape.json")
                                                                       .read_text())}

    def colours_by_shape(text: str) -> dict:
        out: dict = {}
        for part in text.rstrip(".").split("; "):
            m = re.fullmatch(r"(\w+) (\w+) in (.+)", part.strip())
            if m:
                out.setdefault(singular.get(m.group(2), m.group(2)), []).extend(re.split(r", | and ", m.group(3)))
        return out
    def objects_of(text: str) -> collections.Counter:
        return collections.Counter((s, c) for s, cols in colours_by_shape(text).items() for c in cols)
    right = n = exact = chance = images = shapes_ok = colours_ok = bound_ok = 0
    preds = json.loads(pred_file.read_text())
    for p in preds:
        t = truth[p["question_id"]]
        exact += p["answer"].strip() == t
        want, got = colours_by_shape(t), colours_by_shape(p["answer"])
        objects = sum(len(v) for v in want.values())
        if objects > 1:
            w, g = objects_of(t), objects_of(p["answer"])
            part = lambda c, k: collections.Counter(o[k] for o in c.elements())      # noqa: E731
            images += 1
            shapes_ok += part(w, 0) == part(g, 0)
            colours_ok += part(w, 1) == part(g, 1)
            bound_ok += w == g
        for shape, cols in want.items():
            if len(cols) == 1 and objects > 1:
                n += 1
                right += got.get(shape) == cols
                chance += 1 / objects
    return {"pred": str(pred_file), "answers": len(preds), "exact": round(exact / max(len(preds), 1), 3),
            "objects": n, "colour_right": round(right / max(n, 1), 3), "chance": round(chance / max(n, 1), 3),
            "images_2plus": images, "shapes_right": round(shapes_ok / max(images, 1), 3),
            "colours_right": round(colours_ok / max(images, 1), 3),
            "objects_right": round(bound_ok / max(images, 1), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a Setokim run (its SeTok and token statistics)")
    ap.add_argument("--describe", help="only score this `setok ask` file of val/describe_shape.json")
    ap.add_argument("--data", required=True, help="a shapes world (train/ and val/)")
    ap.add_argument("--prefix", type=int, nargs="+", default=[0, 34])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/lookup_probe.json")
    a = ap.parse_args()
    if a.describe:
        print(json.dumps(describe_accuracy(Path(a.describe), Path(a.data))))
        return
    if not a.model:
        ap.error("--model is needed (or --describe)")
    torch.set_num_threads(a.threads)
    from setok_cli.models.setokim import Setokim
    model = Setokim.from_pretrained(a.model).eval()
    tr = lookups(collect(model, Path(a.data) / "train", 2000))
    va = lookups(collect(model, Path(a.data) / "val", 250))
    res = {"model": a.model, "train_lookups": len(tr), "val_lookups": len(va),
           "val_chance": round(float(np.mean([1 / s[4] for s in va])), 3), "runs": []}
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}), flush=True)
    for p in a.prefix:
        res["runs"] += run(tr, va, p, a.steps, a.batch, a.seed)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
