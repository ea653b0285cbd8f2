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
    (straight-through). Every seed keeps at least its own patch (a duplicate feature
    included), so an image gets exactly num_seeds[b] tokens."""
    B, N, D = x.shape
    S = max(int(num_seeds.max().item()), 1)
    order = torch.argsort(score, dim=1, descending=True, stable=True)[:, :S]  # (B, S)
    seed_ok = torch.arange(S, device=x.device).view(1, S) < num_seeds.view(B, 1)
    xf = x.float()
    # |x - s|^2 = |x|^2 + |s|^2 - 2 x.s: one batched matmul, no (B, N, S, D) difference
    # tensor (README, "SeTok as a visual-token reducer": reducer times), on features centred
    # per image (less cancellation); a seed's distance to itself is exactly 0
    xc = xf - xf.mean(1, keepdim=True)
    cs = xc.gather(1, order.unsqueeze(-1).expand(B, S, D))  # (B, S, D)
    d2 = torch.baddbmm(xc.square().sum(-1, keepdim=True) + cs.square().sum(-1).unsqueeze(1),
                       xc, cs.transpose(1, 2), alpha=-2.0).clamp_min(0.0) / D  # (B, N, S)
    d2 = d2.scatter(1, order.unsqueeze(1), torch.zeros(B, 1, S, dtype=d2.dtype, device=d2.device))
    d2 = d2.masked_fill(~seed_ok.unsqueeze(1), math.inf)
    nearest = d2.detach().argmin(-1)  # (B, N), first minimum
    # a seed's patch is its own (also when an earlier seed has the very same feature)
    own = torch.arange(S, device=x.device).view(1, S).expand(B, S)
    nearest = nearest.scatter(1, order, torch.where(seed_ok, own, nearest.gather(1, order)))
    onehot = torch.nn.functional.one_hot(nearest, S).to(xf.dtype)  # (B, N, S)
    logits = -math.log(2.0) * d2 / (bandwidth * bandwidth)
    # an image with no seed (no valid patch) has a row of -inf, whose softmax is NaN
    logits = logits.masked_fill(~seed_ok.any(1).view(B, 1, 1), 0.0)
    soft = torch.softmax(logits, dim=-1)
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


# ------------------------------------------------------------------ connectivity (hard)

def _neighbour_pairs(h: int, w: int, connectivity: int, device) -> tuple[Tensor, Tensor]:
    """Flat indices (a, b) of every pair of neighbouring patches on an h x w grid, each
    pair once (4-connectivity: right and down; 8: also the two diagonals)."""
    idx = torch.arange(h * w, device=device).view(h, w)
    a = [idx[:, :-1].reshape(-1), idx[:-1, :].reshape(-1)]
    b = [idx[:, 1:].reshape(-1), idx[1:, :].reshape(-1)]
    if connectivity == 8:
        a += [idx[:-1, :-1].reshape(-1), idx[:-1, 1:].reshape(-1)]
        b += [idx[1:, 1:].reshape(-1), idx[1:, :-1].reshape(-1)]
    return torch.cat(a), torch.cat(b)


def connected_components(labels: Tensor, grid: tuple[int, int], connectivity: int = 4) -> Tensor:
    """Connected pieces of every label's region on the patch grid, all images at once.

    labels: (B, N) int64, N = h * w, -1 for no patch (padding). Two patches are connected
    when they are grid neighbours (4- or 8-connectivity) with the same label >= 0.
    -> (B, N) int64: the smallest flat index of the patch's piece (its root), -1 where
    labels is -1. Min-label propagation with pointer jumping (no loop over labels or
    images; a few dozen sweeps on a 24 x 24 grid at most).
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    B, N = labels.shape
    h, w = grid
    if h * w != N:
        raise ValueError(f"grid {grid} does not match {N} patches")
    a, b = _neighbour_pairs(h, w, connectivity, labels.device)
    la, lb = labels[:, a], labels[:, b]
    same = (la == lb) & (la >= 0)  # (B, P) edges inside a region
    ok = labels >= 0
    idx = torch.arange(N, device=labels.device).view(1, N).expand(B, N)
    comp = torch.where(ok, idx, torch.full_like(idx, N))  # N: sentinel, larger than any index
    big = torch.full_like(la, N)
    while True:
        ca, cb = comp[:, a], comp[:, b]
        new = comp.scatter_reduce(1, a.expand(B, -1), torch.where(same, cb, big), "amin")
        new = new.scatter_reduce(1, b.expand(B, -1), torch.where(same, ca, big), "amin")
        # pointer jumping: a root's own root is at least as small and in the same piece
        new = torch.where(ok, new.gather(1, new.clamp(max=N - 1)), new)
        if torch.equal(new, comp):
            break
        comp = new
    return torch.where(ok, comp, torch.full_like(comp, -1))


def _group_mean(x: Tensor, group: Tensor, member: Tensor, G: int) -> Tensor:
    """Mean of x (B, N, D) over the patches of each group. group (B, N) in [0, G), member
    (B, N) bool: which patches count. -> (B, G, D), 0 for an empty group."""
    B, N, D = x.shape
    m = member.to(x.dtype)
    cnt = torch.zeros(B, G, device=x.device, dtype=x.dtype).scatter_add(1, group, m)
    tot = torch.zeros(B, G, D, device=x.device, dtype=x.dtype).scatter_add(
        1, group.unsqueeze(-1).expand(B, N, D), x * m.unsqueeze(-1))
    return tot / cnt.clamp(min=1).unsqueeze(-1)


def split_connected(c: Clusters, x: Tensor, grid: tuple[int, int], valid: Tensor, max_tokens: int,
                    min_patches: int = 1, connectivity: int = 4) -> Clusters:
    """Make every token one connected region of the patch grid (hard masks).

    1. Each token's region is cut into its connected pieces (`connected_components`).
       A token keeps its largest piece (ties: the one with the seed, then the first in
       raster order). Its other pieces become tokens of their own when they have at least
       `min_patches` patches, largest first, while the image has fewer than `max_tokens`
       tokens.
    2. The other pieces, and the tokens smaller than `min_patches` altogether, are
       fragments: each joins the neighbouring token whose mean feature (x, over the
       patches it holds) is nearest to the fragment's own mean; rounds repeat until none
       is left that touches a token. A small token with no neighbour to join (a whole
       connected part of `valid`) stays; any other fragment left (possible only with a
       disconnected `valid`) goes back to its token.
       An image whose tokens are all small keeps its largest one as the start.
    So tokens are connected, none is smaller than `min_patches` unless it is alone in its
    connected part of `valid`, there are at most max(max_tokens, input count) of them, and labels, masks, seeds and
    num_tokens agree (masks.argmax(1) == labels on valid patches).

    Order: tokens keep the input order, each token's extra pieces right after it (raster
    order of their first patch). Seeds: a piece that holds its token's seed keeps it;
    another piece gets its patch nearest to the piece's mean feature; pieces of the scope
    remainder (seed -1) keep -1.

    Masks stay differentiable: at patch n, input row t is added to the output row that
    descends from it there (n's new token for n's own old token; for any other t the
    token that t's largest piece ended in), so the forward value is the new one-hot
    assignment and every input row's straight-through gradient is kept.
    """
    masks, labels, seeds, num = c.masks, c.labels, c.seeds, c.num_tokens
    B, K, N = masks.shape
    if N == 0 or B == 0:
        return c
    dev = x.device
    D = x.shape[-1]
    xf = x.detach().float()
    vf = valid.to(xf.dtype)
    ar = torch.arange(N, device=dev).view(1, N).expand(B, N)
    comp = connected_components(labels, grid, connectivity)  # (B, N) root, -1 invalid
    cz = comp.clamp(min=0)
    size = torch.zeros(B, N, device=dev, dtype=xf.dtype).scatter_add(1, cz, vf)  # per root
    psize = size.gather(1, cz)  # size of the patch's piece
    is_root = (comp == ar) & valid
    tok = labels.clamp(min=0)  # old token of each patch
    seed_of_tok = seeds.gather(1, tok)
    holds = valid & (seed_of_tok >= 0) & (comp.gather(1, seed_of_tok.clamp(min=0)) == comp)  # piece has the seed

    # 1. the largest piece of each token: key (size, holds the seed, first in raster order)
    key = size * 2 * (N + 1) + holds.to(xf.dtype) * (N + 1) + (N - ar).to(xf.dtype)
    key = torch.where(is_root, key, torch.full_like(key, -1.0))
    best = torch.full((B, K), -1.0, device=dev, dtype=xf.dtype).scatter_reduce(1, tok, key, "amax")
    main = is_root & (key == best.gather(1, tok))  # at roots
    main_root = torch.zeros(B, K, dtype=torch.long, device=dev).scatter_reduce(
        1, tok, torch.where(main, ar, torch.zeros_like(ar)), "amax")  # (B, K)
    extra = is_root & ~main & (size >= min_patches)
    budget = (max_tokens - num).clamp(min=0)
    ekey = torch.where(extra, size * (N + 1) + (N - ar).to(xf.dtype), torch.full_like(size, -1.0))
    erank = torch.argsort(torch.argsort(ekey, dim=1, descending=True, stable=True), dim=1)
    kept = main | (extra & (erank < budget.view(B, 1)))  # at roots
    # provisional ids: by (old token, largest piece first, root)
    okey = torch.where(kept, tok * (N + 1) + torch.where(main, torch.zeros_like(ar), ar + 1),
                       torch.full_like(ar, (K + 1) * (N + 1)))
    order = torch.argsort(okey, dim=1, stable=True)  # kept roots first
    pos = torch.empty_like(ar).scatter_(1, order, ar)  # provisional id of each kept root
    K2 = max(int(kept.sum(1).max().item()), 1)
    root_id = torch.where(kept, pos, torch.full_like(ar, -1))
    pid = torch.where(valid, root_id.gather(1, cz), torch.full_like(ar, -1))  # provisional id per patch
    weak = (pid >= 0) & (psize < min_patches)  # a whole token below min_patches
    assign = torch.where(weak, torch.full_like(pid, -1), pid)
    # an image whose tokens are all small keeps the largest one
    none_left = ~(assign >= 0).any(1, keepdim=True)  # (B, 1)
    wkey = torch.where(is_root & weak, key, torch.full_like(key, -1.0))
    top = is_root & weak & (wkey == wkey.amax(1, keepdim=True)) & none_left
    top_id = torch.where(top, pid, torch.full_like(pid, -1)).amax(1, keepdim=True)
    assign = torch.where(weak & (pid == top_id), pid, assign)

    # 2. fragments join the neighbouring token with the nearest mean feature
    a, b = _neighbour_pairs(*grid, connectivity, dev)
    f_idx, g_idx = torch.cat([a, b]), torch.cat([b, a])  # directed pairs (fragment, token side)
    for _ in range(N):
        frag = valid & (assign < 0)
        pair = frag[:, f_idx] & (assign[:, g_idx] >= 0)  # (B, P)
        if not bool(pair.any()):
            break
        at = assign.clamp(min=0)
        tmean = _group_mean(xf, at, assign >= 0, K2)  # (B, K2, D)
        fmean = _group_mean(xf, cz, frag, N)  # (B, N roots, D)
        dm = (fmean.square().sum(-1, keepdim=True) + tmean.square().sum(-1).unsqueeze(1)
              - 2.0 * fmean @ tmean.transpose(1, 2)).clamp_min(0.0)  # (B, N, K2)
        froot, gtok = cz[:, f_idx], at[:, g_idx]
        d = dm.reshape(B, N * K2).gather(1, froot * K2 + gtok)
        d = torch.where(pair, d, torch.full_like(d, math.inf))
        dmin = torch.full((B, N), math.inf, device=dev, dtype=xf.dtype).scatter_reduce(1, froot, d, "amin")
        win = pair & (d == dmin.gather(1, froot))
        target = torch.full_like(ar, K2).scatter_reduce(
            1, froot, torch.where(win, gtok, torch.full_like(gtok, K2)), "amin")  # per root, K2: none
        tgt = target.gather(1, cz)
        assign = torch.where(frag & (tgt < K2), tgt, assign)
    assign = torch.where(valid & (assign < 0) & weak, pid, assign)  # lone small tokens stay
    main_at = assign.gather(1, main_root)  # (B, K) where each token's largest piece ended
    assign = torch.where(valid & (assign < 0), main_at.gather(1, tok), assign)  # (disconnected valid)

    # compact the provisional ids that still hold patches
    at = assign.clamp(min=0)
    present = torch.zeros(B, K2, device=dev, dtype=xf.dtype).scatter_add(1, at, vf) > 0
    newpos = present.long().cumsum(1) - 1  # (B, K2)
    new_num = present.sum(1)
    K3 = max(int(new_num.max().item()), 1)
    new_labels = torch.where(valid, newpos.gather(1, at), torch.full_like(ar, -1))

    # masks: per patch, old row t -> the new row that descends from it there
    dest = newpos.gather(1, main_at.clamp(min=0)).clamp(min=0).unsqueeze(-1).expand(B, K, N)
    own = (torch.arange(K, device=dev).view(1, K, 1) == tok.unsqueeze(1)) & valid.unsqueeze(1)  # (B, K, N)
    dest = torch.where(own, new_labels.clamp(min=0).unsqueeze(1).expand(B, K, N), dest)
    new_masks = torch.zeros(B, K3, N, device=dev, dtype=masks.dtype).scatter_add(1, dest, masks)
    rows_ok = torch.arange(K3, device=dev).view(1, K3) < new_num.view(B, 1)
    new_masks = new_masks * rows_ok.unsqueeze(-1).to(new_masks.dtype)

    # seeds of the provisional ids, then compacted
    rootpos = order[:, :K2]  # (B, K2) root of each provisional id
    old_seed = seed_of_tok.gather(1, rootpos)
    keep_seed = holds.gather(1, rootpos)
    pmean = _group_mean(xf, cz, valid, N)  # per root
    dd = (xf - pmean.gather(1, cz.unsqueeze(-1).expand(B, N, D))).square().sum(-1)
    dd = torch.where(valid, dd, torch.full_like(dd, math.inf))
    dbest = torch.full((B, N), math.inf, device=dev, dtype=xf.dtype).scatter_reduce(1, cz, dd, "amin")
    cand = valid & (dd == dbest.gather(1, cz))
    rep = torch.full_like(ar, N).scatter_reduce(1, cz, torch.where(cand, ar, torch.full_like(ar, N)), "amin")
    seeds2 = torch.where(keep_seed, old_seed, torch.where(old_seed >= 0, rep.gather(1, rootpos), -torch.ones_like(old_seed)))
    new_seeds = torch.full((B, K3 + 1), -1, dtype=torch.long, device=dev).scatter_(
        1, torch.where(present, newpos, torch.full_like(newpos, K3)), seeds2)[:, :K3]
    return Clusters(new_masks, new_labels, new_seeds, new_num)
