"""How long should `setok bench-reduce`'s accuracy fine-tunes be? A val-only learning curve.

    python benchmarks/reduce_protocol_pilot.py --method pool2d --budget 64 --steps 3000 \
        [--hidden 64 --layers 2] [--every 500] [--data data/shapes] [--threads 2]

One run of the bench's protocol (`setok_cli.bench.reduce.accuracy`: the same tiny LLaVA, data,
batches and schedule) with the given reducer, budget, length and model size, scoring val
every --every steps. It never answers a test question: the bench's protocol length was chosen
from this curve, on a baseline reducer (pool2d), before any test figure of the new length
existed. Prints one line per val checkpoint and a JSON summary.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="pool2d")
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--data", default="data/shapes")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from setok_cli.bench.reduce import accuracy as A
    from setok_cli.integrations.llava import BuiltinTower

    p = dataclasses.replace(A.Protocol(), hidden=a.hidden, layers=a.layers, intermediate=2 * a.hidden,
                            steps=a.steps, eval_steps=tuple(range(a.every, a.steps + 1, a.every)))
    world = A.load_world(a.data, p, BuiltinTower())
    world.splits["test"] = world.splits["val"]  # finetune's closing test answers go to val: test stays unseen
    tokens = {s: A.reduce_world(sp["feats"], a.method, a.budget) for s, sp in world.splits.items()}
    curve = []
    score = A.score

    def scored(world, split, preds, out_dir, name):
        r = score(world, split, preds, out_dir, name)
        if ".val" in name:
            step = int(name.rsplit(".val", 1)[1])
            types = {k.split("/")[1]: round(v, 3) for k, v in r.items() if k.startswith("accuracy/")}
            curve.append({"step": step, "val_accuracy": round(r["accuracy"], 4), "per_type": types})
            print(f"step {step:6d}  val {r['accuracy']:.4f}  " + "  ".join(
                f"{k} {v:.3f}" for k, v in curve[-1]["per_type"].items()), flush=True)
        return r

    A.score = scored
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        r = A.finetune(world, tokens, p, Path(tmp), "pilot")
    print(json.dumps({"method": a.method, "budget": a.budget, "hidden": a.hidden, "layers": a.layers,
                      "steps": a.steps, "threads": a.threads, "seconds": round(time.perf_counter() - t0, 1),
                      "final_loss": round(r["final_loss"], 4), "val_curve": curve}))


if __name__ == "__main__":
    main()
