"""The cluster merger (paper section 2.1): one token per cluster.

    X_i = PE(X) * M_i + X * M_i           (2-D sin-cos PE, after a Linear to the width d)
        [+ R_i * M_i with relative_pe > 0: Fourier features of each patch's offset from
         the cluster's centroid, after a Linear (or an MLP) to d; see ClusterMerger.relative]
    L blocks of (2-head self-attention, FFN; pre-norm residual) within each cluster
    average pooling over the cluster      -> one vector per cluster
        [+ CNN(crop_i) with crop > 0: the image and M_i resampled in the cluster's box;
         see CropEncoder]
    L' blocks across the cluster tokens of an image
    LayerNorm, Linear to token_dim

Hard masks (hard / threshold / fixed modes): the clusters of all images are packed into
one ragged sequence (patches sorted by (image, token)) and attend with
`varlen_attention`, whose cost grows with the sum of the squared cluster sizes. Soft
masks: every cluster attends over all N patches of its image, each key weighted by the
mask (log M_i added to the logits), and pools with the mask as weights; with 0/1 masks
that is exactly the hard computation.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .position import box_crops, mask_boxes, sincos_2d

MIN_BUCKET = 8  # clusters up to this size share one padded batch


def varlen_plan(cu_seqlens: Tensor, total: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """How varlen_attention batches the packed sequences; build once, reuse in every block.

    Sequences are bucketed by their length rounded up to a power of two (at least
    MIN_BUCKET); each bucket becomes one dense padded batch, so the work is at most 4x the
    sum of squared lengths and there are at most log2(max length) buckets, however many
    sequences there are. -> per bucket: idx (C, cap) rows to gather, inside (C, cap) bool,
    rows (M,) = idx[inside], the packed rows the bucket writes.
    """
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    starts = cu_seqlens[:-1]
    keep = lens > 0
    lens, starts = lens[keep], starts[keep]
    plan = []
    if lens.numel() == 0:
        return plan
    caps = torch.clamp(2 ** torch.ceil(torch.log2(lens.double())).long(), min=MIN_BUCKET)
    for cap in torch.unique(caps).tolist():  # <= log2(N) buckets
        sel = caps == cap
        L, S0 = lens[sel], starts[sel]  # (C,)
        cap = min(cap, int(L.max()))
        pos = torch.arange(cap, device=cu_seqlens.device).view(1, cap)
        inside = pos < L.view(-1, 1)  # (C, cap)
        idx = (S0.view(-1, 1) + pos).clamp(max=total - 1)  # clamped rows are masked out
        plan.append((idx, inside, idx[inside]))
    return plan


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, plan=None) -> Tensor:
    """Attention within each of the packed sequences (the flash-attn varlen interface).

    q, k, v: (P, H, hd); sequence s = rows cu_seqlens[s]:cu_seqlens[s+1]. -> (P, H, hd).
    See varlen_plan for the batching; pass a plan to reuse it across layers.
    """
    P = q.shape[0]
    if plan is None:
        plan = varlen_plan(cu_seqlens, P)
    qkv = torch.stack([q, k, v], 1)  # (P, 3, H, hd): one gather per bucket
    out = q.new_empty(q.shape)
    for idx, inside, rows in plan:
        C, cap = idx.shape
        g = qkv[idx].permute(2, 0, 3, 1, 4)  # (3, C, H, cap, hd)
        o = F.scaled_dot_product_attention(g[0], g[1], g[2], attn_mask=inside.view(C, 1, 1, cap))
        out[rows] = o.transpose(1, 2)[inside]  # (M, H, hd)
    return out


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"merger width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def packed(self, x: Tensor, cu_seqlens: Tensor, plan=None) -> Tensor:
        """x: (P, d) packed sequences -> (P, d)."""
        P, d = x.shape
        q, k, v = self.qkv(x).view(P, 3, self.heads, d // self.heads).unbind(1)
        return self.proj(varlen_attention(q, k, v, cu_seqlens, plan).reshape(P, d))

    def dense(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """x: (S, L, d); bias: (S, L) additive key bias (or bool keep mask) -> (S, L, d)."""
        S, L, d = x.shape
        qkv = self.qkv(x).view(S, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if bias is None else bias.view(S, 1, 1, L)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
        return self.proj(o.transpose(1, 2).reshape(S, L, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def packed(self, x: Tensor, cu_seqlens: Tensor, plan=None) -> Tensor:
        x = x + self.attn.packed(self.norm1(x), cu_seqlens, plan)
        return x + self.mlp(self.norm2(x))

    def dense(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        x = x + self.attn.dense(self.norm1(x), bias)
        return x + self.mlp(self.norm2(x))


def relative_fourier(offset: Tensor, octaves: int) -> Tensor:
    """offset (..., 2) in image sides -> (..., 4 * octaves): sin and cos of pi 2^j offset_x and
    offset_y, j = 0 .. octaves - 1 (the finest period is 2^(1-octaves) of the image side)."""
    freq = math.pi * 2.0 ** torch.arange(octaves, device=offset.device, dtype=offset.dtype)  # (F,)
    ang = offset.unsqueeze(-1) * freq  # (..., 2, F)
    return torch.cat([ang.sin(), ang.cos()], -1).flatten(-2)


class CropEncoder(nn.Module):
    """Each cluster seen as an object crop: the image and the cluster's mask resampled into
    the cluster's square box (widened by `margin` patches) at size x size, through a small
    CNN. -> (B, K, dim), added to the pooled cluster vector.

    pixels (B, 3, H, W) in [0, 1] over the patch grid; masks (B, K, h, w) the clustering
    masks. The box comes from the mask (its cells > 0.5), so the crop follows the cluster
    wherever it is and whatever its size: the CNN sees each object's outline in the object's
    own frame, at the image's resolution rather than the patch grid's.
    """

    def __init__(self, size: int, width: int, dim: int, margin: float = 0.5):
        super().__init__()
        if size < 4 or size % 4:
            raise ValueError(f"merger_crop must be a multiple of 4 (>= 4), got {size}")
        self.size = int(size)
        self.margin = float(margin)
        w = int(width)
        self.net = nn.Sequential(
            nn.Conv2d(4, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.GELU(),
            nn.Flatten(), nn.Linear(2 * w * (self.size // 4) ** 2, dim))

    def boxes(self, masks: Tensor) -> Tensor:
        """masks (B, K, h, w) -> (B, K, 3) square boxes (centre x, y, half-side) in the
        image's [-1, 1] frame, widened by at least `margin` patches on each axis (a patch spans
        2 / w of the frame across and 2 / h down: the shorter side's patches are the wider);
        empty masks get the whole image."""
        h, w = masks.shape[-2:]
        box = mask_boxes(masks.detach())
        box = box + torch.tensor([0.0, 0.0, 2.0 * self.margin / min(h, w)], device=box.device)
        whole = torch.tensor([0.0, 0.0, 1.0], device=box.device)
        return torch.where(torch.isfinite(box).all(-1, keepdim=True), box, whole)

    def crops(self, pixels: Tensor, masks: Tensor) -> Tensor:
        """-> (B, K, 4, size, size): RGB in [-1, 1] and the mask, sampled in each box."""
        B, K = masks.shape[:2]
        S = self.size
        box = self.boxes(masks)  # (B, K, 3)
        rgb = box_crops(pixels.float() * 2 - 1, box, S, padding_mode="border")  # (B, K, 3, S, S)
        m = box_crops(masks.reshape(B * K, 1, *masks.shape[-2:]), box.reshape(B * K, 1, 3), S).view(B, K, 1, S, S)
        return torch.cat([rgb, m], 2)

    def forward(self, pixels: Tensor, masks: Tensor, token_mask: Optional[Tensor] = None) -> Tensor:
        """-> (B, K, dim); rows outside token_mask (B, K) are zero (and cost nothing)."""
        B, K = masks.shape[:2]
        x = self.crops(pixels, masks)  # (B, K, 4, S, S)
        if token_mask is None:
            return self.net(x.flatten(0, 1)).view(B, K, -1)
        y = self.net(x[token_mask])  # (M, dim); its dtype follows autocast
        out = y.new_zeros(B, K, y.shape[-1])
        out[token_mask] = y
        return out


class ClusterMerger(nn.Module):
    """features (B, N, in_dim) + masks (B, K, N) -> tokens (B, K, token_dim).

    relative_pe = F > 0 adds, to every patch inside cluster i, Linear(relative_fourier(p - c_i))
    where p is the patch's centre and c_i the cluster's mask-weighted centroid, both in
    image sides. The absolute PE says where a cluster is; these say where each patch is
    *within* it, the same wherever the cluster sits, so the within-cluster blocks see its
    silhouette in its own frame and the pooled token can carry its shape (README, "Does the
    token carry the shape?"). Off (0) by default, as in the paper.
    relative_hidden = W > 0 makes that Linear an MLP (Linear, GELU, Linear) of hidden width W.

    crop = S > 0 adds CropEncoder(S, crop_width, d) to each pooled cluster vector: the
    object's outline at the image's resolution, which a frozen encoder that smooths within
    its patches (the builtin one) and a 4-pixel patch grid cannot give. Off (0) by default:
    the paper's merger sees the encoder features only.
    """

    def __init__(self, in_dim: int, dim: int = 256, token_dim: int = 256, depth: int = 2, cross_depth: int = 2,
                 heads: int = 2, mlp_ratio: float = 4.0, relative_pe: int = 0,
                 relative_hidden: int = 0, crop: int = 0, crop_width: int = 16):
        super().__init__()
        self.crop = CropEncoder(crop, crop_width, dim) if crop > 0 else None
        self.dim = dim
        self.relative_pe = int(relative_pe)
        self.in_proj = nn.Linear(in_dim, dim)
        rin = 4 * self.relative_pe
        if self.relative_pe <= 0:
            self.rel_proj = None
        elif relative_hidden > 0:
            self.rel_proj = nn.Sequential(nn.Linear(rin, relative_hidden), nn.GELU(), nn.Linear(relative_hidden, dim))
        else:
            self.rel_proj = nn.Linear(rin, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.cross = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(cross_depth))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, token_dim)

    def embed(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """in_proj(X) + PE: (B, N, in_dim) -> (B, N, d)."""
        h, w = grid
        pe = sincos_2d(self.dim, h, w, device=x.device, dtype=torch.float32).view(1, h * w, self.dim)
        return self.in_proj(x.float()) + pe

    @staticmethod
    def positions(grid: tuple[int, int], device=None) -> Tensor:
        """Patch centres in image sides (x, y), row-major: (h * w, 2)."""
        h, w = grid
        s = float(max(h, w))
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / s
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / s
        return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).view(h * w, 2)

    def centroids(self, weights: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """weights (B, K, N) cluster memberships (0/1 or soft) -> (patch centres (N, 2),
        each cluster's weighted centroid (B, K, 2)), in image sides."""
        pos = self.positions(grid, weights.device)
        w = weights.float()
        return pos, (w @ pos) / w.sum(-1, keepdim=True).clamp_min(1e-12)

    def offset_features(self, off: Tensor) -> Tensor:
        """off (..., 2) patch offsets from their cluster's centroid, in image sides -> (..., d):
        their Fourier features through rel_proj (a Linear, or an MLP with relative_hidden > 0:
        joint functions of x and y, which pooled over the cluster make a learnt shape descriptor)."""
        return self.rel_proj(relative_fourier(off, self.relative_pe))

    def relative(self, weights: Tensor, grid: tuple[int, int]) -> Tensor:
        """weights (B, K, N) -> R (B, K, N, d): the embedded offset of every patch from each
        cluster's weighted centroid."""
        pos, cen = self.centroids(weights, grid)
        return self.offset_features(pos.view(1, 1, -1, 2) - cen.unsqueeze(2))

    def forward(self, x: Tensor, masks: Tensor, labels: Tensor, num_tokens: Tensor, grid: tuple[int, int],
                hard: bool = True, pixels: Optional[Tensor] = None) -> Tensor:
        """x: (B, N, in_dim) encoder features; masks: (B, K, N); labels: (B, N) (-1 invalid);
        num_tokens: (B,); pixels (B, 3, H, W) in [0, 1] over the same grid (needed, and only
        read, with crop > 0). -> tokens (B, K, token_dim), rows past num_tokens zero."""
        B, K, N = masks.shape
        e = self.embed(x, grid)  # (B, N, d)
        if self.crop is not None and pixels is None:
            raise ValueError("this merger reads the image (merger_crop > 0): pass it as `pixels`")
        if hard:
            u = self.pool_packed(e, masks, labels, grid)
        else:
            u = self.pool_soft(e, masks, grid)  # (B, K, d)
        token_mask = torch.arange(K, device=x.device).view(1, K) < num_tokens.view(B, 1)
        if self.crop is not None:
            u = u + self.crop(pixels.to(e.device), masks.view(B, K, *grid), token_mask)
        for blk in self.cross:
            u = blk.dense(u, token_mask)
        t = self.out(self.norm(u))
        return t * token_mask.unsqueeze(-1).to(t.dtype)

    def pool_packed(self, e: Tensor, masks: Tensor, labels: Tensor, grid: Optional[tuple[int, int]] = None) -> Tensor:
        """Hard masks: every cluster of every image in one packed varlen pass. -> (B, K, d)"""
        B, K, N = masks.shape
        d = e.shape[-1]
        valid = labels >= 0
        lab = labels.clamp_min(0)
        if self.rel_proj is not None:  # each patch's offset from its own cluster's centroid
            own = F.one_hot(lab, K).transpose(1, 2).float() * valid.unsqueeze(1)  # (B, K, N)
            pos, cen = self.centroids(own, grid)  # (N, 2), (B, K, 2)
            off = pos.view(1, N, 2) - cen.gather(1, lab.unsqueeze(-1).expand(B, N, 2))  # (B, N, 2)
            e = e + self.offset_features(off)
        # each patch's own mask value: 1 in the forward pass, carries the clustering gradient
        m = masks.gather(1, lab.unsqueeze(1)).squeeze(1) * valid.to(masks.dtype)  # (B, N)
        xm = e * m.unsqueeze(-1)  # X_i = (X + PE) * M_i on the cluster's own patches
        seg = (torch.arange(B, device=e.device).view(B, 1) * K + lab)  # (B, N) global cluster id
        seg = torch.where(valid, seg, torch.full_like(seg, B * K))  # invalid: sorts last
        order = torch.argsort(seg.view(-1), stable=True)  # raster order within a cluster
        P = int(valid.sum())
        order = order[:P]
        seg_p = seg.view(-1)[order]
        lens = torch.bincount(seg_p, minlength=B * K)  # (B*K,)
        cu = F.pad(torch.cumsum(lens, 0), (1, 0))
        h = xm.reshape(B * N, d)[order]  # (P, d)
        plan = varlen_plan(cu, P)
        for blk in self.blocks:
            h = blk.packed(h, cu, plan)
        summed = torch.zeros(B * K, d, device=e.device, dtype=h.dtype).index_add_(0, seg_p, h)
        return (summed / lens.clamp_min(1).unsqueeze(-1).to(h.dtype)).view(B, K, d)

    def pool_soft(self, e: Tensor, masks: Tensor, grid: Optional[tuple[int, int]] = None) -> Tensor:
        """Soft masks: cluster i attends over all patches with keys weighted by M_i. -> (B, K, d)"""
        B, K, N = masks.shape
        d = e.shape[-1]
        m = masks.float()
        ek = e.unsqueeze(1)  # (B, 1, N, d)
        if self.rel_proj is not None:  # offsets from the mask-weighted centroid (differentiable in M)
            ek = ek + self.relative(m, grid)  # (B, K, N, d)
        xm = (ek * m.unsqueeze(-1)).reshape(B * K, N, d)  # (B*K, N, d)
        has = m > 0
        empty = ~has.any(-1)  # padded token rows
        bias = torch.where(has, m.clamp_min(1e-30).log(), torch.full_like(m, -math.inf))
        bias = torch.where(empty.unsqueeze(-1), torch.zeros_like(bias), bias).reshape(B * K, N)
        h = xm
        for blk in self.blocks:
            h = blk.dense(h, bias)
        w = m.reshape(B * K, N, 1)
        u = (h * w).sum(1) / w.sum(1).clamp_min(1e-12)
        return u.view(B, K, d)
