"""What a stage II / III run spends on SeTok outside the LM step: the region targets up front, then
each batch's samples (token sets, looks, diffs), with each image's SeTok output reused
(`ImageTokenCache`, the trainer's way) against tokenized again wherever it is needed (before it).

    python benchmarks/stage_tokens.py recipes/tiny/stage3_relations.yaml --batches 300 [--threads 2]
        [--set model.setokim_from=runs/tiny-stage2-s1fp32]

The recipe's model, mixture, batch size and data order (the trainer's seeded sampler); the two
ways run one after the other in one process over the same batches, each from an empty cache, and
must give the same samples (checked: every written token equal). Reported: seconds and images
through SeTok for the region targets and for the batches, per way, and their ratio. Name the CPU
(`lscpu`) with the figures.
"""
from __future__ import annotations

import argparse
import importlib
import json
import time

import torch


def _run(model, ds, batches, reuse: bool) -> tuple[dict, list]:
    from setok_cli.train.stage2 import Stage2Model
    sm = Stage2Model(model.setokim, row_groups=model.row_groups)
    sm.reuse_outputs = reuse
    seen = []
    setok = model.setokim.setok
    fwd = setok.forward                      # every SeTok pass (tokenize and the region targets' read_images)
    setok.forward = lambda px, *a, **k: seen.append(int(px.shape[0])) or fwd(px, *a, **k)
    try:
        t = time.perf_counter()
        sm.fit_region_targets(ds, progress=False)
        up_front, n_up = time.perf_counter() - t, sum(seen)
        t, written = time.perf_counter(), []
        for batch in batches:
            written.append([torch.cat([x.reshape(-1) for x in s["images"]]) for s in sm.samples(batch)])
        steps = time.perf_counter() - t
    finally:
        del setok.forward
    return ({"region_targets_s": round(up_front, 2), "region_targets_images": n_up,
             "batches_s": round(steps, 2), "batches_images": sum(seen) - n_up,
             "total_s": round(up_front + steps, 2)}, written)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="recipe overrides, as `setok train --set`")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from setok_cli.data.datasets import SeededSampler
    from setok_cli.train.recipe import load_recipe
    from setok_cli.train.trainer import STAGES

    r = load_recipe(a.recipe, a.set)
    if r.stage not in ("stage2", "stage3"):
        raise SystemExit(f"error: {a.recipe} is a {r.stage} recipe; this measures stage2 and stage3")
    mod, build = STAGES[r.stage].split(":")
    model, ds = getattr(importlib.import_module(mod), build)(r)
    order, bs = list(SeededSampler(len(ds), seed=r.seed)), r.data.batch_size
    batches = [ds.collate([ds[i] for i in order[b * bs:(b + 1) * bs]]) for b in range(a.batches)]
    with torch.no_grad():
        before, want = _run(model, ds, batches, reuse=False)
        after, got = _run(model, ds, batches, reuse=True)
    same = all(len(x) == len(y) and all(torch.allclose(p, q, atol=1e-5) for p, q in zip(x, y))
               for x, y in zip(want, got))
    print(json.dumps({"recipe": a.recipe, "batch_size": bs, "batches": a.batches, "threads": a.threads,
                      "tokenized_again": before, "reused": after,
                      "speedup": round(before["total_s"] / after["total_s"], 3), "same_samples": same}, indent=1))


if __name__ == "__main__":
    main()
