"""Places: where each token's seed lies on the tokenizer's patch grid (not in the paper).

The place head (`PlaceHead`) draws a written token's seed cell before the visual head writes
the token there; with `place_input` the tokens the LM reads carry their cells too (`read`).
Seeds are flat patch indices (row * w + col), NO_SEED for a token without one (the scope
remainder), UNKNOWN_SEED where none was recorded.

Shapes: hidden states (M, H); seeds (M,) or, packed beside a batch's tokens, (N, K).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import UserError

__all__ = ["PlaceHead", "place_features", "pack_seeds", "flat_seeds", "drop_places", "NO_SEED", "UNKNOWN_SEED"]

NO_SEED = -1          # a token without a seed (the scope remainder): written after the seeded ones
UNKNOWN_SEED = -100   # a target whose seed was not recorded (a segment answer): no place loss


class PlaceHead(nn.Module):
    """Where the next token's seed lies, chosen before what the token is (not in the paper).

    A prompt names what to draw but not where, so the MSE head, asked for the token, writes the
    mean over every place the prompt allows. This head first classifies the next token's seed
    among the tokenizer's P patch cells and one "no seed" class (the scope remainder), a
    categorical that sampling draws one place from; an embedding of that place is then added to
    the hidden state the visual head reads, so the head regresses a token *at* one place:

        p(cell | h) = softmax(W h)                          (M, P + 1), cross-entropy on the true seed
        token = visual_head(h + E[cell])                    teacher forced with the true cell

    Tokens are written by seed in raster order (`order_tokens`), so at inference a cell is drawn
    among those after the previous token's (and "no seed" is always allowed, and final).
    h (M, H); seeds (M,) flat patch indices, NO_SEED, or UNKNOWN_SEED (no loss, a learnt
    "unknown place" embedding).

    inputs: also embed the places of the tokens the LM reads (`read`, added to their
    projections: input images and the written tokens fed back), so the LM sees where they lie:
    a linear map of fixed 2-D Fourier features of the cell's (row, column) on the square
    grid, and a learnt vector each for "no seed" and "unknown". The features carry the
    geometry (nearby cells alike, left of / above as directions), and at the default init
    the map's output is about as large as the projector's, so the LM notices it from the
    first step (a table at embedding scale, 0.02, was 13x weaker and stayed unused)."""

    def __init__(self, hidden: int, cells: int, inputs: bool = False):
        super().__init__()
        self.cells = int(cells)
        self.logits = nn.Linear(hidden, self.cells + 1)
        self.embed = nn.Embedding(self.cells + 2, hidden)       # P cells, no seed, unknown
        nn.init.normal_(self.embed.weight, std=0.02)
        with torch.no_grad():
            self.embed.weight[-1].zero_()                       # unknown: the head reads h itself until trained
        self.inputs = None
        if inputs:
            f = place_features(self.cells)
            self.register_buffer("features", f, persistent=False)
            self.inputs = nn.Linear(f.shape[1], hidden)

    def classes(self, seeds: Tensor) -> Tensor:
        """seeds (M,) -> class indices (M,): the cell, P for no seed, P + 1 for unknown."""
        seeds = seeds.long()
        if bool((seeds >= self.cells).any()):
            raise UserError(f"a token's seed is patch {int(seeds.max())} but place_head has {self.cells} cells: "
                            "set model.setokim.place_head to the tokenizer's patch grid (h * w)")
        c = torch.where(seeds >= 0, seeds, torch.full_like(seeds, self.cells))
        return torch.where(seeds == UNKNOWN_SEED, torch.full_like(seeds, self.cells + 1), c)

    def loss(self, h: Tensor, seeds: Tensor) -> Tensor:
        """Mean cross-entropy of the true places over the targets whose seed is known; 0 (with
        gradients) when there are none."""
        known = seeds != UNKNOWN_SEED
        logits = self.logits(h[known]).float()
        return F.cross_entropy(logits, self.classes(seeds[known]), reduction="sum") / max(int(known.sum()), 1)

    def condition(self, h: Tensor, seeds: Tensor) -> Tensor:
        """h (M, H) with the places' embedding added: what the visual head reads."""
        return h + self.embed(self.classes(seeds)).to(h.dtype)

    def read(self, seeds: Tensor) -> Tensor:
        """seeds (M,) of tokens read -> their place embeddings (M, H) (`inputs`)."""
        return self.inputs(self.features[self.classes(seeds)].to(self.inputs.weight.dtype))

    @torch.no_grad()
    def sample(self, h: Tensor, after: Tensor, temperature: float = 1.0,
               generator: Optional[torch.Generator] = None) -> Tensor:
        """h (M, H), after (M,): the previous token's seed in this image (NO_SEED before the
        first token, P after a seedless one) -> seeds (M,) drawn at `temperature` (0: the most
        likely) among the cells after `after`, or NO_SEED."""
        logits = self.logits(h).float()
        idx = torch.arange(self.cells + 1, device=h.device)
        allowed = (idx.unsqueeze(0) > after.to(h.device).long().unsqueeze(1)) | (idx == self.cells)
        logits = logits.masked_fill(~allowed, float("-inf"))
        if temperature <= 0 or h.shape[0] == 0:
            c = logits.argmax(-1)
        else:
            c = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator).squeeze(-1)
        return torch.where(c == self.cells, torch.full_like(c, NO_SEED), c)


def place_features(cells: int) -> Tensor:
    """(P + 2, F): row c of a square grid's cell c = (y, x) holds sin / cos of pi * 2^k * y / side
    and of x likewise, k = 0 .. log2(side) (2-D Fourier features, as a ViT's fixed position
    embedding), and 0 in the last two columns; rows P ("no seed") and P + 1 ("unknown") are
    0 but for a 1 in column F - 2 / F - 1."""
    side = math.isqrt(cells)
    if side * side != cells:
        raise UserError(f"place_input needs a square patch grid, but place_head has {cells} cells")
    freqs = math.pi * 2.0 ** torch.arange(max(int(math.ceil(math.log2(max(side, 2)))), 1) + 1)
    yx = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    a = (yx.float() / side).unsqueeze(-1) * freqs                                  # (P, 2, n)
    f = torch.cat([a.sin(), a.cos()], -1).reshape(cells, -1)                      # (P, 4n)
    out = torch.zeros(cells + 2, f.shape[1] + 2)
    out[:cells, :-2] = f
    out[cells, -2] = out[cells + 1, -1] = 1.0
    return out


def pack_seeds(seeds: list, sets: list, token_mask: Tensor) -> Tensor:
    """[seeds (K_i,) or None (unknown)] beside token sets [(K_i, T)] -> (N, K) long as
    `pack_token_sets` packs the sets (UNKNOWN_SEED where unknown or padding)."""
    out = torch.full(token_mask.shape, UNKNOWN_SEED, dtype=torch.long)
    for i, (s, t) in enumerate(zip(seeds, sets)):
        if s is not None:
            if len(s) != len(t):
                raise UserError(f"image {i}: {len(s)} seeds for {len(t)} tokens")
            out[i, :len(s)] = torch.as_tensor(s).long().cpu()
    return out.to(token_mask.device).masked_fill(~token_mask, UNKNOWN_SEED)


def flat_seeds(image_token_seeds: Optional[Tensor], image_token_mask: Optional[Tensor], idx: Tensor,
               like: Tensor) -> Tensor:
    """The seeds of the batch's valid tokens `idx` indexes (a splice's vis_src / pred_src),
    (len(idx),) on like's device; all UNKNOWN_SEED without seeds."""
    if image_token_seeds is None or image_token_mask is None or not idx.numel():
        return torch.full((idx.numel(),), UNKNOWN_SEED, dtype=torch.long, device=like.device)
    return image_token_seeds.to(like.device)[image_token_mask.to(like.device)][idx.to(like.device)]


def drop_places(seeds: Optional[Tensor], p: float) -> Optional[Tensor]:
    """seeds (N, K) with each image's row set to UNKNOWN_SEED with probability p (place
    dropout: the "unknown place" an edit is written at by default is then trained too)."""
    if seeds is None or p <= 0:
        return seeds
    drop = torch.rand(seeds.shape[0], device=seeds.device) < p
    return seeds.masked_fill(drop.unsqueeze(1), UNKNOWN_SEED)
