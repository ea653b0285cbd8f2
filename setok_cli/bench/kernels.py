"""Timing harness behind `setok bench-kernels`.

For each shape (B, N, D) it times, in the same process and interleaved round by round
(so background load hits every contender alike), after a warm-up:
  - gemm:      one batched x @ x^T of the same shape (the floor: the pipeline needs it);
  - reference: the full pipeline (density, delta, score, scope loop) in plain PyTorch;
  - cpu/cuda:  the same pipeline on the compiled backends.
It reports medians, ratios against the GEMM floor and the reference, achieved GEMM
GFLOP/s, and the peak memory each pipeline allocates on top of its input.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from .. import ops

SHAPES = [(1, 576, 1024), (8, 576, 1024), (8, 576, 64), (4, 2304, 1024)]
QUICK_SHAPES = [(1, 576, 1024), (8, 576, 64)]


@dataclass
class ShapeResult:
    B: int
    N: int
    D: int
    k: int
    gemm_ms: Optional[float] = None
    reference_ms: Optional[float] = None
    cpu_ms: Optional[float] = None
    cuda_ms: Optional[float] = None
    gemm_gflops: Optional[float] = None
    reference_peak_mb: Optional[float] = None
    cpu_peak_mb: Optional[float] = None
    cuda_peak_mb: Optional[float] = None
    reference_ms_all: list = field(default_factory=list)
    cpu_ms_all: list = field(default_factory=list)
    cuda_ms_all: list = field(default_factory=list)
    gemm_ms_all: list = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def peak_memory_mb(B: int, N: int, D: int, backend: str, device: str = "cpu") -> float:
    """Peak memory the pipeline needs above its input, in MiB.

    CUDA: the caching allocator's peak. CPU: measured in a fresh process as the resident-set
    high-water mark during one call (reset just before it) minus the resident set before it (large blocks are mmap'ed and returned
    on free, so this tracks what the pipeline holds at its peak).
    """
    if device == "cuda":
        dev = torch.device("cuda")
        x = torch.randn(B, N, D, device=dev)
        pipeline(x, backend)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        pipeline(x, backend)
        torch.cuda.synchronize(dev)
        return (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from setok_cli.bench.kernels import pipeline\n"
        "def kb(key):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(key): return int(line.split()[1])\n"
        f"x = torch.randn({B}, {N}, {D})\n"
        f"pipeline(torch.randn(1, 8, {D}), {backend!r})\n"  # load kernels / lazy init first
        "try:\n"
        "    open('/proc/self/clear_refs', 'w').write('5')\n"  # reset the high-water mark
        "except OSError:\n"
        "    pass\n"  # not permitted: the mark then also covers the set-up above
        "base = kb('VmRSS:')\n"
        f"pipeline(x, {backend!r})\n"
        "print((kb('VmHWM:') - base) / 1024)\n"
    )
    import os

    # a fixed mmap threshold: every large block goes back to the OS when freed
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def pipeline(x: torch.Tensor, backend: str, k: int = 5, max_clusters: int = 64, bandwidth: float = 1.0):
    with torch.no_grad():
        return ops.dpc_cluster(x, k, bandwidth, max_clusters, hard=True, backend=backend)


def bench_shape(B: int, N: int, D: int, k: int = 5, max_clusters: int = 64, rounds: int = 7,
                device: str = "cpu", backends: Optional[list[str]] = None, memory: bool = True,
                reference_rounds: Optional[int] = None) -> ShapeResult:
    dev = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(B * 1000003 + N * 101 + D)
    x = torch.randn(B, N, D, generator=g).to(dev)
    bw = 1.0  # the loop always runs max_clusters iterations on random features
    backends = backends or ops.available_backends(dev)
    res = ShapeResult(B, N, D, k)
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        contenders: dict[str, Callable[[], object]] = {"gemm": lambda: torch.bmm(x, x.transpose(1, 2))}
        for be in backends:
            contenders[be] = (lambda be=be: pipeline(x, be, k, max_clusters, bw))
        for fn in contenders.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {name: [] for name in contenders}
        ref_rounds = rounds if reference_rounds is None else reference_rounds
        for r in range(rounds):
            for name, fn in contenders.items():
                if name == "reference" and r >= ref_rounds:
                    continue
                times[name].append(_time_once(fn, dev))
        for name, ts in times.items():
            setattr(res, f"{name}_ms", statistics.median(ts))
            setattr(res, f"{name}_ms_all", [round(t, 3) for t in ts])
        res.gemm_gflops = 2.0 * B * N * N * D / (res.gemm_ms * 1e-3) / 1e9
        if memory:
            for be in backends:
                setattr(res, f"{be}_peak_mb", peak_memory_mb(B, N, D, be, dev.type))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    return res


def profile_phases(B: int, N: int, D: int, k: int = 5, max_clusters: int = 64, rounds: int = 9) -> dict:
    """Where the cpu pipeline's time goes at one shape: medians (ms) of each phase the C++
    side records (csrc/torch/profile.h), of the whole `ops.dpc_cluster` call, and of the
    GEMM floor, interleaved round by round. `other` is the call minus its phases: the
    Python wrapper, argument checks and dispatch. `tasks_ms`: for a call that runs the task
    region (fewer images than threads), the medians of the thread-time each kind of task
    took, summed over the threads, and of the time threads waited for another's task."""
    from ..errors import UserError
    from ..ops._ext import _C

    if _C is None:
        raise UserError("--profile needs the compiled ops (pip install --no-build-isolation -e .)")
    g = torch.Generator(device="cpu").manual_seed(B * 1000003 + N * 101 + D)
    x = torch.randn(B, N, D, generator=g)
    phases: dict[str, list[float]] = {}
    tasks: dict[str, list[float]] = {}
    total, floor, other = [], [], []
    _C._set_profile(True)
    try:
        pipeline(x, "cpu", k, max_clusters)  # warm-up
        for _ in range(rounds):
            floor.append(_time_once(lambda: torch.bmm(x, x.transpose(1, 2)), x.device))
            t = _time_once(lambda: pipeline(x, "cpu", k, max_clusters), x.device)
            log = _C._last_profile()
            total.append(t)
            other.append(t - sum(ms for _, ms in log))
            for name, ms in log:
                phases.setdefault(name, []).append(ms)
            for name, ms in _C._last_profile_tasks():
                tasks.setdefault(name, []).append(ms)
    finally:
        _C._set_profile(False)
    med = statistics.median
    return {"B": B, "N": N, "D": D, "gemm_ms": med(floor), "cpu_ms": med(total),
            "phases_ms": {**{name: med(v) for name, v in phases.items()}, "other": med(other)},
            "tasks_ms": {name: med(v) for name, v in tasks.items()}}


def run(quick: bool = False, rounds: Optional[int] = None, shapes=None, progress=None) -> dict:
    shapes = shapes or (QUICK_SHAPES if quick else SHAPES)
    rounds = rounds or (3 if quick else 9)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ops.has_backend("cuda") else [])
    out = {"shapes": [], "threads": torch.get_num_threads(), "torch": torch.__version__,
           "backends": ops.available_backends("cpu") + (["cuda"] if "cuda" in devices else []),
           "rounds": rounds, "k": 5, "max_clusters": 64, "mode": "hard"}
    for (B, N, D) in shapes:
        cpu = bench_shape(B, N, D, rounds=rounds, device="cpu",
                          backends=[b for b in ops.available_backends("cpu")])
        row = asdict(cpu)
        if "cuda" in devices:
            cu = bench_shape(B, N, D, rounds=rounds, device="cuda", backends=["cuda"])
            row["cuda_ms"], row["cuda_ms_all"], row["cuda_peak_mb"] = cu.cuda_ms, cu.cuda_ms_all, cu.cuda_peak_mb
            row["cuda_gemm_ms"] = cu.gemm_ms
        out["shapes"].append(row)
        if progress is not None:
            progress(row)
    return out
