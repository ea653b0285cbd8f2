"""2-D sin-cos position embeddings (MAE / the authors' `get_2d_sincos_pos_embed`).

Half of the channels encode the row, half the column; each half is [sin, cos] of the
position times geometrically spaced frequencies 1 / temperature ** (i / (dim/4)).
"""
from __future__ import annotations

import torch
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
