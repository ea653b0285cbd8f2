"""Splicing a variable number of visual tokens into the text, by index arithmetic.

Each `<image>` placeholder of `input_ids` becomes `[Img] v_1 .. v_K [/Img]`, K the image's
own number of tokens (its token_mask's count; padding tokens never enter). Positions come
from a cumulative sum of per-position lengths (1 per text token, K + 2 per placeholder, 0
per padding), so the whole batch is spliced with scatters and no Python loop over images
or tokens (LLaVA's `prepare_inputs_labels_for_multimodal` loops over both).

What each position of the spliced sequence learns (hidden state at p predicts p + 1):
- text: cross-entropy against the next id where labels say so (answers only);
- `[Img]` of an image to write: its label is `[Img]` (the LM learns where an image starts);
- the `[Img]` position and v_1 .. v_{K-1} of an image to write predict the next visual
  token (`pred_pos` -> target `pred_src`) and "continue" (stop target 0);
- v_K predicts "stop" (stop target 1); `[/Img]` is then given, not predicted (label ignored);
- images to read (in the prompt) carry no loss at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .text import IGNORE_INDEX, IMAGE_TOKEN_INDEX

__all__ = ["Spliced", "splice", "length_groups", "in_groups", "shared_prefix", "after_prefix", "token_rank",
           "read_sources", "with_copy", "row_sums"]


@dataclass
class Spliced:
    ids: Tensor             # (B, L) text ids, [Img] / [/Img] ids, -1 at visual positions, pad_id at padding
    labels: Tensor          # (B, L) next-token targets at the position of the token (shift before use)
    attention_mask: Tensor  # (B, L) long
    position_ids: Tensor    # (B, L) long
    vis_dst: Tensor         # (V,) flat positions b * L + p of the visual tokens
    vis_src: Tensor         # (V,) their rows in the packed valid tokens image_tokens[image_token_mask]
    pred_pos: Tensor        # (M,) flat positions whose hidden state predicts a visual token
    pred_src: Tensor        # (M,) the packed row of that target token
    stop_pos: Tensor        # (S,) flat positions of the stop decisions
    stop_target: Tensor     # (S,) float, 1 where the image ends
    image_start: Tensor     # (N,) flat position of each image's [Img]
    image_row: Tensor       # (N,) each image's batch row
    image_writes: Tensor    # (N,) bool, True for an image to write (False: one to read)


def splice(input_ids: Tensor, labels: Optional[Tensor], attention_mask: Optional[Tensor],
           image_token_mask: Optional[Tensor], *, img_start_id: int, img_end_id: int, pad_id: int,
           max_length: Optional[int] = None, padding_side: str = "right") -> Spliced:
    """input_ids, labels, attention_mask (B, L0) with IMAGE_TOKEN_INDEX placeholders (a
    placeholder's label is IMAGE_TOKEN_INDEX for an image to write, IGNORE_INDEX for one to
    read); image_token_mask (N, K) bool, one row per placeholder in reading order (batch
    row, then position). Sequences longer than `max_length` are cut at its end."""
    dev = input_ids.device
    B, L0 = input_ids.shape
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if labels is None:
        labels = torch.full_like(input_ids, IGNORE_INDEX)
    is_img = (input_ids == IMAGE_TOKEN_INDEX) & valid
    N = 0 if image_token_mask is None else image_token_mask.shape[0]
    if int(is_img.sum()) != N:
        raise ValueError(f"{int(is_img.sum())} <image> placeholders in input_ids but {N} images given")
    if N:
        k = image_token_mask.sum(1)                                     # (N,)
        img_of = (is_img.flatten().long().cumsum(0) - 1).clamp(min=0).view(B, L0)
        rep = torch.where(is_img, k[img_of] + 2, torch.ones_like(input_ids)) * valid
    else:
        k = torch.zeros(0, dtype=torch.long, device=dev)
        rep = valid.long()
    end = rep.cumsum(1)
    start = end - rep                                                    # (B, L0) new position of each old one
    n = end[:, -1]                                                       # (B,) spliced lengths
    L = int(n.max()) if B else 0
    if max_length is not None:
        L = min(L, int(max_length))
    kept = n.clamp(max=L)
    off = (L - kept) if padding_side == "left" else torch.zeros_like(kept)   # (B,) left-padding shift

    ids = torch.full((B, L), pad_id, dtype=torch.long, device=dev)
    out_labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long, device=dev)

    def put(rows: Tensor, pos: Tensor, id_vals: Tensor, label_vals: Tensor) -> None:
        ok = pos < L
        r, p = rows[ok], pos[ok] + off[rows[ok]]
        ids[r, p] = id_vals[ok]
        out_labels[r, p] = label_vals[ok]

    tb, tl = (valid & ~is_img).nonzero(as_tuple=True)
    put(tb, start[tb, tl], input_ids[tb, tl], labels[tb, tl])

    pb, pl = is_img.nonzero(as_tuple=True)                               # (N,) row-major = image order
    s = start[pb, pl]
    writes = labels[pb, pl] == IMAGE_TOKEN_INDEX                         # (N,) images to write
    put(pb, s, torch.full_like(s, img_start_id),
        torch.where(writes, torch.full_like(s, img_start_id), torch.full_like(s, IGNORE_INDEX)))
    put(pb, s + k + 1, torch.full_like(s, img_end_id), torch.full_like(s, IGNORE_INDEX))

    empty = torch.zeros(0, dtype=torch.long, device=dev)
    if N:
        ib, _ = image_token_mask.nonzero(as_tuple=True)                  # (V,) packed order
        rank = token_rank(image_token_mask)
        row = pb[ib]
        pos = s[ib] + 1 + rank                                           # (V,) position of v_{rank+1}
        src = torch.arange(ib.shape[0], device=dev)
        ok = pos < L
        flat = row * L + pos + off[row]
        vis_dst, vis_src = flat[ok], src[ok]
        ids.view(-1)[vis_dst] = -1
        w = writes[ib] & ok                                              # targets inside the cut
        pred_pos, pred_src = flat[w] - 1, src[w]
        last = s + k                                                     # v_K: predicts the stop
        wl = writes & (last + 1 < L)
        end_pos = pb[wl] * L + last[wl] + off[pb[wl]]
        stop_pos = torch.cat([pred_pos, end_pos])
        stop_target = torch.cat([torch.zeros(pred_pos.shape[0], device=dev), torch.ones(end_pos.shape[0], device=dev)])
        image_start = pb * L + s + off[pb]
        image_row, image_writes = pb, writes
    else:
        vis_dst = vis_src = pred_pos = pred_src = stop_pos = image_start = image_row = empty
        stop_target = torch.zeros(0, device=dev)
        image_writes = torch.zeros(0, dtype=torch.bool, device=dev)

    ar = torch.arange(L, device=dev).view(1, L)
    attn = ((ar >= off.view(B, 1)) & (ar < (off + kept).view(B, 1))).long()
    position_ids = (attn.cumsum(1) - 1).clamp(min=0)
    return Spliced(ids, out_labels, attn, position_ids, vis_dst, vis_src, pred_pos, pred_src, stop_pos, stop_target,
                   image_start, image_row, image_writes)


def token_rank(image_token_mask: Tensor) -> Tensor:
    """image_token_mask (N, K) bool -> (V,) each valid token's index within its image, in the
    packed order of image_tokens[image_token_mask]."""
    return (image_token_mask.long().cumsum(1) - 1)[image_token_mask]


def read_sources(sp: Spliced, image_token_mask: Tensor, at: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """What a copy head may point at from flat positions `at` (M,) of `sp`'s (B, L) layout:
    the spliced tokens of images read (not written) in the same row, before `at`.
    -> src (S,) their packed rows in image_tokens[image_token_mask], src_rank (S,) their
    index in their image, allowed (M, S) bool."""
    L = sp.ids.shape[1]
    packed_image = image_token_mask.nonzero()[:, 0]                      # (V,) image of each packed token
    read = ~sp.image_writes[packed_image[sp.vis_src]]                   # (S0,) spliced tokens of read images
    dst, src = sp.vis_dst[read], sp.vis_src[read]
    allowed = ((dst // L)[None] == (at // L)[:, None]) & (dst[None] < at[:, None])   # same row, before
    return src, token_rank(image_token_mask)[src], allowed


def length_groups(lengths: Tensor, groups: int) -> list[Tensor]:
    """lengths (B,) -> up to `groups` index tensors partitioning the rows, each a run of
    the rows sorted by length, chosen to minimise the padded size sum(rows_g * longest_g)
    (dynamic programming over the sorted lengths; B is a batch, so O(groups * B^2) is nothing)."""
    order = torch.argsort(lengths.cpu(), stable=True)
    ls = lengths.cpu()[order].tolist()
    B = len(ls)
    g = max(1, min(int(groups), B))
    inf = float("inf")
    # cost[j][i]: the best padded size of the first i sorted rows in j groups; cut: where the last begins
    cost = [[inf] * (B + 1) for _ in range(g + 1)]
    cut = [[0] * (B + 1) for _ in range(g + 1)]
    cost[0][0] = 0
    for j in range(1, g + 1):
        for i in range(1, B + 1):
            for k in range(j - 1, i):
                c = cost[j - 1][k] + (i - k) * ls[i - 1]
                if c < cost[j][i]:
                    cost[j][i], cut[j][i] = c, k
    j = min(range(1, g + 1), key=lambda jj: cost[jj][B])
    bounds, i = [], B
    while j > 0:
        bounds.append((cut[j][i], i))
        i, j = cut[j][i], j - 1
    dev = lengths.device
    return [order[a:b].to(dev) for a, b in reversed(bounds) if b > a]


def in_groups(hidden, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor, groups: int = 1) -> Tensor:
    """hidden(embeds, mask, positions) -> (b, n, H) over a right-padded batch (B, L, H), the rows
    run in up to `groups` groups of similar length (`length_groups`), each cut to its own longest
    row (the rows that share a padded length are the same computation, so the valid positions
    get the same states: only less padding is computed). Padding positions come back as 0."""
    B, L, _ = inputs_embeds.shape
    if groups <= 1 or B <= 1:
        return hidden(inputs_embeds, attention_mask, position_ids)
    parts, rows = [], []
    for idx in length_groups(attention_mask.sum(1), groups):
        n = int(attention_mask[idx].sum(1).max())
        h = hidden(inputs_embeds[idx, :n], attention_mask[idx, :n], position_ids[idx, :n])
        parts.append(F.pad(h, (0, 0, 0, L - n)))
        rows.append(idx)
    inverse = torch.empty(B, dtype=torch.long, device=inputs_embeds.device)
    inverse[torch.cat(rows)] = torch.arange(B, device=inputs_embeds.device)
    return torch.cat(parts)[inverse]


def shared_prefix(inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor) -> int:
    """The number P of leading positions that are the same input in every row of a batch (B, L, H): the same
    embedding (BOS and the system prompt; a visual token's differs), the same position, no padding. Their hidden
    states are the same in every row (the LM is causal), so `after_prefix` runs them once. Capped so that every
    row keeps at least one position after them; 0 for one row."""
    if inputs_embeds.shape[0] < 2:
        return 0
    same = (inputs_embeds == inputs_embeds[:1]).all(-1).all(0) & attention_mask.bool().all(0) \
        & (position_ids == position_ids[:1]).all(0)                                       # (L,)
    return min(int(same.long().cumprod(0).sum()), int(attention_mask.sum(1).min()) - 1)


def after_prefix(hidden, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor, groups: int = 1,
                 cache_kwarg: str = "past_key_values", min_prefix: Optional[int] = 2) -> Tensor:
    """`in_groups` with the batch's shared prefix (`shared_prefix`, P >= min_prefix) run once: its hidden states
    and keys / values come from one row, the keys / values are expanded to each group's rows and the rest of the
    rows runs after them. The same states as `in_groups` (B, L, H) (tested: loss and gradients), with P fewer
    positions per row computed. hidden(embeds, mask, positions, use_cache=..., **{cache_kwarg: cache}) -> the
    decoder's output (`last_hidden_state`, `past_key_values`); eager attention only where nothing reads its
    weights (an `AttentionTap` sees the rest's queries only: the trainer runs it without the prefix).
    min_prefix None: no prefix (`in_groups` itself)."""
    from transformers import DynamicCache
    P = 0 if min_prefix is None else shared_prefix(inputs_embeds, attention_mask, position_ids)
    if min_prefix is None or P < min_prefix:
        return in_groups(lambda *a: hidden(*a, use_cache=False).last_hidden_state,
                         inputs_embeds, attention_mask, position_ids, groups)
    first = hidden(inputs_embeds[:1, :P], attention_mask[:1, :P], position_ids[:1, :P], use_cache=True)
    kv = [(c.keys, c.values) for c in (getattr(first, "cache", None) or first.past_key_values).layers]  # (1, h, P, d)

    def rest(e: Tensor, a: Tensor, p: Tensor) -> Tensor:
        b = e.shape[0]
        cache = DynamicCache()
        for i, (k, v) in enumerate(kv):
            cache.update(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), i)
        return hidden(e, torch.cat([a.new_ones(b, P), a], 1), p, use_cache=False,
                      **{cache_kwarg: cache}).last_hidden_state

    h = in_groups(rest, inputs_embeds[:, P:], attention_mask[:, P:], position_ids[:, P:], groups)   # (B, L - P, H)
    return torch.cat([first.last_hidden_state.expand(h.shape[0], -1, -1), h], 1)


def with_copy(model, generated: Tensor, sp: Spliced, image_tokens: Optional[Tensor],
              image_token_mask: Optional[Tensor], h: Tensor, at: Tensor, rank: Tensor,
              hard: bool = False) -> Tensor:
    """generated (M, T): the visual head's tokens from h (M, H) at flat positions `at` (M,)
    of `sp`'s layout, of index rank (M,) in the image written; the pointer reads
    `splice.read_sources` (hard: CopyHead's argmax). -> gate * copy + (1 - gate) * generated."""
    generated = generated.float()
    if image_token_mask is None or not sp.vis_src.numel():
        return generated
    src, src_rank, allowed = read_sources(sp, image_token_mask, at)
    x = model.normalize(image_tokens[image_token_mask][src].float()).to(model.head_dtype)
    copy, gate = model.copy_head(h, rank, x, src_rank, allowed, hard=hard)
    return gate * copy + (1 - gate) * generated


def row_sums(values: Tensor, sel: Tensor) -> Tensor:
    """values (n,) at the True places of sel (B, L), in row-major order -> (B, 2): each row's sum
    of its values and their number (a row without any: 0, 0)."""
    row = sel.nonzero()[:, 0]
    return torch.stack([values.new_zeros(sel.shape[0]).index_add(0, row, values),
                        torch.bincount(row, minlength=sel.shape[0]).to(values.dtype)], 1)
