"""`setok bench-kernels`: the clustering pipeline against the GEMM floor."""
from __future__ import annotations

import json

import click


@click.command("bench-kernels")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--quick", is_flag=True, help="Two small shapes, three rounds.")
@click.option("--rounds", type=click.IntRange(1, 100), default=None, help="Timed rounds per contender.")
def bench_kernels(as_json: bool, quick: bool, rounds):
    """Time density + delta + score + scope loop per backend, as medians, vs one x @ x^T."""
    from rich.console import Console
    from rich.table import Table

    from ..bench import kernels

    console = Console(stderr=as_json, width=None if Console().is_terminal else 150)

    def fmt(v, nd=2):
        return "-" if v is None else f"{v:.{nd}f}"

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
