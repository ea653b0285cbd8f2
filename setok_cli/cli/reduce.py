"""`setok bench-reduce`: SeTok against the visual-token reducers users pick today, inside a
LLaVA-style model: what each costs (FLOPs, prefill time, KV cache, its own time) and what
it keeps (VQA accuracy of a tiny LLaVA fine-tuned per reducer and budget)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import UserError


def _methods(text):
    from ..integrations.reducers import METHODS
    if text is None:
        return list(METHODS)
    ms = [m.strip() for m in text.split(",") if m.strip()]
    for m in ms:
        if m not in METHODS:
            raise UserError(f"unknown reducer {m!r} in --methods; choose from {', '.join(METHODS)}")
    if not ms:
        raise UserError("--methods is empty")
    return ms


@click.command("bench-reduce")
@click.option("--quick", is_flag=True, help="A subset of the world, short fine-tunes, budgets 16 and 64, a 1-layer "
                                            "7B-shaped model, one timing round (about 3 minutes).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("--out", "out_dir", default="benchmarks/results", show_default=True, type=click.Path(file_okay=False),
              help="Folder for bench_reduce.json.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Where the accuracy plot goes (default: OUT/bench_reduce.png).")
@click.option("--model", "model_folder", type=click.Path(), metavar="LLAVA_FOLDER",
              help="A local LLaVA-1.5 folder (e.g. llava-1.5-7b-hf) to time as well.")
@click.option("--data", default="data/shapes", show_default=True, type=click.Path(),
              help="The synthetic world (`setok data shapes --out DIR`).")
@click.option("--methods", help="Comma-separated reducers (default: all).")
@click.option("--skip-accuracy", is_flag=True, help="Only the cost half.")
@click.option("--skip-cost", is_flag=True, help="Only the accuracy half.")
@click.option("--layers", type=click.IntRange(1, 32), help="Decoder layers of the 7B-shaped model (default 2; quick 1).")
@click.option("--steps", type=click.IntRange(2, 100000), help="Fine-tune steps per run (default: the protocol's).")
@click.option("--threads", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Torch threads (1: the figures measure work alone on a shared machine).")
@click.option("--jobs", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Accuracy fine-tunes run at once, each on max(1, threads // jobs) threads (same figures).")
def bench_reduce(quick, as_json, out_dir, plot_path, model_folder, data, methods, skip_accuracy, skip_cost, layers,
                 steps, threads, jobs):
    """Cost and accuracy of SeTok and five other visual-token reducers in a LLaVA-style model."""
    import dataclasses
    import tempfile

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..bench import reduce as R
    from ..files import atomic_write_json, ensure_dir

    torch.set_num_threads(threads)
    ms = _methods(methods)
    if skip_accuracy and skip_cost:
        raise UserError("--skip-accuracy and --skip-cost together leave nothing to run")
    if model_folder is not None:
        from ..tasks.llava import _check_folder
        _check_folder(model_folder)
    if not skip_accuracy and not Path(data).is_dir():
        raise UserError(f"--data {data}: no such folder (make the world with `setok data shapes --out {data}`)")
    protocol = None
    if steps is not None:
        base = R.quick_protocol() if quick else R.Protocol()
        thirds = tuple(sorted({max(1, steps * k // 3) for k in (1, 2, 3)}))  # val checkpoints, as the default's
        protocol = dataclasses.replace(base, steps=steps, eval_steps=thirds)
    out = ensure_dir(out_dir)
    err = Console(file=sys.stderr)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        tasks = {}

        def progress(kind, *a):
            if kind == "features":
                what, n, tot = a
                if what not in tasks:
                    tasks[what] = bar.add_task(what, total=tot)
                bar.advance(tasks[what], n)
            elif kind == "run":
                name, total = a
                if "run" in tasks:
                    bar.remove_task(tasks["run"])
                tasks["run"] = bar.add_task(f"fine-tune {name}", total=total)
            elif kind == "step":
                bar.advance(tasks["run"], a[0])
            elif kind == "runs":
                tasks["runs"] = bar.add_task(f"fine-tunes, {jobs} at a time", total=a[0])
            elif kind == "run done":
                bar.advance(tasks["runs"], 1)
            elif kind == "cost":
                if "cost" not in tasks:
                    tasks["cost"] = bar.add_task(a[0], total=None)
                bar.update(tasks["cost"], description=a[0])

        with tempfile.TemporaryDirectory(prefix="bench-reduce-") as tmp:
            result = R.run(data if not skip_accuracy else (data if Path(data).is_dir() else None), Path(tmp),
                           quick=quick, model_folder=model_folder, methods=ms, skip_accuracy=skip_accuracy,
                           skip_cost=skip_cost, protocol=protocol, layers=layers, progress=progress,
                           jobs=jobs)
    json_path = out / "bench_reduce.json"
    if "accuracy" in result:
        png = Path(plot_path) if plot_path else out / "bench_reduce.png"
        R.plot(result["accuracy"], png)
        result["plot"] = str(png)
    atomic_write_json(json_path, result)
    if as_json:
        click.echo(json.dumps(result))
        return
    print_tables(result, Console(width=None if Console().is_terminal else 160))
    click.echo(f"-> {json_path}" + (f", {result['plot']}" if "plot" in result else ""))


def print_tables(result: dict, console) -> None:
    """The rich tables of a bench-reduce result."""
    from rich.table import Table

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    if "accuracy" in result:
        acc = result["accuracy"]
        p = acc["protocol"]
        t = Table(title=f"VQA accuracy, synthetic world test ({acc['questions']['test']} questions), tiny LLaVA "
                        f"(Llama {p['layers']}x{p['hidden']}), {p['steps']} steps per run, length chosen on val")
        for c in ["method", "budget", "tokens / image", "test acc %", "val acc %", "steps", "color", "shape",
                  "count", "exist", "relation"]:
            t.add_column(c, justify="left" if c == "method" else "right")
        for r in acc["runs"]:
            pt = r.get("per_type", {})
            b = "576 (all)" if r["method"] == "full" else ("natural" if r["budget"] is None else str(r["budget"]))
            t.add_row(r["method"] + ("*" if r.get("importance") else ""), b,
                      f"{r['tokens_mean']:.1f}" + (f" ({r['tokens_min']}-{r['tokens_max']})"
                                                   if r["tokens_min"] != r["tokens_max"] else ""),
                      pct(r.get("accuracy")), pct(r.get("val_accuracy")), str(r.get("steps_chosen", "-")),
                      *[pct(pt.get(k)) for k in ("color", "shape", "count", "exist", "relation")])
        console.print(t)
        if any(r.get("importance") for r in acc["runs"]):
            console.print(f"* importance: {acc['runs'][-1].get('importance') or ''}".rstrip())
        g = result.get("accuracy_goals", {})
        for row in g.get("per_budget", []):
            console.print(f"budget {row['budget']}: setok {pct(row['setok'])}% vs best baseline "
                          f"{row['best_baseline']} {pct(row['best_baseline_accuracy'])}% "
                          f"({row['margin_points']:+.1f} points) -> {'met' if row['met'] else 'missed'}")
        if "natural" in g:
            n = g["natural"]
            console.print(f"setok natural ({n['tokens_mean']:.1f} tokens): {pct(n['setok'])}% vs all 576: "
                          f"{pct(n['full_576'])}% (gap {n['gap_points']:.1f} points, goal <= 2) -> "
                          f"{'met' if n['met'] else 'missed'}")
    if "cost" in result:
        c = result["cost"]
        cfg = c["config"]
        full = next((r for r in c["prefill"] if r["visual_tokens"] == 576), None)
        t = Table(title=f"Prefill of one image + {cfg['text_tokens']} text tokens, {cfg['name']} "
                        f"({cfg['layers']} of {cfg['layers_of_real_model']} layers, random weights, "
                        f"{cfg['dtype']}), {result['threads']} thread(s), {result['cpu']}")
        for col in ["visual tokens", "GFLOPs", "FLOPs vs 576", "prefill ms (median)", "time vs 576", "KV cache MB"]:
            t.add_column(col, justify="right")
        for r in c["prefill"]:
            t.add_row(str(r["visual_tokens"]), f"{r['prefill_flops'] / 1e9:.1f}",
                      f"{full['prefill_flops'] / r['prefill_flops']:.2f}x" if full else "-",
                      f"{r['prefill_ms']:.1f}", f"{full['prefill_ms'] / r['prefill_ms']:.2f}x" if full else "-",
                      f"{r['kv_cache_bytes'] / 2**20:.2f}")
        console.print(t)
        t = Table(title=f"Reducers' own time on one image's 576 tower features (median ms); the tower "
                        f"itself: {c['tower_ms']:.1f} ms")
        for col in ["method", "budget", "tokens", "D", "reducer ms", "prefill saved ms (vs 576)"]:
            t.add_column(col, justify="left" if col == "method" else "right")
        for r in c["reducers"]:
            saved = r.get("prefill_saved_ms")
            t.add_row(r["method"], "natural" if r["budget"] is None else str(r["budget"]), str(r["tokens"]),
                      str(r["D"]), f"{r['reducer_ms']:.2f}", "-" if saved is None else f"{saved:.1f}")
        console.print(t)
        for gr in c["goal"]:
            console.print(f"{gr['images']}: setok {gr['setok_tokens_median']:g} tokens (median of "
                          f"{gr['n_images']}): prefill FLOPs / {gr['flops_ratio']:.1f} (goal 5x: "
                          f"{'met' if gr['flops_goal_met'] else 'missed'}), time to first token "
                          f"{gr['ttft_576_ms']:.0f} -> {gr['ttft_setok_ms']:.0f} ms, / {gr['ttft_ratio']:.1f} "
                          f"(goal 4x: {'met' if gr['ttft_goal_met'] else 'missed'})")
        rm = c.get("real_model") or {}
        if "skipped" in rm:
            console.print(f"real LLaVA-1.5-7B: skipped ({rm['skipped']})")
        elif rm:
            ks = "  ".join(f"{r['visual_tokens']}: {r['prefill_ms']:.0f} ms" for r in rm["prefill"])
            console.print(f"{rm['folder']} ({rm['dtype']}) prefill by visual tokens: {ks}")
            for ph in rm["photos"]:
                console.print(f"  {ph['image']}: setok {ph['setok_tokens']} tokens, time to first token "
                              f"{ph['ttft_full_ms']:.0f} -> {ph['ttft_setok_ms']:.0f} ms (/ {ph['ttft_ratio']:.1f})")
