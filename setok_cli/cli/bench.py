"""`setok bench-kernels`: the clustering pipeline against the GEMM floor."""
from __future__ import annotations

import json

import click


@click.command("bench-kernels")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--quick", is_flag=True, help="Two small shapes, three rounds.")
@click.option("--rounds", type=click.IntRange(1, 100), default=None, help="Timed rounds per contender.")
@click.option("--profile", is_flag=True, help="Instead: the cpu pipeline's time split into its phases, per shape.")
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="Torch threads (default: torch's). With 1, the ratios measure work alone, free of the "
                   "scheduling delays that other jobs on the machine add to every multi-threaded call.")
def bench_kernels(as_json: bool, quick: bool, rounds, profile: bool, threads):
    """Time density + delta + score + scope loop per backend, as medians, vs one x @ x^T."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from rich.console import Console
    from rich.table import Table

    from ..bench import kernels

    console = Console(stderr=as_json, width=None if Console().is_terminal else 150)

    def fmt(v, nd=2):
        return "-" if v is None else f"{v:.{nd}f}"

    if profile:
        import torch

        rows = [kernels.profile_phases(B, N, D, rounds=rounds or 9)
                for (B, N, D) in (kernels.QUICK_SHAPES if quick else kernels.SHAPES)]
        if as_json:
            click.echo(json.dumps({"threads": torch.get_num_threads(), "shapes": rows}))
            return
        table = Table(title=f"cpu pipeline by phase (ms, medians of {rounds or 9}), {torch.get_num_threads()} threads")
        for col in ["B", "N", "D", "GEMM floor", "cpu", "cpu / GEMM", "phases"]:
            table.add_column(col, justify="right" if col != "phases" else "left")
        for r in rows:
            split = "  ".join(f"{k} {v:.3f}" for k, v in r["phases_ms"].items())
            if r["tasks_ms"]:
                split += "  | in the region, thread-ms: " + "  ".join(f"{k} {v:.3f}" for k, v in r["tasks_ms"].items())
            table.add_row(str(r["B"]), str(r["N"]), str(r["D"]), fmt(r["gemm_ms"], 3), fmt(r["cpu_ms"], 3),
                          fmt(r["cpu_ms"] / r["gemm_ms"]) + "x", split)
        console.print(table)
        return

    with console.status("benchmarking...") as status:
        def progress(row):
            status.update(f"done ({row['B']}, {row['N']}, {row['D']})")
        result = kernels.run(quick=quick, rounds=rounds, progress=progress)
    if as_json:
        click.echo(json.dumps(result))
        return
    table = Table(title=f"SeTok clustering pipeline (k=5, max_clusters=64, hard), {result['threads']} threads, "
                        f"median of {result['rounds']} rounds")
    for col in ["B", "N", "D", "GEMM ms", "GEMM GFLOP/s", "reference ms", "cpu ms", "cuda ms",
                "cpu / GEMM", "reference / cpu", "peak MB ref", "peak MB cpu"]:
        table.add_column(col, justify="right")
    for r in result["shapes"]:
        ratio = None if r["cpu_ms"] is None else r["cpu_ms"] / r["gemm_ms"]
        speed = None if r["cpu_ms"] is None or r["reference_ms"] is None else r["reference_ms"] / r["cpu_ms"]
        table.add_row(str(r["B"]), str(r["N"]), str(r["D"]), fmt(r["gemm_ms"]), fmt(r["gemm_gflops"], 1),
                      fmt(r["reference_ms"]), fmt(r["cpu_ms"]), fmt(r["cuda_ms"]),
                      fmt(ratio) + "x" if ratio else "-", fmt(speed) + "x" if speed else "-",
                      fmt(r["reference_peak_mb"], 1), fmt(r["cpu_peak_mb"], 1))
    console.print(table)
