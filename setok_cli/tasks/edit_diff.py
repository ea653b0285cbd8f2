"""`setok edit --diff`: an edit written as a token diff (models/setokim/edit_diff.py).

The model names the source token to drop and writes the new one (one visual token each); with
a bank the new one is snapped by `snap_new`, near the place the answer wrote, or over the old
token's region for a recolouring; every other source token is copied exactly.

How the old token is found (`Sampling.lookup`):

- "diff": the answer writes it ("Make <image> to <image>"), and the nearest source token is
  the one dropped.
- "segment": the model first segments the object the instruction names (`referred_object`:
  "Make the yellow triangle blue." -> "Segment the yellow triangle."), the source token whose
  region best matches that answer's mask (IoU) is taken as the old one, and the diff answer is then written from it
  on ("Make" + that token given, teacher-forced as in training; the model writes " to <image>").
  Segmentation is trained on every referring expression of the world, where the diff rows
  see a quarter as many recolourings, so its lookup is the better one (README, "The old token
  by segmentation"). Instructions that name no object (an addition) are written as with "diff".

Shapes: source token sets (K_i, T); layouts (K_i, P) bool; seeds (K_i,).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

import numpy as np
import torch

from .setokim import Sampling, _decode, _kw, keep_source_pixels, referred_tokens

__all__ = ["edit_diff", "segment_lookups"]


def segment_lookups(model, images: Sequence, sets: list, layouts: list, readable: list,
                    instructions: Sequence[str], opts: Sampling) -> list[Optional[tuple[str, int]]]:
    """Per instruction: (its answer's first word, the index of the source token the model's
    segmentation of the named object picks), or None (no object named, or no token written).
    The pick is the source token whose region (its layout, (K_i, P)) has the best IoU with the
    mask the written token decodes to (p > 0.5, as `setok segment` draws it), not the token
    nearest the written one: on val that pick missed the named object in 25 of 38 failed
    recolourings and took the background token for removals (README: "The old token by its mask")."""
    from ..models.setokim.bank import LAYOUT_GRID
    from ..models.setokim.edit_diff import referred_object
    from ..models.setokim.regions import grid_masks, read_images, region_probs
    named = [referred_object(t) for t in instructions]
    rows = [i for i, n in enumerate(named) if n is not None and sets[i].shape[0]]
    out: list[Optional[tuple[str, int]]] = [None] * len(instructions)
    if not rows:
        return out
    seg = replace(opts, place="auto")            # as `setok segment` writes (val: the same lookups as drawn)
    tokens, produced = referred_tokens(model, [readable[i] for i in rows], [named[i][1] for i in rows], seg)
    seen = read_images(model, [images[i] for i in rows])
    masks = grid_masks(region_probs(model, seen, tokens.unsqueeze(1))[:, 0], seen, LAYOUT_GRID)   # (R, P)
    for r, (i, p) in enumerate(zip(rows, produced)):
        if p:
            lay, m = layouts[i].bool(), masks[r].to(layouts[i].device)
            iou = (lay & m).sum(1).float() / (lay | m).sum(1).float().clamp(min=1)
            out[i] = (named[i][0], int(iou.argmax()))
    return out


@torch.no_grad()
def edit_diff(model, images: Sequence, instructions: Sequence[str], opts: Sampling,
              size: Optional[int]) -> list[np.ndarray]:
    """Source images + instructions -> the edited images, each as a token diff (module
    docstring). With keep_pixels the dropped token's region, and the new token's where the
    bank stores layouts, are never pasted."""
    from ..models.setokim import prompt_batch
    from ..models.setokim.bank import token_sets_with_layouts
    from ..models.setokim.edit_diff import DIFF_OPS, DIFF_PROMPT, apply_diff, parse_diff, snap_new, written_place
    sets, layouts, seeds = token_sets_with_layouts(model, list(images), seeds=True)
    readable = model.readable(sets, seeds)
    texts = [DIFF_PROMPT.format(instruction=t.strip()) for t in instructions]
    looked = (segment_lookups(model, images, sets, layouts, readable, instructions, opts) if opts.lookup == "segment"
              else [None] * len(texts))
    prompt_images, prefixes = [], []
    for i, lk in enumerate(looked):
        extra = [] if lk is None else model.readable([sets[i][lk[1]:lk[1] + 1]], [seeds[i][lk[1]:lk[1] + 1]])
        prompt_images.append([readable[i]] + extra)
        prefixes.append(None if lk is None else f"{lk[0]} <image>")
    g = torch.Generator().manual_seed(opts.seed)
    kw = {**_kw(opts, g), "bank": None, "bank_layouts": None, "max_visual_tokens": 1}
    gen = model.generate(*prompt_batch(model, texts, prompt_images, answer_prefix=prefixes), **kw)
    edited, excluded = [], []
    for o, src, lay, sd, lk in zip(gen, sets, layouts, seeds, looked):
        text, written, written_seeds = o.text, list(o.images), list(o.seeds)
        if lk is not None:                       # the given start of the answer, then what the model wrote
            text = f"{lk[0]} <image> {text}".strip()
            written = [src[lk[1]:lk[1] + 1]] + written
            written_seeds = [sd[lk[1]:lk[1] + 1]] + written_seeds
        old, new = parse_diff(text, written)
        ex = torch.zeros(lay.shape[1], dtype=torch.bool)
        kept, dropped = apply_diff(src, old, None, model.normalize)
        if dropped is not None:
            ex |= lay[dropped].cpu()
        if new is not None and opts.bank is not None:
            in_place = dropped is not None and text.split()[:1] == [DIFF_OPS["recolor"][0]]
            moved = dropped is not None and text.split()[:1] == [DIFF_OPS["move"][0]]
            seed = written_seeds[-1][:1] if written_seeds else None
            new, placed = snap_new(model, new, lay, dropped, opts.bank, opts.bank_layouts, seed=seed,
                                   place=written_place(text), recolour=in_place, metric=opts.snap_metric,
                                   max_overlap=opts.max_overlap,
                                   like=src[dropped] if moved else None)
            ex |= placed
        edited.append(kept if new is None else torch.cat([kept, new.view(1, -1).to(kept.dtype)]))
        excluded.append(ex)
    out = _decode(model, edited, opts, g, size)
    if opts.keep_pixels is None:
        return out
    from ..images import as_image
    return [keep_source_pixels(np.asarray(as_image(im).resize(o.shape[1::-1])), o, src, lay, w, opts.keep_pixels,
                               exclude=ex)
            for im, o, src, lay, w, ex in zip(images, out, sets, layouts, edited, excluded)]
