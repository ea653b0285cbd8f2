"""What `train.mixed_precision` means on this machine.

    resolve_precision("auto") -> Precision("bf16", "auto: CPU has amx_bf16", warning=None)

bf16 autocast pays only where the hardware multiplies bf16 natively: a CUDA GPU with bf16
(Ampere and later) or an x86 CPU with AMX-BF16 or AVX512-BF16. Elsewhere torch converts
bf16 GEMMs through float32 in software, and a step of the tiny recipe on an AVX2 CPU takes
about 10x longer than at float32. So `auto` (the default) picks bf16 only where it is
native and float32 (`no`) everywhere else; an explicit `bf16` is kept but warned about.

Native units are necessary but not enough. A small model spends its step in small matmuls,
casts and elementwise work, where autocast costs more than it saves: the tiny stage-III
recipe trains 1.8x faster in float32 on an Intel Xeon with AMX and 1.5x on an AMD EPYC with
AVX512-BF16 (README). So on such a CPU `auto` is a measurement: `Precision.measure` is set,
and the trainer times its real training step both ways on a few batches (`time_steps`,
`measured`) before the first step and keeps the faster.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

__all__ = ["Precision", "resolve_precision", "cpu_flags", "cpu_bf16_flag", "CHOICES", "time_steps", "measured"]

CHOICES = ("auto", "no", "fp16", "bf16")
# /proc/cpuinfo names of the x86 units that run bf16 matmuls natively, best first
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
_NO_UNITS = "CPU has no AVX512-BF16/AMX"


@dataclass(frozen=True)
class Precision:
    mixed_precision: str        # what accelerate gets: "no" | "fp16" | "bf16"
    why: str                    # shown after the choice, e.g. "auto: CPU has amx_bf16"
    warning: Optional[str] = None
    measure: bool = False       # auto on a CPU with bf16 units: time a step both ways (`measured`)

    def line(self) -> str:
        name = {"no": "fp32"}.get(self.mixed_precision, self.mixed_precision)
        return f"precision: {name} ({self.why})"


def cpu_flags(path: str = "/proc/cpuinfo") -> Optional[frozenset]:
    """The CPU feature flags the Linux kernel lists, or None where there is no such file."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        return None
    return frozenset()


def cpu_bf16_flag(flags: Iterable[str]) -> Optional[str]:
    """The first native-bf16 flag among `flags` (e.g. 'amx_bf16'), None if there is none."""
    flags = set(flags)
    return next((f for f in NATIVE_BF16_FLAGS if f in flags), None)


def _cpu_native(flags: Optional[Iterable[str]], capability: str) -> tuple[bool, str]:
    """(native bf16, the reason in words) for a CPU."""
    if flags is None:
        # no /proc/cpuinfo (macOS, Windows): torch's own dispatch level is all we know, and
        # even AVX512 does not imply the bf16 extension, so only float32 is sure to be fast
        return False, f"CPU flags unreadable, torch kernels {capability}; bf16 may be slow here"
    flag = cpu_bf16_flag(flags)
    if flag:
        return True, f"CPU has {flag}"
    return False, f"{_NO_UNITS}; bf16 would be slow here"


def resolve_precision(requested: str, *, cuda: Optional[bool] = None, cuda_bf16: Optional[bool] = None,
                      flags: Optional[Iterable[str]] = ..., capability: Optional[str] = None) -> Precision:
    """Turn a recipe's `train.mixed_precision` into accelerate's, with the reason.

    The machine is probed unless given: `cuda` (a GPU will be used), `cuda_bf16`
    (torch.cuda.is_bf16_supported()), `flags` (CPU flags; None: unreadable),
    `capability` (torch.backends.cpu.get_cpu_capability())."""
    import torch

    if requested not in CHOICES:
        raise ValueError(f"mixed precision must be one of {CHOICES}, got {requested!r}")
    if requested in ("no", "fp16"):
        return Precision(requested, f"train.mixed_precision: {requested}")
    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda:
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_bf16_supported()
        if requested == "bf16":
            warn = None if cuda_bf16 else "train.mixed_precision bf16 on a GPU without bf16 support: expect it to fail or be slow"
            return Precision("bf16", "train.mixed_precision: bf16", warn)
        return Precision("bf16", "auto: GPU supports bf16") if cuda_bf16 else \
            Precision("no", "auto: GPU has no bf16 support")
    if flags is ...:
        flags = cpu_flags()
    if capability is None:
        capability = torch.backends.cpu.get_cpu_capability()
    native, why = _cpu_native(flags, capability)
    if requested == "bf16":
        warn = None if native else (f"train.mixed_precision bf16 but {why.split(';')[0]}: bf16 matmuls may be "
                                    f"emulated and a step ~10x slower than at fp32 (use auto or no)")
        return Precision("bf16", "train.mixed_precision: bf16", warn)
    return Precision("bf16" if native else "no", f"auto: {why}", measure=native)


# bf16 is kept only when its step is at least this much faster than float32's: a tie is
# float32, which is exact and the same on every machine
BF16_MARGIN = 1.1


def time_steps(steps, bf16: bool) -> float:
    """The median wall time of the training steps `steps[1:]` (callables: a forward and
    backward pass over one batch each) after `steps[0]` as a warm-up, under CPU bf16 autocast
    or in float32. Give batches of different shapes, as a run meets them: bf16 kernels are
    prepared per shape (oneDNN primitives), so one batch timed again and again hides that
    cost (the tiny stage-III recipe: equal times on one batch, bf16 1.6x slower in a run)."""
    import contextlib
    import statistics
    import time

    import torch
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    if len(steps) < 2:
        raise ValueError("time_steps needs a warm-up step and at least one timed step")
    times = []
    for i, step in enumerate(steps):
        t = time.perf_counter()
        with ctx():
            step()
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def busy(load: Optional[float] = None, cores: Optional[int] = None) -> Optional[str]:
    """A warning when other work shares the CPU that the step was timed on: the 1-minute load
    average above 1.5 times the cores this process may use. Two 2-thread jobs on 2 cores made
    the tiny stage-III step 15.5 s in fp32 and 4.83 s in bf16 (alone: 0.31 s and 0.44 s), so
    `auto` picked the precision that is 1.8x slower alone."""
    import os
    try:
        load = os.getloadavg()[0] if load is None else load
        cores = cores or len(os.sched_getaffinity(0))
    except (OSError, AttributeError):        # no load average or affinity on this platform
        return None
    if load <= 1.5 * cores:
        return None
    return (f"the CPU is busy (1-minute load {load:.1f} on {cores} cores) while `auto` timed the step: the choice "
            f"may not hold once it is free; set train.mixed_precision to no or bf16 on a shared machine")


def measured(p: Precision, fp32_s: float, bf16_s: float, warning: Optional[str] = None) -> Precision:
    """`p` (a `measure` choice) after timing one step each way: bf16 where it is at least
    BF16_MARGIN times faster, else float32; the reason gives both times, `warning` (`busy`)
    rides along."""
    times = f"a step takes {bf16_s:.3g} s in bf16, {fp32_s:.3g} s in fp32"
    if fp32_s >= BF16_MARGIN * bf16_s:
        return Precision("bf16", f"{p.why}; {times}", warning)
    return Precision("no", f"{p.why}, but {times}", warning)
