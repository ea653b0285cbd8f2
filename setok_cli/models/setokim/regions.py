"""Regions: SeTok tokens to masks through the stage-1 mask decoder (segmentation, stage III).

    seen = read_images(model, ["a.png"])                   # SeTok output + pixels, once per image
    probs = region_probs(model, seen, tokens, token_mask)   # (N, K, S, S) mask probabilities
    masks = to_original(probs[i], seen, i)                  # (K, H_i, W_i) on image i's own pixels
    tok, iou = best_region_tokens(model, seen, masks)       # the token whose mask fits best

How Setokim segments (paper Fig. 2): asked "Segment the leftmost red circle.", it answers
`[Img] v [/Img]` with one visual token v, and the mask decoder turns v into a mask over the
input image's pixel embeddings (its dot product of token and pixel embeddings). The
training target for v is the input image's own SeTok token whose decoded mask has the best
IoU with the referred object's mask (`best_region_tokens`): stage III then learns, with the
same visual loss as every written image, to name the right token, and the mask decoder
stays the frozen stage-1 one. At inference the produced token may be snapped to the nearest
token of the input image (`snap`, in standardised token space).

Shapes: pixel_values (N, 3, S, S); tokens (N, K, T) in the tokenizer's units (not
standardised); masks (H, W) bool on an image's own pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import UserError

__all__ = ["Seen", "read_images", "region_probs", "to_original", "grid_masks", "best_region_tokens", "snap", "mask_iou"]


@dataclass
class Seen:
    """Images as the SeTok saw them."""
    out: object                 # TokenizerOutput (tokens, token_mask, seeds, features, image_grids)
    pixel_values: Tensor        # (N, 3, S, S) in [0, 1], letterboxed / squashed as SeTok does
    sizes: list                 # per image (H, W) of the original
    patch: int

    def token_sets(self, model) -> list[Tensor]:
        """[tokens (K_i, T)] in generation order (what prompts take)."""
        return model.token_sets_of(self.out)

    def seeds(self, model) -> list[Tensor]:
        """[seeds (K_i,)] beside `token_sets` (flat patch indices, NO_SEED for none)."""
        return model.token_sets_of(self.out, seeds=True)[1]


def _need(model, part: str):
    if getattr(model, part, None) is None:
        what = {"setok": "a SeTok (setok/)", "mask_decoder": "a mask decoder (mask_decoder/)"}[part]
        raise UserError(f"this Setokim has no {what}: its stage-1 checkpoint saved none")
    return getattr(model, part)


@torch.no_grad()
def read_images(model, images: Sequence) -> Seen:
    """Paths / PIL images / uint8 arrays -> Seen (SeTok in eval mode, no gradients)."""
    from ...images import as_image
    setok = _need(model, "setok")
    pil = [as_image(x) for x in images]
    if not pil:
        raise UserError("no images")
    names = [str(x) if isinstance(x, (str, bytes)) or hasattr(x, "__fspath__") else f"image {i}"
             for i, x in enumerate(images)]
    was = setok.training
    setok.eval()
    try:
        px, valid, grids, _ = setok.preprocess(pil, names)
        out = setok(px.to(setok.device), valid.to(setok.device))
    finally:
        setok.train(was)
    out.image_grids = grids
    return Seen(out, px.to(setok.device), [(im.height, im.width) for im in pil], int(setok.patch_size))


@torch.no_grad()
def region_probs(model, seen: Seen, tokens: Tensor, rows: Optional[Tensor] = None) -> Tensor:
    """tokens (N, K, T) -> mask probabilities (N, K, S, S) over the images of `seen`
    (rows: which image of `seen` each row of tokens belongs to; default 0..N-1)."""
    dec = _need(model, "mask_decoder")
    rows = torch.arange(tokens.shape[0]) if rows is None else rows
    px = seen.pixel_values[rows]
    feats = seen.out.features[rows] if dec.config.feature_dim > 0 else None
    dtype = next(dec.parameters()).dtype
    logits = dec(px.to(dtype), tokens.to(px.device, dtype), None if feats is None else feats.to(dtype))
    return torch.sigmoid(logits.float())


def to_original(probs: Tensor, seen: Seen, i: int) -> Tensor:
    """probs (K, S, S) of image i -> (K, H_i, W_i) on the image's own pixels (the valid
    block of the canvas, resized back)."""
    gh, gw = seen.out.image_grids[i]
    p = seen.patch
    block = probs[:, : gh * p, : gw * p]
    H, W = seen.sizes[i]
    return F.interpolate(block.unsqueeze(0).float(), size=(H, W), mode="bilinear", align_corners=False)[0]


def grid_masks(probs: Tensor, seen: Seen, grid: int, threshold: float = 0.5) -> Tensor:
    """probs (N, S, S) of the images of `seen` -> (N, grid * grid) bool: each image's mask
    (p > threshold) over its own extent (`to_original`) on a grid x grid raster, as token
    layouts are (`bank.token_sets_with_layouts`)."""
    out = []
    for i in range(probs.shape[0]):
        m = to_original(probs[i:i + 1], seen, i)                                  # (1, H, W)
        m = F.interpolate(m[None], size=(grid, grid), mode="bilinear", align_corners=False)
        out.append(m.flatten() > threshold)
    return torch.stack(out)


def mask_iou(pred: Tensor, target: Tensor) -> Tensor:
    """pred (K, H, W) bool, target (H, W) bool -> IoU (K,); 1 where both are empty."""
    inter = (pred & target).flatten(1).sum(1).float()
    union = (pred | target).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


@torch.no_grad()
def best_region_tokens(model, seen: Seen, masks: Sequence, rows: Optional[Sequence[int]] = None
                       ) -> tuple[Tensor, Tensor]:
    """Per target mask j (H_i, W_i) (bool array / tensor) of image i = rows[j] of `seen`
    (default: mask j is image j's): that image's SeTok token whose decoded mask (p > 0.5)
    has the best IoU with it. Each image is decoded once, however many masks it has.
    -> tokens (M, T) in the tokenizer's units, their IoU (M,)."""
    out = seen.out
    rows = list(range(len(masks))) if rows is None else [int(r) for r in rows]
    if len(rows) != len(masks):
        raise UserError(f"{len(masks)} masks but {len(rows)} image rows")
    images = sorted(set(rows))
    probs = region_probs(model, seen, out.tokens[images], torch.tensor(images))     # (n, K, S, S)
    decoded = {i: to_original(probs[j], seen, i) > 0.5 for j, i in enumerate(images)}
    toks, ious = [], []
    for j, (i, m) in enumerate(zip(rows, masks)):
        target = torch.as_tensor(np.asarray(m)).bool()
        if tuple(target.shape) != tuple(seen.sizes[i]):
            raise UserError(f"mask {j}: {tuple(target.shape)} pixels, its image has {tuple(seen.sizes[i])}")
        iou = mask_iou(decoded[i], target.to(probs.device))
        iou = torch.where(out.token_mask[i], iou, torch.full_like(iou, -1.0))
        k = int(iou.argmax())
        toks.append(out.tokens[i, k])
        ious.append(iou[k])
    return torch.stack(toks), torch.stack(ious)


def snap(model, produced: Tensor, candidates: Sequence[Tensor]) -> Tensor:
    """produced (N, T) -> the nearest candidate token of each row (candidates[i]: (K_i, T)),
    distances measured in standardised token space (model.normalize)."""
    rows = []
    for x, c in zip(produced, candidates):
        if c.shape[0] == 0:
            rows.append(x)
            continue
        d = (model.normalize(c.float()) - model.normalize(x.float()).unsqueeze(0)).pow(2).sum(-1)
        rows.append(c[int(d.argmin())])
    return torch.stack(rows)
