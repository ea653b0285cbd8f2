"""The visual-token reducers SeTok meets in LLaVA-1.5 (paper Table 9), at the same token
budget: patch features of a batch -> each image's visual tokens (`reduce_features`). The
patch that puts them inside a LlavaForConditionalGeneration is integrations/llava.py.

Reducers (x: (B, N, D) patch features on an h x w grid; all batched, batch order kept):

  setok      SeTok's clustering (models/clustering.py `cluster`), each cluster -> the mean
             of its features (Table 9). The clustering sees x / s (s: the image's feature
             spread, floor `feature_floor`) + 0.3 x 2-D sin-cos position embedding, as
             SeTok's `clustering_features`, so the bandwidth (0.6) is in units of the
             image's own spread and works for any tower. Without a budget: hard mode (the
             scope loop, then every token one connected region, as SeTok does), the
             image's natural count (at most max_tokens = 64). At a budget (`setok_budget`):
             "split" (the default), the natural clusters, the largest cut in two at its
             median until the budget (`split_to_budget`; chosen on val in bench-reduce,
             README); or "fixed" (paper Table 5), the budget's highest density-peak scores
             seed as many clusters, every patch to its nearest seed. Exactly budget (fewer
             only for an image of fewer distinct patches). With a stage-1 SeTok (`setok=`),
             its own clustering and merger make the tokens instead, in fixed mode at a
             budget (the tower width must be its encoder's).
  pool2d     2-D average pooling of the grid to r x c = budget cells (r <= c, the most
             square factorisation that fits the grid). Exactly budget.
  random     budget patches drawn without replacement (seeded), raster order kept. Exactly budget.
  tome       ToMe bipartite soft matching (Bolya et al. 2023) on cosine similarity of the
             features (ToMe uses the attention keys), size-weighted averages, repeated
             until budget tokens remain. Exactly budget.
  visionzip  VisionZip-style: the budget - c most important patches (dominant), and c =
             max(1, round(budget * 10 / 64)) contextual tokens (VisionZip's 54 + 10):
             uniformly spaced targets among the rest, every other remaining patch merged
             (averaged) into its most similar target. Exactly budget.
  prumerge   PruMerge-style: outliers of the importance by the IQR rule (> Q3 + 1.5 IQR);
             at a budget, filled up with spatially uniform samples of the other patches
             (PruMerge+), or cut to the most important; each kept token then becomes the
             importance-weighted average of its 8 nearest patches (itself included).
             Exactly budget; without one, the outlier count (at least 1).

Importance (visionzip, prumerge) is the `importance=` given: in the LLaVA patch, the CLS
token's attention to each patch in the selected layer (integrations/llava.py). Without one
(a tower without a CLS attention, e.g. the builtin encoder) a stated substitute: each
patch's distance from the image's mean feature (`feature_importance`, `IMPORTANCE_SUBSTITUTE`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError

__all__ = ["METHODS", "NEEDS_IMPORTANCE", "IMPORTANCE_SUBSTITUTE", "check_method", "pool_shape", "reduce_features",
           "feature_importance", "cluster_mean_tokens", "setok_clusters", "split_to_budget"]

METHODS = ("setok", "pool2d", "random", "tome", "visionzip", "prumerge")
NEEDS_IMPORTANCE = ("visionzip", "prumerge")
IMPORTANCE_SUBSTITUTE = "distance of each patch from the image's mean feature (no CLS attention in this tower)"


# ----------------------------------------------------------------------------- arguments

def check_method(method: str, budget: Optional[int], num_patches: Optional[int] = None,
                 grid: Optional[tuple[int, int]] = None) -> None:
    """One UserError line for an unknown method or a budget that cannot be met."""
    if method not in METHODS:
        raise UserError(f"unknown reducer {method!r}; choose one of {', '.join(METHODS)}")
    if budget is None:
        if method not in ("setok", "prumerge"):
            raise UserError(f"reducer {method!r} needs a budget (tokens per image); only setok and prumerge "
                            f"have a natural count")
        return
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise UserError(f"budget must be a positive whole number of tokens per image, got {budget!r}")
    if method == "setok" and budget < 2:
        raise UserError("setok needs a budget of at least 2 tokens per image")
    if num_patches is not None and budget > num_patches:
        raise UserError(f"budget {budget} is larger than the {num_patches} visual tokens per image")
    if method == "pool2d" and grid is not None:
        pool_shape(budget, grid)


def pool_shape(budget: int, grid: tuple[int, int]) -> tuple[int, int]:
    """The most square r x c = budget with r <= h and c <= w (either orientation)."""
    h, w = grid
    best = None
    for r in range(1, budget + 1):
        if budget % r:
            continue
        c = budget // r
        if r <= h and c <= w:
            score = abs(math.log(r / c))
            if best is None or score < best[0]:
                best = (score, (r, c))
    if best is None:
        raise UserError(f"pool2d cannot make {budget} cells on a {h} x {w} grid (budget must be r x c "
                        f"with r <= {h}, c <= {w})")
    return best[1]


# ----------------------------------------------------------------------------- helpers

def feature_importance(x: Tensor) -> Tensor:
    """The substitute for the CLS attention: each patch's distance from the image's mean
    feature, normalised to sum 1 per image. x: (B, N, D) -> (B, N)."""
    d = (x.float() - x.float().mean(1, keepdim=True)).norm(dim=-1)
    return d / d.sum(1, keepdim=True).clamp_min(1e-12)


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """(B, M, D), (B, P, D) -> (B, M, P) cosine similarities."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).transpose(1, 2)


def _rows(t: Tensor, counts: Optional[Tensor] = None) -> list[Tensor]:
    """(B, K, D) -> [(K_b, D)] (the first counts[b] rows of each image)."""
    if counts is None:
        return list(t.unbind(0))
    return [t[b, : int(n)] for b, n in enumerate(counts.tolist())]


def cluster_mean_tokens(x: Tensor, labels: Tensor, num_tokens: Tensor) -> list[Tensor]:
    """The mean feature of every cluster. x (B, N, D), labels (B, N) in [0, K) (-1: no
    token), num_tokens (B,) -> [(K_b, D)]."""
    B, N, D = x.shape
    K = max(int(num_tokens.max().item()) if B else 0, 1)
    member = (labels >= 0).to(x.dtype)
    lab = labels.clamp(min=0)
    tot = x.new_zeros(B, K, D).scatter_add(1, lab.unsqueeze(-1).expand(B, N, D), x * member.unsqueeze(-1))
    cnt = x.new_zeros(B, K).scatter_add(1, lab, member)
    return _rows(tot / cnt.clamp(min=1).unsqueeze(-1), num_tokens)


def setok_clusters(x: Tensor, grid: tuple[int, int], max_tokens: int, *, mode: str = "hard", k: int = 8,
                   bandwidth: float = 0.6, pos_weight: float = 0.3, feature_floor: float = 1e-6,
                   connectivity: int = 4, min_region: int = 3):
    """SeTok's clustering of arbitrary tower features (the normalisation of
    `SeTok.clustering_features`; hard: the scope loop then connected tokens, at most
    max_tokens; fixed: the max_tokens best density-peak seeds). -> Clusters."""
    from ..models.clustering import cluster, split_connected
    from ..models.position import sincos_2d
    from ..models.setok import _masked_spread

    B, N, D = x.shape
    h, w = grid
    valid = torch.ones(B, N, dtype=torch.bool, device=x.device)
    z = x.float()
    z = z / _masked_spread(z, valid).clamp_min(feature_floor).view(B, 1, 1)
    if pos_weight:
        z = z + pos_weight * sincos_2d(D, h, w, device=x.device).view(1, N, D)
    c = cluster(z, mode, k=k, bandwidth=bandwidth, max_tokens=max_tokens, valid=valid)
    if connectivity and mode == "hard":
        c = split_connected(c, z, grid, valid, max_tokens, min_region, connectivity)
    return c


# ----------------------------------------------------------------------------- reducers

def split_to_budget(labels: Tensor, num_tokens: Tensor, budget: int, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """SeTok's natural clusters topped up to `budget`: while an image has fewer than budget
    clusters, its largest cluster is cut in two at the median of its patches along its longer
    spatial axis (the other axis breaks ties). Batched over images, one cut per image per
    round. labels (B, N) in [0, K) (-1: no token), num_tokens (B,) -> the same, with
    num_tokens = budget (fewer only when no cluster has two patches left)."""
    B, N = labels.shape
    h, w = grid
    dev = labels.device
    idx = torch.arange(N, device=dev)
    ys, xs = (idx // w).float(), (idx % w).float()
    labels, K = labels.clone(), num_tokens.clone().long()
    rows = torch.arange(B, device=dev)
    for _ in range(budget):
        size = torch.zeros(B, budget + N, device=dev).scatter_add(1, labels.clamp(min=0), (labels >= 0).float())
        big, biggest = size.argmax(1), size.max(1).values
        cut = (K < budget) & (biggest >= 2)
        if not bool(cut.any()):
            break
        member = (labels == big[:, None]) & cut[:, None]                          # (B, N)
        n = member.sum(1).clamp(min=1)

        def spread(c: Tensor) -> Tensor:
            m = (c * member).sum(1) / n
            return ((c - m[:, None]) ** 2 * member).sum(1)
        along_x = (spread(xs) >= spread(ys))[:, None]
        key = torch.where(along_x, xs * max(h, w) + ys, ys * max(h, w) + xs)     # unique per patch
        key = torch.where(member, key, torch.full_like(key, float("inf")))
        half = key.sort(1).values[rows, (n // 2 - 1).clamp(min=0)]               # the lower half's last key
        upper = member & (key > half[:, None])
        labels = torch.where(upper, K[:, None].expand(B, N), labels)
        K = K + cut.long()
    return labels, K


def _pool2d(x: Tensor, budget: int, grid: tuple[int, int]) -> list[Tensor]:
    B, N, D = x.shape
    h, w = grid
    r, c = pool_shape(budget, grid)
    g = x.reshape(B, h, w, D).permute(0, 3, 1, 2)
    return _rows(F.adaptive_avg_pool2d(g, (r, c)).flatten(2).transpose(1, 2))


def _random(x: Tensor, budget: int, seed: int) -> list[Tensor]:
    B, N, D = x.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    keys = torch.rand(B, N, generator=gen).to(x.device)
    idx = keys.topk(budget, dim=1).indices.sort(1).values  # raster order kept
    return _rows(x.gather(1, idx.unsqueeze(-1).expand(B, budget, D)))


def _tome(x: Tensor, budget: int) -> list[Tensor]:
    B, N, D = x.shape
    xs = x.float()
    size = xs.new_ones(B, N, 1)
    while xs.shape[1] > budget:
        n = xs.shape[1]
        a, b = xs[:, ::2], xs[:, 1::2]  # alternate partition (ToMe)
        sa, sb = size[:, ::2], size[:, 1::2]
        r = min(n - budget, a.shape[1])
        best, dst = _cosine(a, b).max(-1)  # (B, Na) each A token's most similar B token
        order = best.argsort(-1, descending=True)
        src, keep = order[:, :r], order[:, r:]
        dst = dst.gather(1, src)
        # size-weighted averages: sums of x * size and of size, then one division
        wa, wb = a * sa, b * sb
        wb = wb.scatter_add(1, dst.unsqueeze(-1).expand(B, r, D), wa.gather(1, src.unsqueeze(-1).expand(B, r, D)))
        sb = sb.scatter_add(1, dst.unsqueeze(-1), sa.gather(1, src.unsqueeze(-1)))
        keep_x = wa.gather(1, keep.unsqueeze(-1).expand(B, keep.shape[1], D))
        keep_s = sa.gather(1, keep.unsqueeze(-1))
        size = torch.cat([keep_s, sb], 1)
        xs = torch.cat([keep_x, wb], 1) / size
    return _rows(xs.to(x.dtype))


def _visionzip(x: Tensor, budget: int, importance: Tensor) -> list[Tensor]:
    B, N, D = x.shape
    c = max(1, round(budget * 10 / 64))
    d = budget - c
    order = torch.argsort(importance, dim=1, descending=True, stable=True)
    dom_idx = order[:, :d].sort(1).values
    rest = order[:, d:].sort(1).values  # (B, R) raster order
    R = N - d
    dominant = x.gather(1, dom_idx.unsqueeze(-1).expand(B, d, D))
    xr = x.gather(1, rest.unsqueeze(-1).expand(B, R, D))
    tpos = torch.linspace(0, R - 1, c, device=x.device).round().long()  # uniformly spaced targets
    targets = xr[:, tpos]  # (B, c, D)
    near = _cosine(xr, targets).argmax(-1)  # (B, R)
    near[:, tpos] = torch.arange(c, device=x.device)  # a target belongs to itself
    tot = x.new_zeros(B, c, D).scatter_add(1, near.unsqueeze(-1).expand(B, R, D), xr)
    cnt = x.new_zeros(B, c).scatter_add(1, near, torch.ones_like(near, dtype=x.dtype))
    ctx = tot / cnt.clamp(min=1).unsqueeze(-1)
    return _rows(torch.cat([dominant, ctx], 1))


def _prumerge(x: Tensor, budget: Optional[int], importance: Tensor, knn: int = 8) -> list[Tensor]:
    B, N, D = x.shape
    imp = importance.float()
    q1, q3 = torch.quantile(imp, 0.25, dim=1, keepdim=True), torch.quantile(imp, 0.75, dim=1, keepdim=True)
    outlier = imp > q3 + 1.5 * (q3 - q1)
    n_out = outlier.sum(1)
    if budget is None:
        counts = n_out.clamp(min=1)
    else:
        counts = torch.full_like(n_out, budget)
    # priority: outliers by importance, then (PruMerge+) evenly spread samples of the others
    # in raster order, then the rest by importance
    other = ~outlier
    M = other.sum(1, keepdim=True).clamp(min=1)
    fill = (counts.view(B, 1) - n_out.view(B, 1)).clamp(min=0)
    rank = other.long().cumsum(1) - 1  # raster rank among the others
    even = other & ((rank + 1) * fill // M > rank * fill // M)
    pri = imp / imp.amax(1, keepdim=True).clamp_min(1e-12)  # in [0, 1]
    pri = pri + 2.0 * even.float() + 4.0 * outlier.float()
    K = int(counts.max().item())
    # natural counts: image b keeps its first counts[b] picks, so those (its outliers, or its most
    # important patch) must come first; at a budget every image keeps K, in raster order
    idx = pri.topk(K, dim=1).indices
    if budget is not None:
        idx = idx.sort(1).values
    kept = x.gather(1, idx.unsqueeze(-1).expand(B, K, D))
    k = min(knn, N)
    nb = _cosine(kept, x).topk(k, dim=-1).indices  # (B, K, k) nearest patches, itself included
    w = imp.unsqueeze(1).expand(B, K, N).gather(2, nb).clamp_min(1e-12)  # importance weights (flat image: equal)
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    nbx = x.unsqueeze(1).expand(B, K, N, D).gather(2, nb.unsqueeze(-1).expand(B, K, k, D))
    merged = (w.unsqueeze(-1).to(x.dtype) * nbx).sum(2)
    return _rows(merged, counts if budget is None else None)


def reduce_features(x: Tensor, method: str, budget: Optional[int] = None, *, grid: Optional[tuple[int, int]] = None,
                    importance: Optional[Tensor] = None, seed: int = 0, setok: Optional[nn.Module] = None,
                    max_tokens: int = 64, setok_budget: str = "split") -> list[Tensor]:
    """Patch features of a batch -> each image's visual tokens.

    x: (B, N, D); grid (h, w) with h * w = N (default: square); importance (B, N): the CLS
    attention to each patch (default: `feature_importance`, the stated substitute).
    budget: tokens per image (None: setok / prumerge natural counts; setok caps at
    max_tokens then). setok_budget: how setok meets a budget, "fixed" (the budget's best
    density peaks seed the clusters) or "split" (the natural clusters, the largest cut in two
    until the budget: `split_to_budget`). -> [(K_b, D)], one per image in batch order (setok
    with a stage-1 model: (K_b, token_dim))."""
    if x.dim() != 3:
        raise UserError(f"features must be (B, N, D), got {tuple(x.shape)}")
    B, N, D = x.shape
    if grid is None:
        s = int(round(math.sqrt(N)))
        if s * s != N:
            raise UserError(f"{N} patches are not a square grid; pass grid=(h, w)")
        grid = (s, s)
    if grid[0] * grid[1] != N:
        raise UserError(f"grid {grid} does not hold the {N} patches")
    check_method(method, budget, N, grid)
    if setok_budget not in ("fixed", "split"):
        raise UserError(f"setok_budget must be 'fixed' or 'split', got {setok_budget!r}")
    if method in NEEDS_IMPORTANCE and importance is None:
        importance = feature_importance(x)
    if method == "pool2d":
        return _pool2d(x, budget, grid)
    if method == "random":
        return _random(x, budget, seed)
    if method == "tome":
        return _tome(x, budget)
    if method == "visionzip":
        return _visionzip(x, budget, importance)
    if method == "prumerge":
        return _prumerge(x, budget, importance)
    # setok
    cap = budget if budget is not None else max_tokens
    if setok is not None:
        enc_dim = getattr(getattr(setok, "encoder", None), "hidden_size", D)
        if enc_dim != D:
            raise UserError(f"the stage-1 SeTok reads {enc_dim}-wide features, the tower gives {D}")
        with torch.no_grad():
            return _setok_merger(setok, x, grid, cap, "hard" if budget is None else "fixed")
    if budget is not None and setok_budget == "split":
        c = setok_clusters(x, grid, max(cap, 2), mode="hard")
        labels, K = split_to_budget(c.labels, c.num_tokens, budget, grid)
        return cluster_mean_tokens(x, labels, K)
    c = setok_clusters(x, grid, max(cap, 2), mode="hard" if budget is None else "fixed")
    return cluster_mean_tokens(x, c.labels, c.num_tokens)


def _setok_merger(setok: nn.Module, x: Tensor, grid: tuple[int, int], cap: int, mode: str) -> list[Tensor]:
    """A stage-1 SeTok's own clustering (in `mode`) and merger on the tower features."""
    import dataclasses

    B, N, D = x.shape
    old = setok.config
    cap = max(cap, 2) if mode == "fixed" else min(old.max_tokens, max(cap, 2))
    setok.config = dataclasses.replace(old, max_tokens=cap, mode=mode)
    try:
        out = setok(None, features=x.reshape(B, grid[0], grid[1], D))
    finally:
        setok.config = old
    return _rows(out.tokens, out.num_tokens)
