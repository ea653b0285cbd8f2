"""SeTok at a token budget in the bench-reduce accuracy protocol: the two ways it can meet a
budget, side by side, with the same fine-tune as every row of `setok bench-reduce`.

  fixed  the budget's best density-peak scores seed as many clusters (paper Table 5)
  split  the natural clusters (the scope loop), the largest cut in two at its median until
         the budget (`reducers.split_to_budget`)

    python benchmarks/reduce_setok_budget.py --mode split --jobs 2 \
        --baseline benchmarks/results/accuracy/bench_reduce.json --out benchmarks/results/setok_budget

Runs the fine-tunes of the given mode(s) and prints val and test accuracy per budget beside
the baseline file's rows (the same protocol, data and seeds; `fixed` there is setok's row).
Choose a mode on val. `--merge` then writes the baseline file's table with setok's budget rows
from the given mode (the fixed rows kept as `setok-fixed`), its goals and its plot:

    python benchmarks/reduce_setok_budget.py --merge split --plot docs/bench_reduce.png
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from setok_cli.bench.reduce.accuracy import ACCURACY_BUDGETS, Protocol, World, _finetune_job, load_world  # noqa: E402
from setok_cli.integrations.llava import BuiltinTower  # noqa: E402
from setok_cli.integrations.reducers import reduce_features  # noqa: E402


def tokens_of(feats, budget, mode, batch=64):
    out = []
    for i in range(0, feats.shape[0], batch):
        out += reduce_features(feats[i:i + batch], "setok", budget, setok_budget=mode)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/shapes")
    ap.add_argument("--mode", action="append", choices=["fixed", "split"], help="repeatable (default: split)")
    ap.add_argument("--budgets", default=",".join(map(str, ACCURACY_BUDGETS)))
    ap.add_argument("--baseline", default="benchmarks/results/accuracy/bench_reduce.json")
    ap.add_argument("--out", default="benchmarks/results/setok_budget")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--merge", choices=["split"], help="no fine-tunes: merge OUT/setok_budget.json's rows of "
                                                       "this mode into the baseline table (OUT/bench_reduce.json)")
    ap.add_argument("--plot", help="with --merge: the accuracy plot (PNG)")
    args = ap.parse_args()
    if args.merge:
        return merge(Path(args.baseline), Path(args.out), args.merge, args.plot)
    modes, budgets = args.mode or ["split"], [int(b) for b in args.budgets.split(",")]
    protocol, out = Protocol(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = load_world(args.data, protocol, BuiltinTower())
    lite = World(world.tokenizer, world.image_token_id, world.pad_id,
                 {s: {k: v for k, v in sp.items() if k != "feats"} for s, sp in world.splits.items()})
    jobs = []
    for mode in modes:
        for b in budgets:
            toks = {s: tokens_of(sp["feats"], b, mode) for s, sp in world.splits.items()}
            assert all(t.shape[0] == b for t in toks["test"])
            jobs.append(((mode, b), (lite, toks, protocol, out, f"setok-{mode}_{b}", 1)))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = dict(zip([k for k, _ in jobs], pool.map(_finetune_job, [j for _, j in jobs])))
    base = json.loads(Path(args.baseline).read_text())
    runs = (base.get("accuracy") or base)["runs"]
    rows = []
    for b in budgets:
        best = max((r for r in runs if r["budget"] == b and r["method"] != "setok"), key=lambda r: r["val_accuracy"])
        top = max((r for r in runs if r["budget"] == b and r["method"] != "setok"), key=lambda r: r["accuracy"])
        fixed = next(r for r in runs if r["budget"] == b and r["method"] == "setok")
        row = {"budget": b, "fixed (baseline file)": {"val": fixed["val_accuracy"], "test": fixed["accuracy"]},
               "best baseline on val": {"method": best["method"], "val": best["val_accuracy"],
                                        "test": best["accuracy"]},
               "best baseline on test": {"method": top["method"], "val": top["val_accuracy"], "test": top["accuracy"]}}
        for mode in modes:
            r = results[(mode, b)]
            row[mode] = {"val": r["val_accuracy"], "test": r["test"]["accuracy"], "steps_chosen": r["steps_chosen"],
                         "train_seconds": r["train_seconds"],
                         "per_type": {k.split("/")[1]: v for k, v in r["test"].items() if k.startswith("accuracy/")}}
        rows.append(row)
    res = {"protocol": protocol.__dict__, "modes": modes, "rows": rows, "seconds": time.perf_counter() - t0,
           "threads_per_job": 1, "jobs": args.jobs, "torch": torch.__version__}
    (out / "setok_budget.json").write_text(json.dumps(res, indent=1))
    print(f"{'budget':>6} | " + " | ".join(f"{m} val / test" for m in modes) + " | setok fixed (file) val / test"
          " | best baseline on test (val / test)")
    for r in rows:
        cells = [f"{r[m]['val']:.3f} / {r[m]['test']:.3f}" for m in modes]
        f, t = r["fixed (baseline file)"], r["best baseline on test"]
        print(f"{r['budget']:>6} | " + " | ".join(cells) + f" | {f['val']:.3f} / {f['test']:.3f} | "
              f"{t['method']} {t['val']:.3f} / {t['test']:.3f}")
    print(f"wrote {out / 'setok_budget.json'} ({res['seconds']:.0f} s)")


def merge(baseline: Path, out: Path, mode: str, plot_path) -> None:
    from setok_cli.bench.reduce.accuracy import accuracy_goals
    from setok_cli.bench.reduce.plot import plot
    base = json.loads(baseline.read_text())
    acc = base.get("accuracy") or base
    got = {r["budget"]: r[mode] for r in json.loads((out / "setok_budget.json").read_text())["rows"]}
    runs = []
    for r in acc["runs"]:
        if r["method"] == "setok" and r["budget"] in got:
            runs.append(dict(r, method="setok-fixed"))
            g = got[r["budget"]]
            runs.append({"method": "setok", "budget": r["budget"], "setok_budget": mode,
                         "tokens_mean": float(r["budget"]), "tokens_min": r["budget"], "tokens_max": r["budget"],
                         "run": f"setok-{mode}_{r['budget']}", "accuracy": g["test"], "val_accuracy": g["val"],
                         "steps_chosen": g["steps_chosen"], "train_seconds": g["train_seconds"],
                         "per_type": g["per_type"]})
        else:
            runs.append(r)
    merged = dict(acc, runs=runs)
    res = {"source": {"baselines": str(baseline), "setok_budget_rows": str(out / "setok_budget.json")},
           "accuracy": merged, "accuracy_goals": accuracy_goals(merged)}
    (out / "bench_reduce.json").write_text(json.dumps(res, indent=1))
    if plot_path:
        plot(merged, plot_path)
    for g in res["accuracy_goals"]["per_budget"]:
        print(f"budget {g['budget']}: setok {g['setok']:.3f}, best baseline {g['best_baseline']} "
              f"{g['best_baseline_accuracy']:.3f} ({g['margin_points']:+.1f} points, met: {g['met']})")
    n = res["accuracy_goals"].get("natural")
    if n:
        print(f"natural ({n['tokens_mean']:.1f} tokens): {n['setok']:.3f} against all 576: {n['full_576']:.3f} "
              f"(met: {n['met']})")
    print(f"wrote {out / 'bench_reduce.json'}" + (f" and {plot_path}" if plot_path else ""))


if __name__ == "__main__":
    main()
