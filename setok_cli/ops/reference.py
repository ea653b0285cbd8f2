"""Pure-PyTorch oracles of the clustering ops (SPEC section 2).

These are the ground truth the compiled kernels are tested against, and the fallback
when the extension is missing. They are batched over images; only the scope loop
iterates (over clusters), as the algorithm is sequential in its seeds.

All arithmetic is in float32 (float64 for float64 inputs). Shapes:
    x: (B, N, D)   valid: (B, N) bool   density, delta, score: (B, N)
    masks: (B, T+1, N) with T = max_clusters   seeds: (B, T)   num_clusters: (B,)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# Up to this feature width distances are computed from differences (exact for
# duplicate points); above it from one GEMM (the fast path). Every backend agrees.
DIRECT_MAX_D = 32


def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def sqdist(x: Tensor) -> Tensor:
    """dist(i, j)^2 = ||x_i - x_j||^2 / D for all pairs. x: (B, N, D) -> (B, N, N).

    Robust: the diagonal is exactly 0, nothing is negative, no TF32.
    """
    x = x.to(compute_dtype(x))
    B, N, D = x.shape
    if D <= DIRECT_MAX_D:
        d2 = (x.unsqueeze(2) - x.unsqueeze(1)).square().sum(-1)
    else:
        with _no_tf32():
            g = torch.bmm(x, x.transpose(1, 2))
        sq = torch.diagonal(g, dim1=1, dim2=2)
        d2 = ((sq.unsqueeze(2) + sq.unsqueeze(1)) - 2.0 * g).clamp_min(0.0)
    d2 = d2 / D
    eye = torch.eye(N, dtype=torch.bool, device=x.device)
    return d2.masked_fill(eye, 0.0)


class _no_tf32:
    def __enter__(self):
        self.prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.prev


def _valid(x: Tensor, valid: Optional[Tensor]) -> Tensor:
    if valid is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return valid.to(torch.bool)


def density_from_sqdist(d2: Tensor, k: int, valid: Tensor) -> Tensor:
    """density_i = exp(-mean of the k smallest d2 over valid j, i included). -> (B, N)"""
    B, N, _ = d2.shape
    inf = torch.tensor(float("inf"), dtype=d2.dtype, device=d2.device)
    d2v = torch.where(valid.unsqueeze(1), d2, inf)
    kk = min(k, N)
    smallest = torch.topk(d2v, kk, dim=-1, largest=False, sorted=True).values  # (B, N, kk)
    k_eff = valid.sum(-1).clamp(max=k).clamp(min=1)  # (B,)
    take = torch.arange(kk, device=d2.device).view(1, 1, kk) < k_eff.view(B, 1, 1)
    total = torch.where(take, smallest, torch.zeros((), dtype=d2.dtype, device=d2.device)).sum(-1)
    density = torch.exp(-total / k_eff.to(d2.dtype).view(B, 1))
    return torch.where(valid, density, torch.zeros((), dtype=d2.dtype, device=d2.device))


def delta_from_sqdist(d2: Tensor, density: Tensor, valid: Tensor):
    """delta_i = distance to the nearest denser valid point; parent_i = that point.

    j is denser than i iff density_j > density_i or (equal and j < i). The densest
    point gets its row maximum and itself as parent. -> delta (B, N), parent (B, N) int64
    """
    B, N, _ = d2.shape
    idx = torch.arange(N, device=d2.device)
    dj, di = density.unsqueeze(1), density.unsqueeze(2)  # [b, i, j]: density_j / density_i
    denser = (dj > di) | ((dj == di) & (idx.view(1, 1, N) < idx.view(1, N, 1)))
    denser &= valid.unsqueeze(1) & valid.unsqueeze(2)
    inf = torch.tensor(float("inf"), dtype=d2.dtype, device=d2.device)
    cand = torch.where(denser, d2, inf)
    best, parent = cand.min(dim=-1)  # first minimum: smaller index on ties
    has = torch.isfinite(best)
    rowmax = torch.where(valid.unsqueeze(1), d2, torch.zeros((), dtype=d2.dtype, device=d2.device)).amax(-1)
    d2_delta = torch.where(has, best, rowmax)
    parent = torch.where(has, parent, idx.view(1, N).expand(B, N))
    zero = torch.zeros((), dtype=d2.dtype, device=d2.device)
    delta = torch.where(valid, d2_delta.sqrt(), zero)
    parent = torch.where(valid, parent, idx.view(1, N).expand(B, N))
    return delta, parent


def knn_density(x: Tensor, k: int, valid: Optional[Tensor] = None) -> Tensor:
    v = _valid(x, valid)
    with torch.no_grad():
        return density_from_sqdist(sqdist(x), k, v)


def delta_distance(x: Tensor, density: Tensor, valid: Optional[Tensor] = None):
    v = _valid(x, valid)
    with torch.no_grad():
        return delta_from_sqdist(sqdist(x), density.to(compute_dtype(x)), v)


def dpc_scores(x: Tensor, k: int, valid: Optional[Tensor] = None):
    v = _valid(x, valid)
    with torch.no_grad():
        d2 = sqdist(x)
        density = density_from_sqdist(d2, k, v)
        delta, parent = delta_from_sqdist(d2, density, v)
    return density, delta, parent, density * delta


def scope_from_sqdist(x: Tensor, d2: Tensor, score: Tensor, bandwidth: float, max_clusters: int,
                      hard: bool, min_scope: float, score_threshold: Optional[float], valid: Tensor):
    """The scope-masking loop of appendix C with density-peak seeds (SPEC 2.3).

    `d2` (B, N, N, detached) gives the forward values; gradients reach `x` through the
    analytic ||x_i - x_m||^2 / D, so they exist at distance 0 and agree across backends.
    """
    B, N, D = x.shape
    cdt = d2.dtype
    xf = x.to(cdt)
    T = max_clusters
    ar = torch.arange(B, device=x.device)
    scope = valid.to(cdt)
    score = score.detach().to(cdt)
    masks, seeds = [], []
    active = torch.ones(B, dtype=torch.bool, device=x.device)
    num = torch.zeros(B, dtype=torch.int64, device=x.device)
    inv_bw2 = 1.0 / (bandwidth * bandwidth)
    track_grad = torch.is_grad_enabled() and x.requires_grad
    for _ in range(T):
        cand = valid & (scope > min_scope)
        active = active & cand.any(-1)
        s = torch.where(cand, score * scope.detach(), torch.full((), -float("inf"), dtype=cdt, device=x.device))
        m = s.argmax(-1)  # first maximum: smaller index on ties
        if score_threshold is not None:
            active = active & (s[ar, m] >= score_threshold)
        # forward value from the shared matrix, gradient from the analytic form
        d2m = d2[ar, m]  # (B, N)
        if track_grad:
            live = (xf - xf[ar, m].unsqueeze(1)).square().sum(-1) / D
            d2m = d2m + (live - live.detach())  # exact forward value, analytic gradient
        soft = torch.exp2(-d2m * inv_bw2)
        if hard:
            hard_a = (d2[ar, m] <= bandwidth * bandwidth).to(cdt)
            alpha = hard_a + (soft - soft.detach())  # straight-through, exact forward
        else:
            alpha = soft
        a = active.to(cdt).unsqueeze(1)
        masks.append(a * scope * alpha)
        scope = scope * (1 - a * alpha)
        seeds.append(torch.where(active, m, torch.full_like(m, -1)))
        num = num + active.to(torch.int64)
    # remainder into row num_clusters; rows after it are zero
    rows = torch.stack(masks + [torch.zeros_like(scope)], dim=1) if T > 0 else torch.zeros(B, 1, N, dtype=cdt, device=x.device)
    at_num = (torch.arange(T + 1, device=x.device).view(1, T + 1) == num.view(B, 1)).to(cdt).unsqueeze(-1)
    masks_out = rows + at_num * scope.unsqueeze(1)
    seeds_out = torch.stack(seeds, dim=1) if T > 0 else torch.zeros(B, 0, dtype=torch.int64, device=x.device)
    return masks_out, seeds_out, num


def scope_cluster(x: Tensor, score: Tensor, bandwidth: float, max_clusters: int, hard: bool = True,
                  min_scope: float = 0.0, score_threshold: Optional[float] = None,
                  valid: Optional[Tensor] = None):
    v = _valid(x, valid)
    with torch.no_grad():
        d2 = sqdist(x)
    return scope_from_sqdist(x, d2, score, bandwidth, max_clusters, hard, min_scope, score_threshold, v)


def dpc_cluster(x: Tensor, k: int, bandwidth: float, max_clusters: int, hard: bool = True,
                min_scope: float = 0.0, score_threshold: Optional[float] = None,
                valid: Optional[Tensor] = None):
    """The whole pipeline on one distance matrix: scores, then the scope loop."""
    v = _valid(x, valid)
    with torch.no_grad():
        d2 = sqdist(x)
        density = density_from_sqdist(d2, k, v)
        delta, parent = delta_from_sqdist(d2, density, v)
        score = density * delta
    masks, seeds, num = scope_from_sqdist(x, d2, score, bandwidth, max_clusters, hard, min_scope,
                                          score_threshold, v)
    return density, delta, parent, score, masks, seeds, num
