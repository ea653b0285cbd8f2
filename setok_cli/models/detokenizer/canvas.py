"""The token canvas: the slot-attention "spatial broadcast" decoder, from the tokens alone.

Each kind gives every (token i, cell p) of a g x g grid a weight logit a_ip and features
f_ip; the weights are a softmax over the image's valid tokens and the canvas is
out_p = sum_i softmax_i(a_ip) f_ip, (B, C, g, g), which joins the UNet's input. No
clustering masks go in, so tokens made by a generator decode the same way.

    kind "mlp":      (a_ip, f_ip) = MLP(W_t t_i + W_p PE(p)), PE the merger's sin-cos embedding
    kind "bilinear": a_ip = <W_a t_i, E(p)> / sqrt(hidden), E(p) = MLP(fourier_2d(p));  f_ip = W_f t_i
    kind "local":    c_i = tanh(W_c t_i);  (a_ip, f_ip) = MLP(W_z t_i + W_u phi(q_p - c_i)), q_p the
                     cell centre in [-1, 1]^2, phi = relative_fourier at pi 2^j / 2, j < octaves
    kind "sprite":   each token draws an S x S sprite (alpha logit and features, S = window) into a
                     square box (c_i, s_i) it places itself; a_ip - 20 (|u|_inf - 1)_+ outside it

The tiny recipe uses "sprite"; the others are kept to re-run the README's ablation tables.
"""
from __future__ import annotations

import math
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import UserError
from ..merger import relative_fourier
from ..position import box_coords, box_crops, mask_boxes, sincos_2d
from .mapper import nonempty

__all__ = ["TokenCanvas", "MlpCanvas", "BilinearCanvas", "LocalCanvas", "SpriteCanvas", "CANVAS_KINDS",
           "make_canvas", "fourier_2d", "cell_centres", "instance_canvas_targets", "canvas_mask_loss"]


def fourier_2d(dim: int, grid: int) -> Tensor:
    """Fourier features of a grid x grid grid's cells -> (grid * grid, dim): sin and cos of x and
    y times dim // 4 frequencies, geometric from pi (one period per two cells, the Nyquist
    rate) to 2 pi / grid (one period per grid), so an MLP on them can draw sharp edges (an MLP
    on low frequencies only learns smooth functions: Tancik et al., 2020). Trailing channels
    that do not fill a group are zero."""
    q = dim // 4
    out = torch.zeros(grid, grid, dim)
    if q == 0:
        return out.view(grid * grid, dim)
    hi, lo = math.pi, 2 * math.pi / max(grid, 2)
    omega = hi * (lo / hi) ** (torch.arange(q, dtype=torch.float64) / max(q - 1, 1))  # (q,)
    a = torch.arange(grid, dtype=torch.float64)[:, None] * omega[None]  # (grid, q)
    out[..., 0 * q:1 * q] = torch.sin(a).float()[:, None, :]
    out[..., 1 * q:2 * q] = torch.cos(a).float()[:, None, :]
    out[..., 2 * q:3 * q] = torch.sin(a).float()[None, :, :]
    out[..., 3 * q:4 * q] = torch.cos(a).float()[None, :, :]
    return out.view(grid * grid, dim)


def cell_centres(grid: int) -> Tensor:
    """The centres (x, y) in [-1, 1] of a grid x grid grid's cells, row-major: (grid * grid, 2)."""
    c = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid * 2 - 1
    return torch.stack(torch.meshgrid(c, c, indexing="xy"), -1).view(grid * grid, 2)


class TokenCanvas(nn.Module):
    """Spatial broadcast of a token set: tokens (B, K, T) + token_mask (B, K) -> (B, C, g, g).
    A kind sets `pe` (the cells' embedding, (g*g, E)) and `cells`."""

    kind: ClassVar[str] = ""

    def __init__(self, channels: int, grid: int, hidden: int, pe: Tensor):
        super().__init__()
        self.channels, self.grid, self.hidden = int(channels), int(grid), int(hidden)
        self.register_buffer("pe", pe, persistent=False)

    def cells(self, tokens: Tensor, valid: Tensor, box: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """-> logits (B, K, P), features (B, K, P, C) or (B, K, 1, C); P = g * g."""
        raise NotImplementedError

    def forward(self, tokens: Tensor, token_mask: Tensor, return_logits: bool = False,
                box: Optional[Tensor] = None):
        """-> canvas (B, C, g, g); with return_logits also the token logits (B, K, g*g), -inf
        on padded tokens. box (B, K, 3): kind "sprite", the boxes to draw into (teacher
        forcing; NaN rows use the predicted box)."""
        B = tokens.shape[0]
        g = self.grid
        valid = nonempty(token_mask)
        logit, feats = self.cells(tokens, valid, box)
        logit = logit.masked_fill(~valid.unsqueeze(-1), float("-inf"))
        w = torch.softmax(logit, dim=1)  # over tokens
        out = (w.unsqueeze(-1) * feats).sum(1)  # (B, g*g, C)
        out = out.transpose(1, 2).reshape(B, -1, g, g)
        return (out, logit) if return_logits else out


class MlpCanvas(TokenCanvas):
    kind = "mlp"

    def __init__(self, token_dim: int, channels: int, grid: int = 16, hidden: int = 64):
        super().__init__(channels, grid, hidden, sincos_2d(hidden, grid, grid).view(grid * grid, hidden))
        self.tok = nn.Linear(token_dim, hidden)
        self.pos = nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1 + channels))

    def cells(self, tokens, valid, box):
        P = self.pe.shape[0]
        o = self.mlp(self.tok(tokens).unsqueeze(2) + self.pos(self.pe.to(tokens.dtype)).view(1, 1, P, -1))
        return o[..., 0], o[..., 1:]  # (B, K, P), (B, K, P, C)


class BilinearCanvas(TokenCanvas):
    kind = "bilinear"

    def __init__(self, token_dim: int, channels: int, grid: int = 16, hidden: int = 64):
        super().__init__(channels, grid, hidden, fourier_2d(hidden, grid))
        self.key = nn.Linear(token_dim, hidden)
        self.feat = nn.Linear(token_dim, channels)
        self.cell = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def cells(self, tokens, valid, box):
        cell = self.cell(self.pe.to(tokens.dtype))
        logit = torch.einsum("bkh,ph->bkp", self.key(tokens), cell) / self.hidden ** 0.5  # (B, K, P)
        return logit, self.feat(tokens).unsqueeze(2)  # (B, K, 1, C)


def _scatter(o: Tensor, valid: Tensor, logit_of_o: Tensor) -> tuple[Tensor, Tensor]:
    """Rows o (V, P, 1 + C) of the valid tokens -> logits (B, K, P) (-inf elsewhere), features
    (B, K, P, C) (0 elsewhere); logit_of_o (V, P) the valid rows' logits."""
    B, K = valid.shape
    logit = o.new_full((B, K, o.shape[1]), float("-inf"))
    feats = o.new_zeros(B, K, o.shape[1], o.shape[-1] - 1)
    logit[valid] = logit_of_o
    feats[valid] = o[..., 1:]
    return logit, feats


class LocalCanvas(TokenCanvas):
    kind = "local"

    def __init__(self, token_dim: int, channels: int, grid: int = 16, hidden: int = 64, octaves: int = 6):
        super().__init__(channels, grid, hidden, cell_centres(grid))
        if octaves < 1:
            raise UserError(f"detokenizer.canvas_octaves must be >= 1, got {octaves!r}")
        self.octaves = int(octaves)
        self.place = nn.Linear(token_dim, 2)
        self.tok = nn.Linear(token_dim, hidden)
        self.off = nn.Linear(4 * self.octaves, hidden)
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, 1 + channels))

    def centres(self, tokens: Tensor) -> Tensor:
        """Where each token draws itself, (..., 2) (x, y) in [-1, 1]."""
        return torch.tanh(self.place(tokens))

    def cells(self, tokens, valid, box):
        t = tokens[valid]  # (V, T): the valid tokens only
        off = self.pe.to(t.dtype).unsqueeze(0) - self.centres(t).unsqueeze(1)  # (V, P, 2) in [-2, 2]
        o = self.mlp(self.tok(t).unsqueeze(1) + self.off(relative_fourier(off / 2, self.octaves)))  # (V, P, 1 + C)
        return _scatter(o, valid, o[..., 0])


class SpriteCanvas(TokenCanvas):
    """Each token draws a window x window sprite into a square box it places itself (centre
    c_i = tanh(.), half-side s_i = 2 sigmoid(.)). The boxes learn from the bounding boxes of
    the mask targets; in training the sprites are drawn into those true boxes, so each shape
    is learnt in its own normalised frame whatever its place and size."""
    kind = "sprite"

    def __init__(self, token_dim: int, channels: int, grid: int = 16, hidden: int = 64, window: int = 16):
        super().__init__(channels, grid, hidden, cell_centres(grid))
        if window < 2:
            raise UserError(f"detokenizer.canvas_window must be >= 2, got {window!r}")
        self.window = int(window)
        self.place = nn.Linear(token_dim, 3)
        self.sprite = nn.Sequential(nn.Linear(token_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                    nn.Linear(hidden, (1 + channels) * self.window ** 2))

    def boxes(self, tokens: Tensor) -> Tensor:
        """Each token's box (..., 3): centre (x, y) in [-1, 1], half-side in (0, 2)."""
        p = self.place(tokens)
        return torch.cat([torch.tanh(p[..., :2]), 2 * torch.sigmoid(p[..., 2:])], -1)

    def sprites(self, tokens: Tensor) -> Tensor:
        """tokens (V, T) -> sprites (V, 1 + C, S, S): alpha logit, then features; row = y,
        column = x of the box's [-1, 1] frame."""
        S = self.window
        return self.sprite(tokens).view(-1, 1 + self.channels, S, S)

    def cells(self, tokens, valid, box):
        """box (B, K, 3): boxes to draw into instead of the predicted ones where finite."""
        t = tokens[valid]  # (V, T)
        b = self.boxes(t)
        if box is not None:
            bt = box[valid].to(b.dtype)
            b = torch.where(torch.isfinite(bt), bt, b)
        u = box_coords(self.pe.to(t.dtype), b)  # (V, P, 2): the cells in each box's frame
        o = F.grid_sample(self.sprites(t), u.unsqueeze(1), mode="bilinear", padding_mode="border",
                          align_corners=False)
        o = o[:, :, 0].transpose(1, 2)  # (V, P, 1 + C)
        outside = (u.abs().amax(-1) - 1).clamp_min(0)  # 0 inside the box
        return _scatter(o, valid, o[..., 0] - 20.0 * outside)

    def box_losses(self, tokens: Tensor, token_mask: Tensor, masks: Tensor, silhouette: bool
                   ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """The boxes of the mask targets and the canvas's own losses on them.
        tokens (B, K, T); masks (B, K', H, W), K' <= K, soft or 0/1 ->
        true boxes (B, K, 3) (NaN where a token has no pixel), the smooth-L1 box loss, and with
        `silhouette` the per-pixel BCE of each sprite's alpha against its mask cropped to its
        true box (else None)."""
        K = tokens.shape[1]
        box = mask_boxes(masks)  # (B, K', 3)
        box = F.pad(box, (0, 0, 0, K - box.shape[1]), value=float("nan"))
        known = torch.isfinite(box).all(-1) & token_mask
        if not bool(known.any()):
            zero = tokens.sum() * 0
            return box, zero, (zero if silhouette else None)
        place = F.smooth_l1_loss(self.boxes(tokens[known]).float(), box[known], beta=0.05)
        if not silhouette:
            return box, place, None
        m = F.pad(masks.float(), (0, 0, 0, 0, 0, K - masks.shape[1]))
        target = box_crops(m[known].unsqueeze(1), box[known].unsqueeze(1), self.window)[:, 0, 0]  # (V, S, S)
        logits = self.sprites(tokens[known])[:, 0]
        return box, place, F.binary_cross_entropy_with_logits(logits.float(), target)


CANVAS_KINDS: dict[str, type[TokenCanvas]] = {c.kind: c for c in (MlpCanvas, BilinearCanvas, LocalCanvas, SpriteCanvas)}


def make_canvas(kind: str, token_dim: int, channels: int, grid: int = 16, hidden: int = 64, octaves: int = 6,
                window: int = 16) -> TokenCanvas:
    """The canvas of `kind`; `octaves` is read by kind "local" only, `window` by "sprite" only."""
    if kind not in CANVAS_KINDS:
        raise UserError(f"detokenizer.canvas_kind must be one of {', '.join(map(repr, CANVAS_KINDS))}, got {kind!r}")
    extra = {"local": {"octaves": octaves}, "sprite": {"window": window}}.get(kind, {})
    return CANVAS_KINDS[kind](token_dim, channels, grid, hidden, **extra)


def instance_canvas_targets(masks: Tensor, instances: Tensor) -> Tensor:
    """Sharpen the clustering masks with instance masks, for canvas_mask_target "instances".

    masks (B, K, h, w) clustering masks; instances (B, H, W) ids (0 background, 1.. objects,
    -1 everywhere for an image without instances) -> (B, K, H, W): M upsampled (nearest),
    then every object's pixels given wholly to the token with the largest share of it."""
    B, K = masks.shape[:2]
    H, W = instances.shape[-2:]
    m = F.interpolate(masks.float(), size=(H, W), mode="nearest")  # (B, K, H, W)
    ids = instances.long().clamp_min(0)
    J = int(ids.max()) + 1
    oh = F.one_hot(ids, J).permute(0, 3, 1, 2).float()  # (B, J, H, W)
    share = torch.einsum("bjhw,bkhw->bjk", oh, m)  # each object's overlap with each token
    best = share.argmax(-1)  # (B, J)
    own = F.one_hot(best.gather(1, ids.flatten(1)), K).transpose(1, 2).view(B, K, H, W).float()
    obj = (instances > 0).unsqueeze(1)
    return torch.where(obj, own, m)


def canvas_mask_loss(logits: Tensor, masks: Tensor, grid: int) -> Tensor:
    """Cross-entropy of the canvas's token weights against the clustering masks.

    logits (B, K, g*g) (-inf on padded tokens); masks (B, K', h, w) with K' <= K (soft or
    0/1, resized to g x g by area or bilinear) -> mean over the cells that some token owns
    of -sum_i m_ip log softmax_i(a_ip), m normalised over tokens."""
    B, K, P = logits.shape
    m = masks.float()
    if m.shape[-2:] != (grid, grid):
        mode = "area" if m.shape[-1] > grid else "bilinear"
        m = F.interpolate(m, size=(grid, grid), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    m = m.flatten(2)  # (B, K', P)
    m = F.pad(m, (0, 0, 0, K - m.shape[1]))  # (B, K, P)
    tot = m.sum(1)  # (B, P)
    owned = tot > 1e-6
    logp = torch.log_softmax(logits.float(), dim=1).masked_fill(m <= 0, 0.0)  # -inf * 0 -> 0
    ce = -(m * logp).sum(1) / tot.clamp_min(1e-6)  # (B, P)
    return ce[owned].mean() if bool(owned.any()) else logits.sum() * 0


