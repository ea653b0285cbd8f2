"""From patch features to a variable number of token regions (SPEC section 3).

    cluster(x, mode, k, bandwidth, max_tokens, ...) -> Clusters(masks, labels, seeds, num_tokens)

x: (B, N, D) clustering features (already scaled and with position embedding added),
valid: (B, N) bool. Modes:

  hard, soft  density-peak seeds + the scope-masking loop (appendix C), one distance
              matrix (`ops.dpc_cluster`). At most max_tokens - 1 clusters; the scope
              remainder (patches no cluster took) becomes one more token whenever it
              owns a patch, so every valid patch belongs to a token and there are at most
              max_tokens tokens. `threshold`, if set, is the scope loop's score stop rule.
  threshold   the authors' code: seeds = patches with score > threshold (at least
              min_clusters: the top scores; at most max_tokens), each patch to its
              nearest seed.
  fixed       seeds = the top max_tokens scores, each patch to its nearest seed (paper
              table 5).

Masks (B, K, N) are ordered like the tokens: the scope order (hard / soft) or by
decreasing seed score (threshold / fixed). In hard, threshold and fixed modes their
values are 0/1 and the backward pass is that of the soft assignment (straight-through),
so gradients reach x; in soft mode they are the soft masks themselves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .. import ops

MODES = ("hard", "soft", "threshold", "fixed")


@dataclass
class Clusters:
    masks: Tensor  # (B, K, N) float32, rows past num_tokens are 0
    labels: Tensor  # (B, N) int64 token of each patch (argmax of masks), -1 for invalid
    seeds: Tensor  # (B, K) int64 flat patch index, -1 for none (the remainder, padding)
    num_tokens: Tensor  # (B,) int64


def _compact(masks: Tensor, seeds: Tensor, keep: Tensor, valid: Tensor) -> Clusters:
    """Move the kept rows to the front (order preserved) and cut to the largest count.

    masks (B, R, N), seeds (B, R), keep (B, R) bool."""
    B, R, N = masks.shape
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept rows first
    num = keep.sum(1)
    K = max(int(num.max().item()) if B else 0, 1)
    order = order[:, :K]
    rows_ok = torch.arange(K, device=masks.device).view(1, K) < num.view(B, 1)
    masks = masks.gather(1, order.unsqueeze(-1).expand(B, K, N)) * rows_ok.unsqueeze(-1).to(masks.dtype)
    seeds = torch.where(rows_ok, seeds.gather(1, order), torch.full_like(order, -1))
    labels = masks.detach().argmax(1)
    labels = torch.where(valid, labels, torch.full_like(labels, -1))
    return Clusters(masks, labels, seeds, num)


def scope_clusters(x: Tensor, k: int, bandwidth: float, max_tokens: int, hard: bool, min_scope: float,
                   threshold: Optional[float], valid: Tensor) -> Clusters:
    """hard / soft: appendix C; the remainder becomes a token when it owns a patch."""
    B, N, _ = x.shape
    r = ops.dpc_cluster(x, k, bandwidth, max(max_tokens - 1, 1), hard=hard, min_scope=min_scope,
                        score_threshold=threshold, valid=valid)
    masks = r.masks.float()  # (B, T+1, N)
    T1 = masks.shape[1]
    row = torch.arange(T1, device=x.device).view(1, T1)
    owner = masks.detach().argmax(1)  # (B, N)
    is_rem = row == r.num_clusters.view(B, 1)  # (B, T+1)
    rem_owns = ((owner == r.num_clusters.view(B, 1)) & valid).any(1)  # (B,)
    keep = (row < r.num_clusters.view(B, 1)) | (is_rem & rem_owns.view(B, 1))
    seeds = torch.cat([r.seeds, torch.full((B, 1), -1, dtype=torch.int64, device=x.device)], 1)
    return _compact(masks, seeds, keep, valid)


def seed_scores(x: Tensor, k: int, valid: Tensor) -> Tensor:
    """Density-peak seed score (density * delta), -inf at invalid patches. -> (B, N)"""
    score = ops.dpc_scores(x, k, valid)[3].float()
    return torch.where(valid, score, torch.full_like(score, -math.inf))


def nearest_seed_clusters(x: Tensor, score: Tensor, num_seeds: Tensor, bandwidth: float,
                          valid: Tensor) -> Clusters:
    """Seeds = the num_seeds[b] best scores of image b; every patch to its nearest seed.

    Hard 0/1 masks with the gradient of softmax_s(-ln2 * d2(n, s) / bandwidth^2)
    (straight-through); a seed that wins no patch (a duplicate) is dropped."""
    B, N, D = x.shape
    S = max(int(num_seeds.max().item()), 1)
    order = torch.argsort(score, dim=1, descending=True, stable=True)[:, :S]  # (B, S)
    seed_ok = torch.arange(S, device=x.device).view(1, S) < num_seeds.view(B, 1)
    xf = x.float()
    xs = xf.gather(1, order.unsqueeze(-1).expand(B, S, D))  # (B, S, D)
    d2 = (xf.unsqueeze(2) - xs.unsqueeze(1)).square().sum(-1) / D  # (B, N, S)
    d2 = d2.masked_fill(~seed_ok.unsqueeze(1), math.inf)
    nearest = d2.detach().argmin(-1)  # (B, N), first minimum
    onehot = torch.nn.functional.one_hot(nearest, S).to(xf.dtype)  # (B, N, S)
    soft = torch.softmax(-math.log(2.0) * d2 / (bandwidth * bandwidth), dim=-1)
    m = (onehot + (soft - soft.detach())) * valid.unsqueeze(-1).to(xf.dtype)
    masks = m.transpose(1, 2)  # (B, S, N)
    counts = (onehot * valid.unsqueeze(-1)).sum(1)  # (B, S)
    keep = seed_ok & (counts > 0)
    seeds = torch.where(seed_ok, order, torch.full_like(order, -1))
    return _compact(masks, seeds, keep, valid)


def cluster(x: Tensor, mode: str = "hard", *, k: int = 8, bandwidth: float = 0.6, max_tokens: int = 64,
            min_scope: float = 0.0, threshold: Optional[float] = None, min_clusters: int = 8,
            valid: Optional[Tensor] = None) -> Clusters:
    """Token regions of every image of a batch. x: (B, N, D), valid: (B, N) bool."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    B, N, _ = x.shape
    if valid is None:
        valid = torch.ones(B, N, dtype=torch.bool, device=x.device)
    if mode in ("hard", "soft"):
        return scope_clusters(x, k, bandwidth, max_tokens, mode == "hard", min_scope, threshold, valid)
    score = seed_scores(x, k, valid)
    nvalid = valid.sum(1)
    if mode == "fixed":
        num = nvalid.clamp(max=max_tokens)
    else:
        thr = 0.0 if threshold is None else float(threshold)
        above = ((score > thr) & valid).sum(1)
        num = torch.maximum(above, nvalid.clamp(max=min_clusters)).clamp(max=max_tokens)
    return nearest_seed_clusters(x, score, num, bandwidth, valid)
