"""A token bank: the SeTok tokens of a set of real images, for snapping written tokens.

The MSE visual head regresses the mean of the tokens a prompt allows ("two red circles"
leaves position and size open), and the detokenizer draws that mean as a smear. Fed back
into the LM, the smeared token is also off the distribution the LM was trained on (teacher
forcing fed it real tokens). Snapping replaces each written token by the nearest token of a
bank of real tokens (in standardised token space, `model.normalize`) before it is fed back
and decoded: the written image is then made of real objects, and the LM continues from a
real token (nearest-neighbour decoding, as a VQ codebook but with the data's own tokens).
An edit also snaps to the tokens of the image it reads, preferred unless the bank's token is
`source_margin` times closer (2.5, chosen on val edits), so a kept object comes back exactly.
Not in the paper; off unless a bank is given (`setok generate|edit|chat --bank`).

Layout-aware snapping (`snap_placed`, with a bank that stores each token's layout: the
patches of its region on a 16 x 16 grid). The MSE head also regresses an object's place to
the mean, so plain snapping picks objects near the centre, on top of each other, and the
detokenizer merges them. A real image's tokens partition its patches, so an object token
is only taken where it overlaps the objects already placed in the image by at most
`max_overlap` of its own area; the nearest such token wins (the nearest of all where none is
free). Tokens whose region covers more than half the grid (the background) are neither
checked nor recorded.

    tokens, layouts = build_bank(model, image_paths)           # (M, T) as the SeTok gives them, (M, 256) bool
    save_bank("out/bank.safetensors", tokens, model, layouts)  # `setok bank DATA --model RUN --out FILE`
    tokens = load_bank("out/bank.safetensors", model)          # checked against the model's SeTok
    layouts = load_bank_layouts("out/bank.safetensors")         # (M, 256) bool, None for a bank without them
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import UserError

__all__ = ["build_bank", "save_bank", "load_bank", "load_bank_layouts", "nearest", "snap_placed", "setok_fingerprint",
           "METRICS", "token_sets_with_layouts", "LAYOUT_GRID", "layout_cell", "layout_centres", "near_centre",
           "same_region"]

FORMAT = "setok-token-bank-v1"
LAYOUT_GRID = 16            # layouts: each token's region on a LAYOUT_GRID x LAYOUT_GRID grid over the image
OBJECT_SHARE = 0.5          # a token covering more of the grid than this is background: never checked or recorded


def setok_fingerprint(model) -> float:
    """A number that changes with the SeTok's weights: a bank only fits the SeTok that made it."""
    if model.setok is None:
        raise UserError("this Setokim has no SeTok (its stage-1 parts were not saved with it)")
    return float(sum(p.detach().double().abs().sum() for p in model.setok.state_dict().values()
                     if torch.is_floating_point(p)))


@torch.no_grad()
def token_sets_with_layouts(model, images: Sequence, seeds: bool = False):
    """Images -> ([tokens (K_i, T)] as `model.image_token_sets` gives them, [layouts (K_i, P)
    bool]): each token's region on the image's own patch grid, resized (nearest) to
    LAYOUT_GRID x LAYOUT_GRID, P = LAYOUT_GRID ** 2, in the same order; `seeds`: also
    [seeds (K_i,)] in that order, third."""
    if model.setok is None:
        raise UserError("this Setokim has no SeTok (its stage-1 parts were not saved with it)")
    out = model.setok.tokenize(list(images))
    G = LAYOUT_GRID
    lay = []
    for i in range(out.masks.shape[0]):
        m = out.masks[i].float()
        if out.image_grids:
            gh, gw = out.image_grids[i]
            m = m[:, :gh, :gw]
        lay.append(F.interpolate(m[None], size=(G, G), mode="nearest")[0].flatten(1) > 0.5)   # (K, P)
    T = out.tokens.shape[-1]
    both = torch.cat([out.tokens.float(), torch.stack(lay).to(out.tokens.device).float()], -1)
    both, mask = model.order(both, out.token_mask, out.seeds)
    sets = [b[mk, :T].to(out.tokens.dtype) for b, mk in zip(both, mask)]
    lays = [b[mk, T:] > 0.5 for b, mk in zip(both, mask)]
    if not seeds:
        return sets, lays
    return sets, lays, model.token_sets_of(out, seeds=True)[1]


@torch.no_grad()
def build_bank(model, images: Sequence, batch_size: int = 64,
               on_batch: Optional[Callable[[int], None]] = None) -> tuple[Tensor, Tensor]:
    """Images (paths, PIL images or arrays) -> every token of every image, (M, T) float32,
    as `model.image_token_sets` gives them (raw, not standardised), and their layouts
    (M, P) bool (`token_sets_with_layouts`)."""
    if not len(images):
        raise UserError("no images for the token bank")
    toks, lays = [], []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        t, lay = token_sets_with_layouts(model, chunk)
        toks += [x.float().cpu() for x in t]
        lays += [x.cpu() for x in lay]
        if on_batch is not None:
            on_batch(len(chunk))
    return torch.cat(toks), torch.cat(lays)


def save_bank(path, tokens: Tensor, model, layouts: Optional[Tensor] = None) -> None:
    """Write tokens (M, T) (and their layouts (M, P) bool) as safetensors, with the token
    width and the SeTok's fingerprint."""
    from safetensors.torch import save_file

    from ...files import atomic_write
    meta = {"format": FORMAT, "token_dim": str(tokens.shape[1]), "setok": repr(setok_fingerprint(model))}
    data = {"tokens": tokens.contiguous().float().cpu()}
    if layouts is not None:
        if layouts.shape != (tokens.shape[0], LAYOUT_GRID ** 2):
            raise UserError(f"layouts {tuple(layouts.shape)}: need ({tokens.shape[0]}, {LAYOUT_GRID ** 2})")
        data["layouts"] = layouts.contiguous().to(torch.uint8).cpu()
    atomic_write(Path(path), lambda tmp: save_file(data, tmp, metadata=meta))


def load_bank(path, model) -> Tensor:
    """A bank file -> its tokens (M, T), checked to fit `model` (one UserError line if not)."""
    from safetensors import safe_open
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such token bank (make one with `setok bank DATA --model RUN --out FILE`)")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tokens = f.get_tensor("tokens")
    except Exception as e:                                            # noqa: BLE001 (any unreadable file)
        raise UserError(f"{p}: not a token bank ({type(e).__name__})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{p}: not a token bank (format {meta.get('format')!r})")
    T = int(model.config.token_dim)
    if tokens.ndim != 2 or tokens.shape[1] != T or tokens.shape[0] == 0:
        raise UserError(f"{p}: tokens {tuple(tokens.shape)}, this model writes {T}-wide tokens")
    want, got = setok_fingerprint(model), float(meta.get("setok", "nan"))
    if not abs(want - got) <= 1e-6 * max(1.0, abs(want)):
        raise UserError(f"{p}: made with another SeTok than this model's; rebuild it with --model of this run")
    return tokens


def load_bank_layouts(path) -> Optional[Tensor]:
    """The layouts (M, P) bool of a bank file `load_bank` has accepted; None if it has none
    (a bank written before layouts existed)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("layouts").bool() if "layouts" in f.keys() else None


METRICS = ("l2", "cos")


def layout_cell(seeds: Tensor, cells: int) -> Tensor:
    """A place head's seeds (R,) on a square grid of `cells` patches -> the LAYOUT_GRID cell
    holding each (-1 for NO_SEED)."""
    side = max(int(round(cells ** 0.5)), 1)
    r, c = seeds.clamp(min=0) // side, seeds.clamp(min=0) % side
    out = (r * LAYOUT_GRID // side) * LAYOUT_GRID + c * LAYOUT_GRID // side
    return torch.where(seeds >= 0, out, torch.full_like(out, -1))


def layout_centres(layouts: Tensor) -> Tensor:
    """layouts (M, P) bool on a square grid -> each region's centre (M, 2) as (x, y) in [0, 1]
    of the image side (cell centres averaged; 0.5 for an empty layout)."""
    side = max(int(round(layouts.shape[-1] ** 0.5)), 1)
    lay = layouts.float()
    c = (torch.arange(side, dtype=lay.dtype, device=lay.device) + 0.5) / side
    x, y = c.repeat(side), c.repeat_interleave(side)                                     # (P,) each
    area = lay.sum(-1)
    xy = torch.stack([lay @ x, lay @ y], -1) / area.clamp(min=1).unsqueeze(-1)
    return torch.where((area > 0).unsqueeze(-1), xy, torch.full_like(xy, 0.5))


def near_centre(layouts: Tensor, centres: Tensor, radius: float) -> Tensor:
    """The object tokens (regions over at most OBJECT_SHARE of the grid) whose centre lies
    within `radius` of each row's centre: layouts (M, P), centres (R, 2) (x, y) -> (R, M) bool."""
    obj = (layouts.float().sum(-1) <= OBJECT_SHARE * layouts.shape[-1]) & layouts.any(-1)
    return (torch.cdist(centres.float(), layout_centres(layouts).to(centres.device)) <= radius) & obj.to(centres.device)


def same_region(layouts: Tensor, regions: Tensor, min_iou: float) -> Tensor:
    """The tokens whose region overlaps each row's by an IoU of at least `min_iou`:
    layouts (M, P), regions (R, P) bool -> (R, M) bool."""
    a, b = layouts.float(), regions.float().to(layouts.device)
    inter = b @ a.T                                                                      # (R, M)
    union = b.sum(-1, keepdim=True) + a.sum(-1) - inter
    return inter / union.clamp(min=1) >= min_iou


def _dist(x: Tensor, cands: Tensor, metric: str) -> Tensor:
    """x (R, T), cands (C, T) or (R, C, T) -> distances (R, C): L2, or ("cos") the L2 between
    unit vectors, a function of the angle alone (a regressed token shrinks towards the mean,
    0 in standardised space, so its direction says more than its length)."""
    if metric not in METRICS:
        raise UserError(f"snap metric must be one of {METRICS}, got {metric!r}")
    x, cands = x.float(), cands.float()
    if metric == "cos":
        x, cands = F.normalize(x, dim=-1), F.normalize(cands, dim=-1)
    if cands.ndim == 2:
        return torch.cdist(x, cands)
    return torch.cdist(x.unsqueeze(1), cands).squeeze(1)


def nearest(x: Tensor, bank: Tensor, extra: Optional[Sequence[Tensor]] = None,
            source_margin: float = 1.0, metric: str = "l2") -> Tensor:
    """x (R, T) standardised tokens -> per row the nearest row of `bank` (M, T), or the
    nearest token of extra[r] (K_r, T) (the row's input images; may be empty) where that one
    is less than `source_margin` times as far (L2): margin 1 takes whichever is closer, a
    larger margin prefers copying from the input (an edit keeps most of its source).
    metric: "l2" or "cos" (`_dist`)."""
    best, idx = _dist(x, bank, metric).min(1)                        # (R,)
    out = bank[idx].to(x.dtype)
    if extra is not None and any(c.shape[0] for c in extra):
        from torch.nn.utils.rnn import pad_sequence
        src = pad_sequence([c.float() for c in extra], batch_first=True)   # (R, K, T), zero-padded
        lengths = torch.tensor([c.shape[0] for c in extra], device=x.device)
        dc = _dist(x, src, metric)                                        # (R, K)
        dc = dc.masked_fill(torch.arange(src.shape[1], device=x.device) >= lengths[:, None], float("inf"))
        sbest, j = dc.min(1)
        take = sbest < source_margin * best
        out = torch.where(take[:, None], src[torch.arange(len(extra), device=x.device), j].to(x.dtype), out)
    return out


def snap_placed(x: Tensor, bank: Tensor, bank_layouts: Tensor, used: Tensor,
                extra: Optional[Sequence[Tensor]] = None, extra_layouts: Optional[Sequence[Tensor]] = None,
                source_margin: float = 1.0, max_overlap: float = 0.25, metric: str = "l2",
                at: Optional[Tensor] = None, allowed: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Layout-aware `nearest` (module docstring). x (R, T) standardised tokens; bank (M, T)
    with bank_layouts (M, P) bool; used (R, P) bool: the object patches already placed in each
    row's image; extra[r] (K_r, T) with extra_layouts[r] (K_r, P): the row's input images'
    tokens, preferred as in `nearest`; at (R,): a layout cell each row's token must cover (a
    place head's drawn seed, `layout_cell`; -1: any), where any candidate does; allowed (R, M)
    bool: the bank tokens each row may take, where it allows any (`near_centre`, `same_region`).
    -> (tokens (R, T), object patches to add to used (R, P))."""
    def free_dist(cands: Tensor, lay: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        """cands (R, C, T) or (C, T), lay like it with P -> distances (R, C), inf where taken."""
        d = _dist(x, cands, metric)
        lay = lay.float() if lay.ndim == 3 else lay.float()[None]                        # (R or 1, C, P)
        area = lay.sum(-1)                                                               # (R or 1, C)
        over = torch.einsum("rp,rcp->rc", used.float(), lay.expand(x.shape[0], -1, -1))  # (R, C)
        obj = area <= OBJECT_SHARE * lay.shape[-1]
        taken = obj & (over > max_overlap * area)
        if valid is not None:
            d = d.masked_fill(~valid, float("inf"))
        if at is not None:                 # candidates over the drawn cell, where there are any
            cell = at.clamp(min=0).view(-1, 1, 1).expand(-1, lay.shape[1], 1)
            covers = lay.expand(x.shape[0], -1, -1).gather(2, cell).squeeze(2) > 0.5     # (R, C)
            off = ~covers & (at >= 0).unsqueeze(1)
            some = (~off & ~torch.isinf(d)).any(1, keepdim=True)
            d = torch.where(some, d.masked_fill(off, float("inf")), d)
        free = d.masked_fill(taken, float("inf"))
        none_free = torch.isinf(free).all(1, keepdim=True)
        return torch.where(none_free, d, free)                   # no free token: the nearest of all

    def objects(lay: Tensor) -> Tensor:
        return lay & (lay.sum(-1, keepdim=True) <= OBJECT_SHARE * lay.shape[-1])

    R = x.shape[0]
    rows = torch.arange(R, device=x.device)
    if allowed is not None:
        allowed = allowed.to(x.device) | ~allowed.to(x.device).any(1, keepdim=True)
    best, idx = free_dist(bank, bank_layouts, allowed).min(1)
    out, placed = bank[idx].to(x.dtype), objects(bank_layouts[idx])
    if extra is not None and any(c.shape[0] for c in extra):
        from torch.nn.utils.rnn import pad_sequence
        src = pad_sequence([c.float() for c in extra], batch_first=True)                 # (R, K, T)
        slay = pad_sequence([lay.float() for lay in extra_layouts], batch_first=True)    # (R, K, P)
        lengths = torch.tensor([c.shape[0] for c in extra], device=x.device)
        valid = torch.arange(src.shape[1], device=x.device) < lengths[:, None]
        sbest, j = free_dist(src, slay, valid).min(1)
        take = sbest < source_margin * best
        out = torch.where(take[:, None], src[rows, j].to(x.dtype), out)
        placed = torch.where(take[:, None], objects(slay[rows, j] > 0.5), placed)
    return out, placed
