"""2-D sin-cos position embeddings (MAE / the authors' `get_2d_sincos_pos_embed`), CoordConv
channels, and the square boxes around masks that the merger's crop encoder and the sprite
canvas share (finding them, sampling inside them, and mapping points into their frame).

Half of the channels encode the row, half the column; each half is [sin, cos] of the
position times geometrically spaced frequencies 1 / temperature ** (i / (dim/4)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sincos_2d(dim: int, h: int, w: int, temperature: float = 10000.0, *, device=None,
              dtype=torch.float32) -> Tensor:
    """Position embedding of an h x w patch grid. -> (h, w, dim), values in [-1, 1].

    `dim` need not be a multiple of 4: the trailing channels that do not fill a whole
    (sin, cos) x (row, col) group are zero, so the embedding can be added to any width.
    """
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    q = dim // 4  # frequencies per axis
    out = torch.zeros(h, w, dim, device=device, dtype=torch.float32)
    if q == 0:
        return out.to(dtype)
    omega = 1.0 / temperature ** (torch.arange(q, device=device, dtype=torch.float64) / q)  # (q,)
    ys = torch.arange(h, device=device, dtype=torch.float64)
    xs = torch.arange(w, device=device, dtype=torch.float64)
    ay = ys[:, None] * omega[None]  # (h, q)
    ax = xs[:, None] * omega[None]  # (w, q)
    out[..., 0 * q:1 * q] = torch.sin(ay).float()[:, None, :]
    out[..., 1 * q:2 * q] = torch.cos(ay).float()[:, None, :]
    out[..., 2 * q:3 * q] = torch.sin(ax).float()[None, :, :]
    out[..., 3 * q:4 * q] = torch.cos(ax).float()[None, :, :]
    return out.to(dtype)


def mask_boxes(masks: Tensor) -> Tensor:
    """masks (B, K, H, W) -> (B, K, 3): the square box around each mask's pixels > 0.5,
    centre (x, y) and half-side (the larger half-extent) in the [-1, 1] frame of the image;
    NaN for a token with no such pixel."""
    B, K, H, W = masks.shape
    on = masks > 0.5
    xs = (torch.arange(W, device=masks.device, dtype=torch.float32) + 0.5) / W * 2 - 1
    ys = (torch.arange(H, device=masks.device, dtype=torch.float32) + 0.5) / H * 2 - 1
    colon, rowon = on.any(2), on.any(3)  # (B, K, W), (B, K, H)
    inf = torch.tensor(float("inf"), device=masks.device)
    x0 = torch.where(colon, xs, inf).amin(-1) - 1.0 / W
    x1 = torch.where(colon, xs, -inf).amax(-1) + 1.0 / W
    y0 = torch.where(rowon, ys, inf).amin(-1) - 1.0 / H
    y1 = torch.where(rowon, ys, -inf).amax(-1) + 1.0 / H
    box = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, torch.maximum(x1 - x0, y1 - y0) / 2], -1)
    return box.masked_fill(~on.flatten(2).any(-1, keepdim=True), float("nan"))


def coord_grid(B: int, H: int, W: int, *, device=None, dtype=torch.float32) -> Tensor:
    """CoordConv channels: (B, 2, H, W), channel 0 = x, channel 1 = y, each linspace(-1, 1)
    over the pixels (the first and last pixel at exactly -1 and 1)."""
    ys = torch.linspace(-1, 1, H, device=device, dtype=dtype).view(1, 1, H, 1).expand(B, 1, H, W)
    xs = torch.linspace(-1, 1, W, device=device, dtype=dtype).view(1, 1, 1, W).expand(B, 1, H, W)
    return torch.cat([xs, ys], 1)


def box_points(box: Tensor, size: int) -> Tensor:
    """The size x size cell centres of square boxes, in the image's [-1, 1] frame.
    box (..., 3): centre x, y and half-side -> (..., size, size, 2) (x, y), row = y."""
    c = (torch.arange(size, device=box.device, dtype=torch.float32) + 0.5) / size * 2 - 1
    uv = torch.stack(torch.meshgrid(c, c, indexing="xy"), -1)  # (S, S, 2): (x, y) in the box frame
    b = box.float()
    return b[..., None, None, :2] + uv * b[..., None, None, 2:]


def box_crops(images: Tensor, box: Tensor, size: int, padding_mode: str = "zeros") -> Tensor:
    """images (B, C, H, W) and K square boxes per image (B, K, 3) -> (B, K, C, size, size):
    each image resampled (bilinear) on the cell centres of each of its boxes. The K boxes of
    an image go through one grid_sample over that image (no K-fold copy of it)."""
    B, K = box.shape[:2]
    S = size
    pts = box_points(box, S).reshape(B, K * S, S, 2)
    out = F.grid_sample(images.float(), pts, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    return out.view(B, -1, K, S, S).transpose(1, 2)  # (B, K, C, S, S)


def box_coords(points: Tensor, box: Tensor) -> Tensor:
    """points (P, 2) in the image's [-1, 1] frame and boxes (V, 3) -> (V, P, 2): each point in
    each box's own frame ([-1, 1] inside the box), the inverse of `box_points`."""
    return (points.unsqueeze(0) - box[:, None, :2]) / box[:, None, 2:]
