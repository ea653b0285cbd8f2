"""Attention supervision for questions (not in the paper; off unless the recipe's `loss.attend` > 0).

Setokim answers "What color is the hexagon?" by attending from the answer position to the
image's tokens, and the tiny runs never learnt to find an object by its shape (README, stage
III). This term tells the LM where to look: at the position that predicts each answer's
first token, in one layer (`loss.attend_layer`), the attention on the image's tokens is
pulled towards the tokens of the objects the question names
(`data.shapes_text.referred_objects`):

    share_h = sum_{t in object} a_h[q, t] / sum_{t in image} a_h[q, t]      (per head h)
    L_attend = mean over answers of  -log(max_h share_h + 1e-6)     (`heads: max`, the default)
                                     -log(mean_h share_h + 1e-6)    (`heads: mean`)

so with `max` one head of that layer has to find the object and the others stay free; with
`mean` every head looks at it. A token belongs
to the object that holds more than half of its patches (`token_objects`, the world's
instance maps); answers whose question names no object (or none with a token) are left out.
The attention weights come from a hook on that layer (`AttentionTap`), which runs the LM with
eager attention while it is on.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .heads import order_tokens
from .splice import length_groups

__all__ = ["token_objects", "token_object_counts", "object_tokens", "AttentionTap", "answer_queries", "attend_loss"]


def token_object_counts(out, i: int, instances: np.ndarray) -> tuple[Tensor, Tensor]:
    """Image i of a TokenizerOutput and its instance map (H, W) (0 background, object j + 1)
    -> (each token's area of each instance id (K, n), each token's patches (K,)), in the
    tokenizer's own token order (K: its padded token count)."""
    labels = out.image_labels(i).cpu()                                       # (gh, gw) token of each patch
    gh, gw = labels.shape
    inst = torch.from_numpy(np.array(instances)).long()
    n = int(inst.max()) + 1
    share = F.interpolate(F.one_hot(inst, n).permute(2, 0, 1)[None].float(), size=(gh, gw), mode="area")[0]
    K = out.tokens.shape[1]
    onehot = F.one_hot(labels.clamp_min(0), K).float() * (labels >= 0)[..., None]     # (gh, gw, K)
    return torch.einsum("hwk,nhw->kn", onehot, share), onehot.sum((0, 1))


def token_objects(out, i: int, instances: np.ndarray) -> Tensor:
    """Image i of a TokenizerOutput and its instance map (H, W) (0 background, object j + 1)
    -> the instance id of each of its tokens in generation order (K_i,), 0 for a token whose
    patches are not more than half one object's."""
    counts, size = token_object_counts(out, i, instances)                    # (K, n) object area per token
    K = counts.shape[0]
    best, obj = counts.max(1)
    obj = torch.where((obj > 0) & (best > 0.5 * size), obj, torch.zeros_like(obj))
    idx, mask = order_tokens(obj.view(1, K, 1).float(), out.token_mask[i:i + 1].cpu(), out.seeds[i:i + 1].cpu())
    return idx[0, :, 0][mask[0]].long()


def object_tokens(model, out, i: int, instances: np.ndarray) -> Tensor:
    """Image i of a TokenizerOutput and its instance map -> per instance id (n,), the index in
    generation order of the token holding most of its pixels (ties: the first; id 0 is the
    background)."""
    counts, _ = token_object_counts(out, i, instances)                              # (K, n)
    K, n = counts.shape
    idx, mask = model.order(counts.view(1, K, n).float(), out.token_mask[i:i + 1].cpu(), out.seeds[i:i + 1].cpu())
    return idx[0][mask[0]].argmax(0)


class AttentionTap:
    """Keeps the attention weights (B, H, L, L) of one LM layer, per call of the LM, while on
    (eager attention: the fused kernels return none)."""

    def __init__(self, model, layer: int = -1):
        self.decoder = model.lm.get_decoder()
        self.layer = self.decoder.layers[layer].self_attn
        self.weights: list[Tensor] = []

    @contextmanager
    def on(self):
        cfg = self.decoder.config
        before = cfg._attn_implementation
        cfg._attn_implementation = "eager"
        handle = self.layer.register_forward_hook(lambda mod, args, out: self.weights.append(out[1]))
        try:
            yield self
        finally:
            handle.remove()
            cfg._attn_implementation = before


def answer_queries(labels: Tensor) -> list[list[int]]:
    """Spliced labels (B, L) -> per row the positions that predict each answer's first token
    (the position before each run of counted labels), in order."""
    counted = labels != -100
    starts = counted & ~F.pad(counted, (1, 0))[:, :-1]
    return [(r.nonzero().squeeze(-1) - 1).tolist() for r in starts]


def attend_loss(weights: Sequence[Tensor], sp, attention_mask: Tensor, groups: int,
                targets: Sequence[tuple[int, int, Tensor]], heads: str = "max") -> Optional[Tensor]:
    """weights: what an AttentionTap kept over one `Setokim.hidden_in_groups` call (one
    (B_g, H, n_g, n_g) per group, in its order); sp: the batch's Spliced; attention_mask: the
    spliced mask it ran with; targets: (row, answer turn, bool (K_row,) over the row's first
    image's tokens) -> L_attend (module docstring; heads "max" or "mean"), or None where no
    answer has a target."""
    if heads not in ("max", "mean"):
        raise ValueError(f"heads must be 'max' or 'mean', got {heads!r}")
    B, L = sp.labels.shape
    if groups <= 1 or B <= 1:
        where = {b: (0, b) for b in range(B)}
    else:
        where = {int(b): (g, r) for g, idx in enumerate(length_groups(attention_mask.sum(1), groups))
                 for r, b in enumerate(idx.tolist())}
    pos = sp.vis_dst[sp.vis_src.argsort()]                                   # packed tokens' flat positions
    rows = pos // L
    queries = answer_queries(sp.labels)
    losses = []
    for b, turn, obj in targets:
        if turn >= len(queries[b]) or not bool(obj.any()):
            continue
        cols = pos[rows == b] % L
        cols, obj = cols[:obj.shape[0]], obj[:cols.shape[0]].to(cols.device)
        g, r = where[b]
        w = weights[g][r, :, queries[b][turn], cols].float()                # (H, K)
        share = (w * obj).sum(-1) / w.sum(-1).clamp_min(1e-9)               # (H,)
        losses.append(-torch.log((share.max() if heads == "max" else share.mean()) + 1e-6))
    return torch.stack(losses).mean() if losses else None
