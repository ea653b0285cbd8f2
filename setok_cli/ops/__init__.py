"""Density-peak clustering ops of SeTok (SPEC section 2).

    knn_density(x, k, valid=None)                       -> density (B, N)
    delta_distance(x, density, valid=None)              -> delta (B, N), parent (B, N) int64
    scope_cluster(x, score, bandwidth, max_clusters, hard=True, min_scope=0.0,
                  score_threshold=None, valid=None)     -> masks (B, T+1, N), seeds (B, T), num (B,)
    dpc_scores(x, k, valid=None)                        -> density, delta, parent, score
    dpc_cluster(x, k, bandwidth, max_clusters, ...)     -> DPCResult (all of the above, one
                                                           distance matrix for the whole pipeline)

Each takes `backend=` ("reference", "cpu", "cuda"); the default is `$SETOK_BACKEND`, else
the fastest available for the tensor's device. Inputs may be float32, float16, bfloat16
or float64; arithmetic is float32 (float64 for float64 inputs) and float outputs are in
that compute dtype. `masks` carries gradients to `x` (straight-through in hard mode);
densities, deltas, scores, seeds and counts do not.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import reference
from ._ext import HAS_EXT, build_info, has_backend

BACKENDS = ("reference", "cpu", "cuda")

__all__ = ["knn_density", "delta_distance", "scope_cluster", "dpc_scores", "dpc_cluster", "DPCResult",
           "available_backends", "default_backend", "build_info", "HAS_EXT", "BACKENDS"]


class DPCResult(NamedTuple):
    density: Tensor  # (B, N)
    delta: Tensor  # (B, N)
    parent: Tensor  # (B, N) int64
    score: Tensor  # (B, N)
    masks: Tensor  # (B, T+1, N)
    seeds: Tensor  # (B, T) int64, -1 past num_clusters
    num_clusters: Tensor  # (B,) int64


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    dev = torch.device(device).type
    out = ["reference"]
    if dev == "cpu" and has_backend("cpu"):
        out.append("cpu")
    if dev == "cuda" and has_backend("cuda"):
        out.append("cuda")
    return out


def default_backend(device: str | torch.device = "cpu") -> str:
    return available_backends(device)[-1]


def _backend(backend: Optional[str], x: Tensor) -> str:
    name = backend if backend is not None else os.environ.get("SETOK_BACKEND") or None
    dev = x.device.type
    if name is None:
        return default_backend(dev)
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "reference":
        return name
    if name != dev:
        raise ValueError(f"backend={name!r} cannot run a tensor on device {dev!r}; "
                         f"use backend={dev!r} or 'reference'")
    if not has_backend(name):
        raise RuntimeError(f"backend {name!r} is not available in this build "
                           f"(available: {available_backends(x.device)})")
    return name


# ---- argument checks (messages name the argument and its shape) --------------------

def _check_x(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, N, D), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")


def _check_bn(name: str, t: Optional[Tensor], x: Tensor, dtype_ok=None) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(x.shape[:2]):
        raise ValueError(f"{name} must have shape (B, N) = {tuple(x.shape[:2])}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if dtype_ok == "bool" and t.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {t.dtype}")


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def _check_scope_args(bandwidth, max_clusters, min_scope, score_threshold) -> None:
    if not (isinstance(bandwidth, (int, float)) and math.isfinite(bandwidth) and bandwidth > 0):
        raise ValueError(f"bandwidth must be a finite number > 0, got {bandwidth!r}")
    if isinstance(max_clusters, bool) or not isinstance(max_clusters, int) or max_clusters < 1:
        raise ValueError(f"max_clusters must be an int >= 1, got {max_clusters!r}")
    if not (isinstance(min_scope, (int, float)) and 0.0 <= min_scope < 1.0):
        raise ValueError(f"min_scope must be in [0, 1), got {min_scope!r}")
    if score_threshold is not None and not isinstance(score_threshold, (int, float)):
        raise TypeError(f"score_threshold must be a number or None, got {type(score_threshold).__name__}")


def _prep(x: Tensor) -> Tensor:
    """To the compute dtype, contiguous (a no-op for contiguous float32 / float64)."""
    return x.to(reference.compute_dtype(x)).contiguous()


def _knn_op(name: str, x: Tensor, k: int, valid: Optional[Tensor], backend: Optional[str]):
    """An op of (x, k, valid): checked, then the reference or the compiled kernel."""
    _check_x(x)
    _check_k(k)
    _check_bn("valid", valid, x, "bool")
    if _backend(backend, x) == "reference":
        return getattr(reference, name)(x, k, valid)
    return getattr(torch.ops.setok, name)(_prep(x), k, valid)


# ---- public ops ----------------------------------------------------------------------

def knn_density(x: Tensor, k: int, valid: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tensor:
    """density_i = exp(-mean_{j in KNN(i)} dist(i, j)^2); KNN includes i. x: (B, N, D) -> (B, N)."""
    return _knn_op("knn_density", x, k, valid, backend)


def delta_distance(x: Tensor, density: Tensor, valid: Optional[Tensor] = None, *,
                   backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Distance to the nearest denser point and that point. -> delta (B, N), parent (B, N) int64."""
    _check_x(x)
    _check_bn("density", density, x)
    _check_bn("valid", valid, x, "bool")
    be = _backend(backend, x)
    if be == "reference":
        return reference.delta_distance(x, density, valid)
    return torch.ops.setok.delta_distance(_prep(x), density.to(reference.compute_dtype(x)).contiguous(), valid)


def dpc_scores(x: Tensor, k: int, valid: Optional[Tensor] = None, *, backend: Optional[str] = None):
    """density, delta, parent and the seed score density * delta, from one distance matrix."""
    return _knn_op("dpc_scores", x, k, valid, backend)


def scope_cluster(x: Tensor, score: Tensor, bandwidth: float, max_clusters: int, hard: bool = True,
                  min_scope: float = 0.0, score_threshold: Optional[float] = None,
                  valid: Optional[Tensor] = None, *, backend: Optional[str] = None):
    """The seeded scope-masking loop (appendix C). -> masks (B, T+1, N), seeds (B, T), num (B,).

    Rows 0..num-1 of `masks` are clusters, row `num` the remainder; they sum to `valid`.
    """
    _check_x(x)
    _check_bn("score", score, x)
    _check_bn("valid", valid, x, "bool")
    _check_scope_args(bandwidth, max_clusters, min_scope, score_threshold)
    be = _backend(backend, x)
    thr = None if score_threshold is None else float(score_threshold)
    if be == "reference":
        return reference.scope_cluster(x, score, float(bandwidth), max_clusters, bool(hard), float(min_scope),
                                       thr, valid)
    masks, seeds, num, _ = torch.ops.setok.scope_cluster(
        _prep(x), score.detach().to(reference.compute_dtype(x)).contiguous(), float(bandwidth), max_clusters,
        bool(hard), float(min_scope), thr, valid)
    return masks, seeds, num


def dpc_cluster(x: Tensor, k: int, bandwidth: float, max_clusters: int, hard: bool = True,
                min_scope: float = 0.0, score_threshold: Optional[float] = None,
                valid: Optional[Tensor] = None, *, backend: Optional[str] = None) -> DPCResult:
    """The full pipeline (density, delta, score, scope loop) sharing one distance matrix."""
    _check_x(x)
    _check_k(k)
    _check_bn("valid", valid, x, "bool")
    _check_scope_args(bandwidth, max_clusters, min_scope, score_threshold)
    be = _backend(backend, x)
    thr = None if score_threshold is None else float(score_threshold)
    if be == "reference":
        return DPCResult(*reference.dpc_cluster(x, k, float(bandwidth), max_clusters, bool(hard),
                                                float(min_scope), thr, valid))
    out = torch.ops.setok.dpc_cluster(_prep(x), k, float(bandwidth), max_clusters, bool(hard), float(min_scope),
                                      thr, valid)
    return DPCResult(*out[:7])
