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

    tokens = build_bank(model, image_paths)                    # (M, T), as the SeTok gives them
    save_bank("out/bank.safetensors", tokens, model)           # `setok bank DATA --model RUN --out FILE`
    tokens = load_bank("out/bank.safetensors", model)          # checked against the model's SeTok
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ...errors import UserError

__all__ = ["build_bank", "save_bank", "load_bank", "nearest", "setok_fingerprint"]

FORMAT = "setok-token-bank-v1"


def setok_fingerprint(model) -> float:
    """A number that changes with the SeTok's weights: a bank only fits the SeTok that made it."""
    if model.setok is None:
        raise UserError("this Setokim has no SeTok (its stage-1 parts were not saved with it)")
    return float(sum(p.detach().double().abs().sum() for p in model.setok.state_dict().values()
                     if torch.is_floating_point(p)))


@torch.no_grad()
def build_bank(model, images: Sequence, batch_size: int = 64,
               on_batch: Optional[Callable[[int], None]] = None) -> Tensor:
    """Images (paths, PIL images or arrays) -> every token of every image, (M, T) float32,
    as `model.image_token_sets` gives them (raw, not standardised)."""
    if not len(images):
        raise UserError("no images for the token bank")
    out = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        out += [t.float().cpu() for t in model.image_token_sets(chunk)]
        if on_batch is not None:
            on_batch(len(chunk))
    return torch.cat(out)


def save_bank(path, tokens: Tensor, model) -> None:
    """Write tokens (M, T) as safetensors, with the token width and the SeTok's fingerprint."""
    from safetensors.torch import save_file

    from ...files import atomic_write
    meta = {"format": FORMAT, "token_dim": str(tokens.shape[1]), "setok": repr(setok_fingerprint(model))}
    atomic_write(Path(path), lambda tmp: save_file({"tokens": tokens.contiguous().float().cpu()}, tmp, metadata=meta))


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


def nearest(x: Tensor, bank: Tensor, extra: Optional[Sequence[Tensor]] = None,
            source_margin: float = 1.0) -> Tensor:
    """x (R, T) standardised tokens -> per row the nearest row of `bank` (M, T), or the
    nearest token of extra[r] (K_r, T) (the row's input images; may be empty) where that one
    is less than `source_margin` times as far (L2): margin 1 takes whichever is closer, a
    larger margin prefers copying from the input (an edit keeps most of its source)."""
    best, idx = torch.cdist(x.float(), bank.float()).min(1)         # (R,)
    out = bank[idx].to(x.dtype)
    if extra is not None and any(c.shape[0] for c in extra):
        from torch.nn.utils.rnn import pad_sequence
        src = pad_sequence([c.float() for c in extra], batch_first=True)   # (R, K, T), zero-padded
        lengths = torch.tensor([c.shape[0] for c in extra], device=x.device)
        dc = torch.cdist(x.float().unsqueeze(1), src).squeeze(1)          # (R, K)
        dc = dc.masked_fill(torch.arange(src.shape[1], device=x.device) >= lengths[:, None], float("inf"))
        sbest, j = dc.min(1)
        take = sbest < source_margin * best
        out = torch.where(take[:, None], src[torch.arange(len(extra), device=x.device), j].to(x.dtype), out)
    return out
