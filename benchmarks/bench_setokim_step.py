"""A Setokim training step (forward + backward) with `train.length_groups` 1 against G, in one process.

    python benchmarks/bench_setokim_step.py recipes/tiny/stage3.yaml [--groups 4] [--batches 12]
        [--repeats 3] [--threads 2] [--precision no|bf16] [--versus-bf16] [--versus-compile] [--versus-prefix]

`--versus-bf16` times float32 against bf16 autocast instead, both at G groups: whether bf16
pays on this CPU for this model (`train.mixed_precision: auto` picks it wherever the CPU has
bf16 units). `--versus-compile` times the LM eager against `torch.compile(dynamic=True)` of
its decoder (the toolkit trains eager), both at G groups, with the compile time and the largest
loss difference. `--versus-prefix` times every row run whole against the prefix all rows share (BOS and the
system prompt) run once (`train.shared_prefix`), both at G groups, with the shared length and the largest loss
difference.

The recipe's model and mixture, its batch size; the batches' image tokens and region targets
are computed before timing (the trainer caches them too), so only the step is timed. Each
batch runs with 1 group and with G groups, alternating, `--repeats` times; reported: the
median step time of each, their ratio, the padded positions the LM computed, and the largest
loss difference between the two (they compute the same loss). Name the CPU (`lscpu`) with
the figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def recipe_batches(recipe: str, sets: list, batches: int):
    """The recipe's stage model (trainable parameters selected, in training mode) and its first `batches` batches in
    the trainer's seeded order, collated as the trainer's samples (looks and diffs included) -> (recipe, model,
    [Setokim.forward keyword arguments])."""
    import importlib

    from setok_cli.train.recipe import load_recipe
    from setok_cli.train.trainer import STAGES, select_trainable
    r = load_recipe(recipe, sets)
    mod, build = STAGES[r.stage].split(":")
    model, ds = getattr(importlib.import_module(mod), build)(r)
    select_trainable(model, r.train.trainable, r.train.frozen)
    model.train()
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(r.seed)).tolist()
    bs, m = r.data.batch_size, model.setokim
    return r, model, [m.collate(model.samples(ds.collate([ds[i] for i in order[b * bs:(b + 1) * bs]])))
                      for b in range(batches)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["no", "bf16"], default="no")
    ap.add_argument("--versus-bf16", action="store_true", help="float32 against bf16 autocast, both at --groups")
    ap.add_argument("--versus-compile", action="store_true", help="the LM eager against torch.compile, at --groups")
    ap.add_argument("--versus-prefix", action="store_true", help="whole rows against the shared prefix run once")
    ap.add_argument("--set", action="append", default=[], help="recipe overrides, as `setok train --set`")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    r, model, inputs = recipe_batches(a.recipe, a.set, a.batches)
    m = model.setokim

    def step(kw, groups, precision=a.precision, prefix=False):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(0)            # the same training-time draws (place_dropout) for every grouping
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = m(**kw, row_groups=groups, prefix=prefix)
        out.loss.backward()
        return time.perf_counter() - t, float(out.loss.detach())

    if a.versus_bf16:
        return _versus_bf16(a, inputs, step)
    if a.versus_compile:
        return _versus_compile(a, inputs, step, m)
    if a.versus_prefix:
        return _versus_prefix(a, inputs, step, m)
    from setok_cli.models.setokim.splice import length_groups
    times = {1: [], a.groups: []}
    diff, padded = 0.0, {1: 0, a.groups: 0}
    for kw in inputs[:2]:                                   # warm-up
        step(kw, 1), step(kw, a.groups)
    for _ in range(a.repeats):
        for kw in inputs:
            t1, l1 = step(kw, 1)
            tg, lg = step(kw, a.groups)
            times[1].append(t1)
            times[a.groups].append(tg)
            diff = max(diff, abs(l1 - lg))
    for kw in inputs:
        sp = m.splice(kw["input_ids"], kw["labels"], kw["attention_mask"], kw["image_token_mask"])
        lengths = sp.attention_mask.sum(1)
        padded[1] += sp.attention_mask.numel()
        padded[a.groups] += sum(len(p) * int(lengths[p].max()) for p in length_groups(lengths, a.groups))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"recipe": a.recipe, "batch_size": r.data.batch_size, "batches": a.batches, "repeats": a.repeats,
                      "threads": a.threads, "precision": a.precision,
                      "median_step_s": {str(k): round(v, 4) for k, v in med.items()},
                      "speedup": round(med[1] / med[a.groups], 3),
                      "lm_positions": {str(k): v for k, v in padded.items()},
                      "max_loss_difference": diff}, indent=1))


def _alternate(inputs, runs: dict, repeats: int) -> tuple[dict, float]:
    """runs: name -> fn(batch) -> (seconds, loss), each called on every batch in turn, `repeats` times
    -> (the median seconds of each, the largest loss difference between them on one batch)."""
    times, diff = {k: [] for k in runs}, 0.0
    for _ in range(repeats):
        for kw in inputs:
            losses = []
            for name, fn in runs.items():
                dt, loss = fn(kw)
                times[name].append(dt)
                losses.append(loss)
            diff = max(diff, max(losses) - min(losses))
    return {k: statistics.median(v) for k, v in times.items()}, diff


def _versus_bf16(a, inputs, step) -> None:
    """float32 and bf16 autocast steps alternated over the same batches; medians and ratio."""
    for kw in inputs[:2]:                                   # warm-up
        step(kw, a.groups, "no"), step(kw, a.groups, "bf16")
    med, _ = _alternate(inputs, {p: (lambda kw, p=p: step(kw, a.groups, p)) for p in ("no", "bf16")}, a.repeats)
    print(json.dumps({"recipe": a.recipe, "batch_size": len(inputs[0]["input_ids"]), "batches": a.batches,
                      "repeats": a.repeats, "threads": a.threads, "groups": a.groups,
                      "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "median_step_s": {k: round(v, 4) for k, v in med.items()},
                      "bf16_over_fp32": round(med["bf16"] / med["no"], 3)}, indent=1))


def _versus_prefix(a, inputs, step, m) -> None:
    """Whole rows and the shared prefix run once, alternated over the same batches; medians, ratio, lengths."""
    from setok_cli.models.setokim.splice import shared_prefix
    for kw in inputs[:2]:                                   # warm-up
        step(kw, a.groups), step(kw, a.groups, prefix=True)
    med, diff = _alternate(inputs, {k: (lambda kw, p=p: step(kw, a.groups, prefix=p))
                                    for k, p in (("whole rows", False), ("shared prefix", True))}, a.repeats)
    shared, lengths = [], []
    with torch.no_grad():
        for kw in inputs:
            sp = m.splice(kw["input_ids"], kw["labels"], kw["attention_mask"], kw["image_token_mask"])
            emb = m.embed(sp, kw["image_tokens"], kw["image_token_mask"], kw.get("image_token_seeds"))
            shared.append(shared_prefix(emb, sp.attention_mask, sp.position_ids))
            lengths.append(float(sp.attention_mask.sum(1).float().mean()))
    print(json.dumps({"recipe": a.recipe, "batch_size": len(inputs[0]["input_ids"]), "batches": a.batches,
                      "repeats": a.repeats, "threads": a.threads, "groups": a.groups, "precision": a.precision,
                      "shared_positions": statistics.median(shared),
                      "mean_row_length": round(statistics.mean(lengths), 1),
                      "median_step_s": {k: round(v, 4) for k, v in med.items()},
                      "whole_over_shared": round(med["whole rows"] / med["shared prefix"], 3),
                      "max_loss_difference": diff}, indent=1))


def _versus_compile(a, inputs, step, m) -> None:
    """Eager and compiled LM steps alternated over the same batches; medians, ratio, compile time."""
    dec = m.lm.get_decoder()
    compiled = torch.compile(dec, dynamic=True)
    eager_hidden = m.hidden

    def compiled_hidden(inputs_embeds, attention_mask, position_ids, **kw):
        return compiled(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kw)

    modes = {"eager": eager_hidden, "compiled": compiled_hidden}

    def run(fn):
        def one(kw):
            m.hidden = fn
            return step(kw, a.groups)
        return one

    warm = {}
    for name, fn in modes.items():                           # warm-up (first_3_steps_s); the compiled one compiles here
        t = time.perf_counter()
        for kw in inputs[:3]:
            run(fn)(kw)
        warm[name] = time.perf_counter() - t
    med, diff = _alternate(inputs, {name: run(fn) for name, fn in modes.items()}, a.repeats)
    del m.hidden                                             # the class's method again
    print(json.dumps({"recipe": a.recipe, "batch_size": len(inputs[0]["input_ids"]), "batches": a.batches,
                      "repeats": a.repeats, "threads": a.threads, "groups": a.groups, "precision": a.precision,
                      "first_3_steps_s": {k: round(v, 1) for k, v in warm.items()},
                      "median_step_s": {k: round(v, 4) for k, v in med.items()},
                      "eager_over_compiled": round(med["eager"] / med["compiled"], 3),
                      "max_loss_difference": diff}, indent=1))


if __name__ == "__main__":
    main()
