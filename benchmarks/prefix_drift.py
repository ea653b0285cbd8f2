"""Does `train.shared_prefix` train the same model as whole rows? Their parameters after N optimizer steps, in float32
and in float64, against the drift that rounding alone makes.

    python benchmarks/prefix_drift.py recipes/tiny/stage3.yaml --steps 40 [--batches 8] \\
        --set model.setokim_from=runs/tiny-stage2-s1fp32 --set model.text_first=null

The recipe's model, trainable parameters and AdamW (its lr, constant: no warm-up) train N steps over the same
batches (cycled) from the same start, five ways: whole rows and the shared prefix, each with the model in float32 and
in float64 (the losses and heads still cast to float32 where the model does so), and whole rows in float32 on 1 thread
instead of 2 (the same sums in another order). Printed: each way's last loss and, per pair, the largest parameter
difference relative to that parameter's largest value. AdamW divides each gradient by its own running size, so a
rounding difference in a near-zero gradient moves a parameter by up to the learning rate: the pairs drift apart
from rounding alone, and the question is by how much, against the float64 pair and the thread-count pair.
"""
from __future__ import annotations

import argparse
import copy
import json

import torch


def train(model, inputs, steps: int, lr: float, prefix: bool, dtype: torch.dtype, threads: int, groups: int):
    """A copy of `model` trained `steps` AdamW steps over `inputs` -> (its trainable parameters, the last loss)."""
    torch.set_num_threads(threads)
    m = copy.deepcopy(model).to(dtype)
    params = {n: p for n, p in m.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    loss = float("nan")
    for k in range(steps):
        kw = {key: (v.to(dtype) if v.is_floating_point() else v) for key, v in inputs[k % len(inputs)].items()}
        torch.manual_seed(k)                                  # the same training-time draws each way
        out = m(**kw, row_groups=groups, prefix=prefix)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        loss = float(out.loss.detach())
    return {n: p.detach().double() for n, p in params.items()}, loss


def apart(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max() / a[n].abs().max().clamp_min(1e-12)) for n in a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--set", action="append", default=[], help="recipe overrides, as `setok train --set`")
    a = ap.parse_args()
    from bench_setokim_step import recipe_batches         # benchmarks/, beside this script
    r, model, inputs = recipe_batches(a.recipe, a.set, a.batches)
    m = model.setokim
    groups = r.train.length_groups
    run = {name: train(m, inputs, a.steps, r.optim.lr, prefix, dtype, threads, groups)
           for name, (prefix, dtype, threads) in {
               "whole fp32": (False, torch.float32, 2), "prefix fp32": (True, torch.float32, 2),
               "whole fp32, 1 thread": (False, torch.float32, 1),
               "whole fp64": (False, torch.float64, 2), "prefix fp64": (True, torch.float64, 2)}.items()}
    pairs = [("whole fp32", "prefix fp32"), ("whole fp32", "whole fp32, 1 thread"), ("whole fp64", "prefix fp64"),
             ("whole fp64", "whole fp32")]
    print(json.dumps({"recipe": a.recipe, "steps": a.steps, "batches": a.batches, "lr": r.optim.lr,
                      "last_loss": {k: v[1] for k, v in run.items()},
                      "largest_relative_parameter_difference": {f"{x} / {y}": apart(run[x][0], run[y][0])
                                                                for x, y in pairs}}, indent=1))


if __name__ == "__main__":
    main()
