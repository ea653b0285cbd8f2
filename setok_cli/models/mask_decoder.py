"""Mask decoder and mask consistency of SeTok's stage-1 training (paper eq. 4).

    L_mask = KL(M || stopgrad(pi)) + L_bce + L_dice

Each token predicts one mask: mask logits are the token's embedding against per-pixel
embeddings at the image's resolution (Mask2Former's dot product, without queries since
the tokens *are* the queries). Predicted masks are matched one-to-one to the instance
masks with the Hungarian algorithm (scipy) on a BCE + dice cost, and the matched pairs
are trained with BCE + dice. `pi`, the decoder's masks normalised over the tokens of an
image, then teaches the clustering masks `M` (which carry gradients through the ops'
autograd) where the object boundaries are.

Shapes: tokens (B, K, T), token_mask (B, K) bool, images (B, 3, H, W) in [0, 1],
features (B, h, w, D), logits (B, K, H, W), instances (B, H, W) int64 with 0 = background.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .hub import PretrainedModel, config_from_dict
from .position import coord_grid

__all__ = ["MaskDecoderConfig", "MaskDecoder", "pairwise_bce_cost", "pairwise_dice_cost", "dice_loss",
           "hungarian_match", "instance_targets", "mask_losses", "mask_consistency_kl", "segment_miou"]


@dataclass
class MaskDecoderConfig:
    token_dim: int = 64           # T, the tokenizer's token width
    feature_dim: int = 0          # D of the encoder's patch features fed as a coarse cue; 0 = unused
    embed_dim: int = 64           # E, where tokens meet pixels
    pixel_channels: int = 32      # width of the full-resolution conv stem
    num_convs: int = 2            # 3x3 convs in the stem
    coord_channels: bool = True   # add (x, y) in [-1, 1] to the stem's input: tells apart same-coloured objects
    match_background: bool = True  # the background (id 0) is a segment to match like an object
    # valid tokens the matching leaves without a segment learn an empty mask (BCE to 0, as
    # Mask2Former's "no object" queries): without it their masks are unsupervised and claim
    # pixels in the arg-max segmentation and in pi, the KL's target
    empty_unmatched: bool = False
    cost_bce: float = 1.0
    cost_dice: float = 1.0

    @classmethod
    def from_dict(cls, d: dict) -> "MaskDecoderConfig":
        return config_from_dict(cls, d)


class MaskDecoder(PretrainedModel, model_type="setok-mask-decoder", config_class=MaskDecoderConfig,
                  part_name="mask decoder", subfolder="mask_decoder"):
    """Per-token mask logits at the image's resolution."""

    def __init__(self, config: MaskDecoderConfig):
        super().__init__()
        self.config = c = config
        in_ch = 3 + (2 if c.coord_channels else 0)
        convs: list[nn.Module] = []
        for i in range(c.num_convs):
            convs += [nn.Conv2d(in_ch if i == 0 else c.pixel_channels, c.pixel_channels, 3, padding=1), nn.GELU()]
        self.stem = nn.Sequential(*convs)
        self.feature_proj = nn.Linear(c.feature_dim, c.pixel_channels) if c.feature_dim > 0 else None
        self.pixel_head = nn.Sequential(nn.Conv2d(c.pixel_channels, c.pixel_channels, 3, padding=1), nn.GELU(),
                                        nn.Conv2d(c.pixel_channels, c.embed_dim, 1))
        self.token_head = nn.Sequential(nn.LayerNorm(c.token_dim), nn.Linear(c.token_dim, c.embed_dim), nn.GELU(),
                                        nn.Linear(c.embed_dim, c.embed_dim))

    def pixel_embeddings(self, images: Tensor, features: Optional[Tensor] = None) -> Tensor:
        """images (B, 3, H, W), features (B, h, w, D) -> (B, E, H, W)."""
        B, _, H, W = images.shape
        x = images
        if self.config.coord_channels:
            # (y, x): the order the stem's first convolution was trained with
            x = torch.cat([x, coord_grid(B, H, W, device=x.device, dtype=x.dtype).flip(1)], dim=1)
        # channels-last activations: the same convolutions, faster on CPU (oneDNN)
        x = self.stem(x.contiguous(memory_format=torch.channels_last))
        if self.feature_proj is not None and features is not None:
            f = self.feature_proj(features.to(x.dtype)).permute(0, 3, 1, 2)  # (B, C, h, w)
            x = x + F.interpolate(f, size=(H, W), mode="bilinear", align_corners=False)
        return self.pixel_head(x)

    def forward(self, images: Tensor, tokens: Tensor, features: Optional[Tensor] = None) -> Tensor:
        """-> mask logits (B, K, H, W); rows of padded tokens are meaningless (mask them)."""
        pix = self.pixel_embeddings(images, features)           # (B, E, H, W)
        tok = self.token_head(tokens.to(pix.dtype))              # (B, K, E)
        return torch.einsum("bke,behw->bkhw", tok, pix) / self.config.embed_dim ** 0.5


# ---- losses ----------------------------------------------------------------------

def pairwise_bce_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean per-pixel BCE of every prediction against every target.
    logits (K, P), targets (N, P) in {0, 1} -> (K, N)."""
    P = logits.shape[-1]
    pos = F.softplus(-logits)   # -log sigmoid(x)
    neg = F.softplus(logits)    # -log(1 - sigmoid(x))
    return (pos @ targets.transpose(-1, -2) + neg @ (1 - targets).transpose(-1, -2)) / P


def pairwise_dice_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """1 - soft dice of every prediction against every target. (K, P), (N, P) -> (K, N)."""
    p = logits.sigmoid()
    inter = p @ targets.transpose(-1, -2)
    return 1 - (2 * inter + 1) / (p.sum(-1)[..., :, None] + targets.sum(-1)[..., None, :] + 1)


def dice_loss(probs: Tensor, targets: Tensor, eps: float = 1.0) -> Tensor:
    """Soft dice loss per mask: probs, targets (M, P) -> (M,). Laplace-smoothed so empty vs empty is 0."""
    inter = (probs * targets).sum(-1)
    return 1 - (2 * inter + eps) / (probs.sum(-1) + targets.sum(-1) + eps)


def instance_targets(instances: Tensor, match_background: bool = True) -> tuple[Tensor, Tensor]:
    """instances (B, H, W) int64 ids (0 = background) ->
    targets (B, N, H, W) float one-hot per id, target_valid (B, N) bool (the id occurs in the image).
    Row n is id n (id 0 dropped when `match_background` is False)."""
    n = int(instances.max().item()) + 1 if instances.numel() else 1
    onehot = F.one_hot(instances.long().clamp_min(0), n).permute(0, 3, 1, 2).float()  # (B, n, H, W)
    if not match_background:
        onehot = onehot[:, 1:]
    valid = onehot.flatten(2).sum(-1) > 0
    return onehot, valid


@torch.no_grad()
def hungarian_match(logits: Tensor, token_mask: Tensor, targets: Tensor, target_valid: Tensor,
                    cost_bce: float = 1.0, cost_dice: float = 1.0) -> list[tuple[np.ndarray, np.ndarray]]:
    """One-to-one matching of predicted masks to target masks, per image.

    logits (B, K, H, W), token_mask (B, K), targets (B, N, H, W), target_valid (B, N).
    Returns, per image, (token indices, target indices) into the padded K and N axes.
    The costs are batched; only scipy's assignment runs per image.
    """
    B, K = logits.shape[:2]
    pred = logits.flatten(2).float()
    tgt = targets.flatten(2).float().to(pred.device)
    cost = cost_bce * pairwise_bce_cost(pred, tgt) + cost_dice * pairwise_dice_cost(pred, tgt)  # (B, K, N)
    cost = cost.cpu().numpy()
    tm, tv = token_mask.cpu().numpy(), target_valid.cpu().numpy()
    out = []
    for b in range(B):
        rows, cols = np.nonzero(tm[b])[0], np.nonzero(tv[b])[0]
        if len(rows) == 0 or len(cols) == 0:
            out.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
            continue
        r, c = linear_sum_assignment(cost[b][np.ix_(rows, cols)])
        out.append((rows[r].astype(np.int64), cols[c].astype(np.int64)))
    return out


def mask_losses(logits: Tensor, token_mask: Tensor, instances: Tensor, match_background: bool = True,
                cost_bce: float = 1.0, cost_dice: float = 1.0, empty_unmatched: bool = False) -> dict[str, Tensor]:
    """Hungarian-matched BCE + dice. logits (B, K, H, W) at the resolution of instances (B, H, W).
    `empty_unmatched`: the valid tokens left unmatched join the BCE with an all-zero target."""
    if logits.shape[-2:] != instances.shape[-2:]:
        raise ValueError(f"logits {tuple(logits.shape)} and instances {tuple(instances.shape)} differ in size")
    targets, target_valid = instance_targets(instances.to(logits.device), match_background)
    matches = hungarian_match(logits, token_mask, targets, target_valid, cost_bce, cost_dice)
    bi = torch.cat([torch.full((len(r),), b, dtype=torch.long) for b, (r, _) in enumerate(matches)])
    ti = torch.from_numpy(np.concatenate([r for r, _ in matches])).long()
    gi = torch.from_numpy(np.concatenate([c for _, c in matches])).long()
    dev = logits.device
    bi, ti, gi = bi.to(dev), ti.to(dev), gi.to(dev)
    if len(bi) == 0:
        zero = logits.sum() * 0
        return {"bce": zero, "dice": zero}
    pred = logits[bi, ti].flatten(1).float()       # (M, P)
    tgt = targets[bi, gi].flatten(1)               # (M, P)
    dice = dice_loss(pred.sigmoid(), tgt).mean()
    if empty_unmatched:
        left = token_mask.clone()
        left[bi, ti] = False
        if bool(left.any()):
            extra = logits[left].flatten(1).float()
            pred = torch.cat([pred, extra])
            tgt = torch.cat([tgt, torch.zeros_like(extra)])
    bce = F.binary_cross_entropy_with_logits(pred, tgt)
    return {"bce": bce, "dice": dice}


def decoder_probs(logits: Tensor, token_mask: Tensor) -> Tensor:
    """pi: the decoder's masks normalised over the valid tokens of each image. (B, K, H, W)."""
    neg = torch.finfo(logits.dtype).min
    return logits.masked_fill(~token_mask[:, :, None, None], neg).softmax(dim=1)


def mask_consistency_kl(cluster_masks: Tensor, logits: Tensor, token_mask: Tensor, eps: float = 1e-6,
                        region: Optional[Tensor] = None) -> Tensor:
    """KL(M || stopgrad(pi)), averaged over the patches of the grid.

    cluster_masks (B, K, h, w): the clustering masks M (rows sum to 1 on real patches, 0 on
    padding), with gradients. logits (B, K, H, W): the decoder. pi is brought to the patch
    grid by area averaging (each patch gets the mean of its pixels' distributions, which
    still sums to 1), so M and pi describe the same regions. Entries with M = 0 add nothing
    (0 log 0 = 0); logs are clamped at `eps`, which also bounds the gradient of the
    straight-through hard masks: at M = 0 it is log(eps) - log(pi), pulling M up exactly
    where the decoder claims the patch. `region` (B, h, w) bool, optional: average over
    these patches only (e.g. those overlapping an object).
    """
    h, w = cluster_masks.shape[-2:]
    pi = decoder_probs(logits.detach().float(), token_mask)
    if pi.shape[-2:] != (h, w):
        pi = F.interpolate(pi, size=(h, w), mode="area")
    M = cluster_masks.float()
    kl = (M * (M.clamp_min(eps).log() - pi.clamp_min(eps).log())).sum(dim=1)  # (B, h, w)
    real = (M.sum(dim=1) > 0).float()
    if region is not None:
        real = real * region.to(real.device).float()
    return (kl * real).sum() / real.sum().clamp_min(1.0)


@torch.no_grad()
def segment_miou(logits: Tensor, token_mask: Tensor, instances: Tensor, include_background: bool = False
                 ) -> tuple[float, list[float]]:
    """Mask-decoder mIoU: each pixel goes to its arg-max valid token; the segments are
    matched one-to-one to the objects by maximal IoU (Hungarian); an unmatched object
    scores 0. Returns (mean IoU over objects, per-object IoUs)."""
    neg = torch.finfo(logits.dtype).min
    assign = logits.masked_fill(~token_mask[:, :, None, None], neg).argmax(dim=1)  # (B, H, W)
    K = logits.shape[1]
    pred = F.one_hot(assign, K).permute(0, 3, 1, 2).flatten(2).float()              # (B, K, P)
    targets, valid = instance_targets(instances.to(logits.device), match_background=True)
    if not include_background:
        targets, valid = targets[:, 1:], valid[:, 1:]
    tgt = targets.flatten(2)                                                        # (B, N, P)
    inter = pred @ tgt.transpose(1, 2)
    union = pred.sum(-1)[:, :, None] + tgt.sum(-1)[:, None, :] - inter
    iou = (inter / union.clamp_min(1)).cpu().numpy()                                # (B, K, N)
    ious: list[float] = []
    for b in range(iou.shape[0]):
        cols = np.nonzero(valid[b].cpu().numpy())[0]
        if len(cols) == 0:
            continue
        sub = iou[b][:, cols]
        r, c = linear_sum_assignment(-sub)
        per = np.zeros(len(cols))
        per[c] = sub[r, c]
        ious.extend(per.tolist())
    return (float(np.mean(ious)) if ious else 0.0), ious
