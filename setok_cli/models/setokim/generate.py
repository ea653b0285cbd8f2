"""Generation: text and images from one batched loop over steps, with the KV cache.

Every row is in text mode or image mode at each step:
- text: sample the next id from the LM head (temperature, top-p); `[Img]` switches the row
  to image mode, `</s>` or `max_new_tokens` text ids end it;
- image: the stop head decides (p > 0.5, or `max_visual_tokens` reached): stop feeds
  `[/Img]` and returns to text; otherwise the visual head produces the next token
  (regression, or DDIM sampling for the diffusion head) and its projection is fed back.
A prompt that ends with `[Img]` starts in image mode (the way to ask for an image).
With `use_cache=False` the whole sequence is re-run each step (the reference the cache
is checked against, and the benchmark's baseline).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import UserError
from .place import NO_SEED, UNKNOWN_SEED
from .text import (IMAGE_TOKEN, IMAGE_TOKEN_INDEX, collate_conversations, pack_token_sets, render_conversation,
                   tokenize_with_images)

__all__ = ["Generated", "generate", "prompt_batch", "sample_logits", "decode_images"]


@dataclass
class Generated:
    text: str                          # the answer, "<image>" where an image was produced
    ids: list[int]                     # text ids produced ([Img] / [/Img] included)
    images: list[Tensor] = field(default_factory=list)   # per produced image: tokens (K_i, T)
    seeds: list[Tensor] = field(default_factory=list)    # beside them, their seed cells (K_i,) (place head)


def sample_logits(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0,
                  generator: Optional[torch.Generator] = None) -> Tensor:
    """logits (B, V) -> ids (B,): greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sp, idx = probs.sort(-1, descending=True)
        sp = torch.where(sp.cumsum(-1) - sp > top_p, torch.zeros_like(sp), sp)   # keep the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(-1, idx, sp)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prompt_batch(model, prompts: Sequence, images: Optional[Sequence[Sequence[Tensor]]] = None,
                 start_image: bool = False, answer_prefix: Optional[Sequence[Optional[str]]] = None):
    """Prompts -> the tensors `generate` takes. A prompt is a string (one user turn) or a
    LLaVA `conversations` list ending with a user turn; `images[i]` are prompt i's input
    images as token sets (K_j, T) in generation order, one per `<image>`, or (tokens, seeds)
    pairs (`Setokim.readable`: a model that reads places). start_image: end each prompt
    with `[Img]` (ask for an image). answer_prefix[i]: the start of prompt i's answer, given
    (None: none), tokenized as a training answer is ("Make <image>": its `<image>` marks take
    the next images of `images[i]`, one visual token each as the answer would write them: teacher
    forcing). -> input_ids, attention_mask (B, L0), image_tokens (N, K, T), image_token_mask
    (N, K), image_token_seeds (N, K) or None (no place head)."""
    from .place import pack_seeds
    tok = model.text_tokenizer
    if answer_prefix is not None and len(answer_prefix) != len(prompts):
        raise UserError(f"{len(prompts)} prompt(s) but {len(answer_prefix)} answer prefix(es)")
    rendered, sets, seeds = [], [], []
    for i, p in enumerate(prompts):
        conv = [{"from": "human", "value": p}] if isinstance(p, str) else list(p)
        ids, labels = render_conversation(conv, tok, add_generation_prompt=True, where=f"prompt {i}",
                                          image_placement=model.config.image_placement,
                                          system=model.config.system_prompt)
        prefix = answer_prefix[i] if answer_prefix is not None else None
        if prefix:
            extra = tokenize_with_images(prefix, tok)
            ids, labels = ids + extra, labels + [-100] * len(extra)
        if start_image:
            ids, labels = ids + [model.img_start_id], labels + [-100]
        imgs = list(images[i]) if images is not None else []
        need = sum(str(t["value"]).count(IMAGE_TOKEN) for t in conv) + (prefix or "").count(IMAGE_TOKEN)
        if need != len(imgs):
            raise UserError(f"prompt {i}: {need} <image> mark(s) but {len(imgs)} image(s)")
        rendered.append((ids, labels))
        for x in imgs:
            t, s = x if isinstance(x, (tuple, list)) else (x, None)
            sets.append(t)
            seeds.append(s)
    input_ids, _, attention_mask = collate_conversations(rendered, model.pad_id, padding_side="left")
    tokens, mask = pack_token_sets(sets, model.config.token_dim)
    dev = model.device
    placed = pack_seeds(seeds, sets, mask).to(dev) if model.place_head is not None else None
    return input_ids.to(dev), attention_mask.to(dev), tokens.to(dev), mask.to(dev), placed


@torch.no_grad()
def generate(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None, image_tokens: Optional[Tensor] = None,
             image_token_mask: Optional[Tensor] = None, image_token_seeds: Optional[Tensor] = None, *,
             max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, visual_steps: Optional[int] = None, visual_temperature: Optional[float] = None,
             max_visual_tokens: Optional[int] = None, use_cache: bool = True,
             generator: Optional[torch.Generator] = None, text_only: bool = False,
             copy: str = "hard", bank: Optional[Tensor] = None, source_margin: float = 2.5,
             guidance: float = 1.0, uncond: Optional[tuple[Tensor, Tensor]] = None,
             bank_layouts: Optional[Tensor] = None, image_layouts: Optional[Sequence[Tensor]] = None,
             max_overlap: float = 0.25, snap_metric: str = "cos", place_temperature: float = 1.0,
             place: str = "auto", snap_source: bool = False) -> list[Generated]:
    """input_ids, attention_mask (B, L0) left-padded prompts with IMAGE_TOKEN_INDEX
    placeholders; image_tokens (N, K, T), image_token_mask (N, K) their images,
    image_token_seeds (N, K) their tokens' seeds (None: unknown; read by a model with
    `place_input`) (`prompt_batch` makes all five) -> one Generated per row. text_only: `[Img]` is never
    sampled (an answer in words, e.g. `setok ask`). copy: with a copy head, "hard" copies
    the source token the pointer weighs most, "soft" the pointer's weighted mean (as trained).
    bank (M, T): real tokens (`bank.load_bank`); each written token is replaced by the
    nearest of the bank or of the row's prompt images (these preferred unless the bank's is
    `source_margin` times closer) before it is fed back (`bank.nearest`). bank_layouts (M, P)
    bool: the bank tokens' regions; with them each image's object tokens are kept apart
    (`bank.snap_placed`, at most `max_overlap` of a token on the objects placed before it),
    and image_layouts [(K_j, P)], one per prompt image (its unpadded tokens), do the same
    for the prompt images' tokens (without them those are never checked). snap_metric: "l2"
    or "cos" (snap by direction: `bank._dist`).
    guidance g != 1 with uncond (input_ids, attention_mask) (B, L1): the same rows' prompts
    without their condition (left-padded, no images; e.g. `UNCOND_GENERATE` with
    start_image) run beside them, fed the same tokens, and each visual token is drawn from
    the guided head (classifier-free guidance: logits or predictions u + g (c - u)).
    place_temperature: with a place head, each token's seed cell is drawn at this temperature
    (0: the most likely cell) before the visual head writes the token there (place.PlaceHead).
    place: which rows draw a place: "draw" all, "off" none (the head reads the "unknown place"
    embedding), "auto" the rows whose prompt reads no image (an edit keeps its source's places:
    drawing them scores worse on val even when the model reads places, README).
    snap_source: each written token is replaced by the nearest token (by direction, standardised)
    of its row's prompt images and fed back at that token's own seed: a looking answer's token
    (`look.py`) is then read as the object it found, where that object lies."""
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    for name, v in (("visual_steps", visual_steps), ("max_visual_tokens", max_visual_tokens)):
        if v is not None and v < 1:
            raise UserError(f"{name} must be >= 1, got {v}")
    if copy not in ("hard", "soft"):
        raise UserError(f"copy must be 'hard' or 'soft', got {copy!r}")
    if visual_temperature is not None and not visual_temperature >= 0:
        raise UserError(f"visual_temperature must be >= 0, got {visual_temperature}")
    T = int(model.config.token_dim)
    if bank is not None and (bank.ndim != 2 or bank.shape[1] != T or bank.shape[0] == 0):
        raise UserError(f"token bank {tuple(bank.shape)}: need (M >= 1, {T})")
    if not source_margin > 0:
        raise UserError(f"source_margin must be > 0, got {source_margin}")
    if bank_layouts is not None and (bank is None or bank_layouts.ndim != 2 or bank_layouts.shape[0] != bank.shape[0]):
        raise UserError("bank_layouts: one row per bank token, and a bank")
    if snap_metric not in ("l2", "cos"):
        raise UserError(f"snap_metric must be 'l2' or 'cos', got {snap_metric!r}")
    if not 0 <= max_overlap <= 1:
        raise UserError(f"max_overlap must be in [0, 1], got {max_overlap}")
    if not guidance >= 0:
        raise UserError(f"guidance must be >= 0, got {guidance}")
    if not place_temperature >= 0:
        raise UserError(f"place_temperature must be >= 0, got {place_temperature}")
    if place not in PLACE_MODES:
        raise UserError(f"place must be one of {', '.join(PLACE_MODES)}, got {place!r}")
    every_row_reads = bool((input_ids == IMAGE_TOKEN_INDEX).any(1).all())
    if snap_source and (image_tokens is None or guidance != 1 or not every_row_reads):
        raise UserError("snap_source needs an image in every prompt, and no guidance")
    if guidance != 1:
        if uncond is None:
            raise UserError("guidance needs the unconditional prompts (uncond)")
        if model.config.visual_head == "diffusion":
            raise UserError("guidance works with the mse and codebook visual heads")
        if (uncond[0].shape[0] != input_ids.shape[0] or bool((uncond[0] == IMAGE_TOKEN_INDEX).any())
                or not torch.equal(uncond[0][:, -1].cpu(), input_ids[:, -1].cpu())):
            raise UserError("uncond: one prompt per row, without images, ending as the row's prompt does")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids, attention_mask = _stack_left(model, (input_ids, attention_mask), uncond)
    was_training = model.training
    model.eval()
    try:
        return _generate(model, input_ids, attention_mask, image_tokens, image_token_mask, max_new_tokens,
                         temperature, top_p, visual_steps, visual_temperature,
                         max_visual_tokens or model.config.max_visual_tokens, use_cache, generator, text_only,
                         copy == "hard", bank, source_margin, guidance if guidance != 1 else None,
                         bank_layouts, image_layouts, max_overlap, snap_metric, place_temperature, place,
                         image_token_seeds, snap_source)
    finally:
        model.train(was_training)


PLACE_MODES = ("auto", "draw", "off")


def _stack_left(model, a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Two left-padded batches (ids, mask) -> one (2B, max length), left-padded."""
    L = max(a[0].shape[1], b[0].shape[1])
    ids, masks = [], []
    for x, m in (a, b):
        n = L - x.shape[1]
        ids.append(F.pad(x, (n, 0), value=model.pad_id))
        masks.append(F.pad(m.to(x.device), (n, 0), value=0))
    return torch.cat(ids), torch.cat(masks)


def _generate(model, input_ids, attention_mask, image_tokens, image_token_mask, max_new, temperature, top_p,
              vsteps, vtemp, max_vis, use_cache, generator, text_only=False, hard_copy=True,
              bank=None, source_margin=2.5, guidance=None, bank_layouts=None, image_layouts=None,
              max_overlap=0.25, snap_metric="cos", place_temperature=1.0, place_mode="auto",
              image_token_seeds=None, snap_source=False) -> list[Generated]:
    from transformers import DynamicCache

    from .bank import layout_cell, nearest, snap_placed
    from .sized import size_words, sized_length
    sp = model.splice(input_ids, None, attention_mask, image_token_mask, padding_side="left")
    emb = model.embed(sp, image_tokens, image_token_mask, image_token_seeds)   # (B, L, H)
    attn, pos = sp.attention_mask, sp.position_ids
    B, dev = emb.shape[0], emb.device
    head_dtype = model.head_dtype
    cache = {model.cache_kwarg: DynamicCache()} if use_cache else {}
    out = model.hidden(emb, attn, pos, use_cache=use_cache, **cache)
    h = out.last_hidden_state[:, -1]                                       # (B, H)
    lm_head, table = model.lm.get_output_embeddings(), model.lm.get_input_embeddings()
    s_id, e_id, eos = model.img_start_id, model.img_end_id, model.eos_id
    image_mode = sp.ids[:, -1] == s_id
    # a sized answer ("two objects [Img]", sized.py) fixes its image's length; -1: the stop head decides
    words = size_words(model.text_tokenizer, table.num_embeddings) if model.config.sized_images else None
    prev = list(F.pad(sp.ids, (2, 0), value=-1)[:, -3:-1].unbind(1))       # the two ids before the last
    size = torch.where(image_mode, sized_length(words, *prev), torch.full_like(image_mode, -1, dtype=torch.long))
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    n_text = torch.zeros(B, dtype=torch.long, device=dev)
    n_vis = torch.zeros(B, dtype=torch.long, device=dev)
    place = model.place_head
    reads = (input_ids == IMAGE_TOKEN_INDEX).any(1).to(dev)
    draw = torch.full((B,), place_mode == "draw", device=dev) if place_mode != "auto" else ~reads
    last_seed = torch.full((B,), NO_SEED, dtype=torch.long, device=dev)    # the place head's previous cell
    seed = last_seed.clone()
    rec_ids, rec_vis, rec_kind, rec_seed = [], [], [], []          # per step: (B,), (B, T), (B,), (B,)
    sources = _row_sources(model, input_ids, image_tokens, image_token_mask, image_token_seeds) if snap_source else None
    if bank is not None:                  # snap targets, standardised: the bank and each row's prompt images
        bank = model.normalize(bank.to(dev).float())
        per_row = (input_ids == IMAGE_TOKEN_INDEX).sum(1).tolist()
        src = [] if image_tokens is None else [model.normalize(t[m].float())
                                               for t, m in zip(image_tokens, image_token_mask)]
        cum = [0]
        for n in per_row:
            cum.append(cum[-1] + n)
        row_src = [torch.cat(src[cum[b]:cum[b + 1]]) if cum[b + 1] > cum[b] else bank[:0] for b in range(B)]
        if bank_layouts is not None:     # each row's placed object patches, cleared when an image starts
            bank_layouts = bank_layouts.to(dev).bool()
            P = bank_layouts.shape[1]
            lays = ([torch.zeros(s.shape[0], P, dtype=torch.bool, device=dev) for s in src] if image_layouts is None
                    else [lay.to(dev).bool() for lay in image_layouts])
            if [lay.shape for lay in lays] != [(s.shape[0], P) for s in src]:
                raise UserError(f"image_layouts: one (K_j, {P}) per prompt image, as its tokens")
            row_lay = [torch.cat(lays[cum[b]:cum[b + 1]]) if cum[b + 1] > cum[b] else bank_layouts[:0]
                       for b in range(B)]
            used = torch.zeros(B, P, dtype=torch.bool, device=dev)
    Bc = B // 2 if guidance is not None else B                             # rows B / 2.. are the unconditional ones
    while not bool(done.all()):
        logits = lm_head(h).float()
        logits[:, e_id] = float("-inf")                                    # [/Img] is given, never sampled
        if text_only:
            logits[:, s_id] = float("-inf")
        tok = sample_logits(logits, temperature, top_p, generator)
        hh = h.to(head_dtype)
        # an image has at least one token (the stop head is trained to continue at [Img])
        stop = (model.stop_head(hh).squeeze(-1) > 0) & (n_vis > 0)
        stop = torch.where(size > 0, n_vis >= size, stop) | (n_vis >= max_vis)
        vis = hh.new_zeros(B, int(model.config.token_dim), dtype=torch.float32)
        rows = (image_mode & ~done).nonzero().squeeze(-1)                  # sample only where an image is open
        if guidance is not None:           # the unconditional rows follow their conditional row
            tok, stop, rows = tok[:Bc].repeat(2), stop[:Bc].repeat(2), rows[rows < Bc]
        if rows.numel():
            hr, hu = hh[rows], (hh[rows + Bc] if guidance is not None else None)
            if place is not None:          # where, then what: the cell drawn after the previous one
                drawn = place.sample(hr, last_seed[rows], place_temperature, generator)
                seed[rows] = torch.where(draw[rows], drawn, torch.full_like(drawn, UNKNOWN_SEED))
                hr = place.condition(hr, seed[rows])
                hu = None if hu is None else place.condition(hu, seed[rows])
                if guidance is not None:
                    seed[rows + Bc] = seed[rows]
            g = {} if guidance is None else dict(uncond=hu, guidance=guidance)
            vis[rows] = model.visual_head.sample(hr, steps=vsteps, temperature=vtemp,
                                                 generator=generator, **g).float()
            if model.copy_head is not None:     # the pointer: the prompt's images stand before every step
                vis[rows] = model.with_copy(vis[rows], sp, image_tokens, image_token_mask, hh[rows],
                                            (rows + 1) * sp.ids.shape[1] - 1, n_vis[rows], hard=hard_copy)
            if sources is not None:        # the nearest prompt token, read at its own seed
                vis[rows], at_seed = _snap_source(vis[rows], *(x[rows] for x in sources))
                seed[rows] = at_seed
            if bank is not None and bank_layouts is not None:
                at = None if place is None else layout_cell(seed[rows], place.cells)
                vis[rows], placed = snap_placed(vis[rows], bank, bank_layouts, used[rows],
                                                [row_src[r] for r in rows.tolist()],
                                                [row_lay[r] for r in rows.tolist()], source_margin, max_overlap,
                                                snap_metric, at)
                used[rows] |= placed
            elif bank is not None:
                vis[rows] = nearest(vis[rows], bank, [row_src[r] for r in rows.tolist()], source_margin, snap_metric)
            if guidance is not None:
                vis[rows + Bc] = vis[rows]
        text_rows = ~image_mode & ~done
        emit_vis = image_mode & ~done & ~stop
        end_img = image_mode & ~done & stop
        next_id = torch.where(text_rows, tok, torch.where(end_img, torch.full_like(tok, e_id),
                                                          torch.full_like(tok, model.pad_id)))
        e = table(next_id)
        fed = model.project(vis.to(head_dtype))
        if model.reads_places:           # the written token is read at the place it was written at
            fed = fed + place.read(seed)
        e = torch.where(emit_vis.view(B, 1), fed.to(e.dtype), e)
        # 0 nothing, 1 text id, 2 visual token
        rec_kind.append(torch.where(emit_vis, 2, torch.where(text_rows | end_img, 1, 0)))
        rec_ids.append(next_id)
        rec_vis.append(model.denormalize(vis))
        rec_seed.append(seed.clone())
        starts = text_rows & (tok == s_id)
        size = torch.where(starts, sized_length(words, *prev), size)
        prev = [torch.where(text_rows, prev[1], prev[0]), torch.where(text_rows, tok, prev[1])]
        if bank is not None and bank_layouts is not None:
            used[starts] = False
        n_vis = torch.where(emit_vis, n_vis + 1, torch.where(starts, 0, n_vis))
        if place is not None:               # a seedless token is the last kind: only seedless ones follow it
            written = torch.where(seed >= 0, seed, torch.full_like(seed, place.cells))
            last_seed = torch.where(emit_vis, written, torch.where(starts, NO_SEED, last_seed))
        image_mode = (image_mode & ~end_img) | starts
        n_text = n_text + text_rows.long()
        done = done | (text_rows & ((tok == eos) | (n_text >= max_new)))
        if bool(done.all()):
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
        pos = torch.cat([pos, pos[:, -1:] + 1], 1)
        if use_cache:
            out = model.hidden(e.unsqueeze(1), attn, pos[:, -1:], use_cache=True, **cache)   # the cache grows in place
        else:
            emb = torch.cat([emb, e.unsqueeze(1)], 1)
            out = model.hidden(emb, attn, pos, use_cache=False)
        h = out.last_hidden_state[:, -1]
    return _collect(model, torch.stack(rec_kind, 1)[:Bc], torch.stack(rec_ids, 1)[:Bc], torch.stack(rec_vis, 1)[:Bc],
                    torch.stack(rec_seed, 1)[:Bc])


def _row_sources(model, input_ids, image_tokens, image_token_mask, image_token_seeds) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's prompt-image tokens, standardised and zero-padded (B, K, T), their mask (B, K)
    and seeds (B, K) (UNKNOWN_SEED where not known): what `snap_source` snaps to."""
    from torch.nn.utils.rnn import pad_sequence
    dev = input_ids.device
    per_row = (input_ids == IMAGE_TOKEN_INDEX).sum(1).tolist()
    seeds = (image_token_seeds if image_token_seeds is not None
             else torch.full(image_token_mask.shape, UNKNOWN_SEED, dtype=torch.long))
    toks, sds, n = [], [], 0
    for k in per_row:
        m = image_token_mask[n:n + k].to(dev)
        toks.append(model.normalize(image_tokens[n:n + k].to(dev).float()[m]))
        sds.append(seeds[n:n + k].to(dev).long()[m])
        n += k
    lengths = torch.tensor([t.shape[0] for t in toks], device=dev)
    mask = torch.arange(int(lengths.max()) if len(toks) else 0, device=dev) < lengths[:, None]
    return (pad_sequence(toks, batch_first=True), mask,
            pad_sequence(sds, batch_first=True, padding_value=UNKNOWN_SEED))


def _snap_source(x: Tensor, src: Tensor, mask: Tensor, seeds: Tensor) -> tuple[Tensor, Tensor]:
    """x (R, T) standardised tokens; src (R, K, T), mask (R, K), seeds (R, K) -> the nearest
    (cosine) unmasked source token of each row and its seed (R, T), (R,). A row without
    source tokens keeps its token, at UNKNOWN_SEED."""
    if src.shape[1] == 0:
        return x, torch.full(x.shape[:1], UNKNOWN_SEED, dtype=torch.long, device=x.device)
    sim = F.cosine_similarity(x.float().unsqueeze(1), src, dim=-1).masked_fill(~mask, float("-inf"))  # (R, K)
    j = sim.argmax(1)
    r = torch.arange(x.shape[0], device=x.device)
    has = mask.any(1)
    return (torch.where(has[:, None], src[r, j].to(x.dtype), x),
            torch.where(has, seeds[r, j], torch.full_like(j, UNKNOWN_SEED)))


def _collect(model, kind: Tensor, ids: Tensor, vis: Tensor, seed: Tensor) -> list[Generated]:
    """Per row: the text ids and the visual tokens (and their seeds) grouped by image."""
    tok = model.text_tokenizer
    res = []
    for b in range(kind.shape[0]):
        k, i = kind[b].tolist(), ids[b].tolist()
        out_ids, spans, current, pieces, words = [], [], [], [], []     # spans: per image, its steps
        for t, (kt, it) in enumerate(zip(k, i)):
            if kt == 2:
                current.append(t)
            elif kt == 1:
                out_ids.append(it)
                if it == model.img_end_id:
                    spans.append(current)
                    current = []
                    pieces.append(IMAGE_TOKEN)
                elif it == model.img_start_id:
                    if words:
                        pieces.append(words)
                    words = []
                elif it != model.eos_id:
                    words.append(it)
        if current:                                   # an image cut off by the step limit
            spans.append(current)
        if words:
            pieces.append(words)
        text = " ".join(p if isinstance(p, str) else tok.decode(p, skip_special_tokens=True) for p in pieces)
        images = [vis[b, torch.tensor(x, dtype=torch.long, device=vis.device)] for x in spans]
        seeds = [seed[b, torch.tensor(x, dtype=torch.long, device=seed.device)] for x in spans]
        res.append(Generated(text=text.strip(), ids=out_ids, images=images, seeds=seeds))
    return res


@torch.no_grad()
def decode_images(model, images: Sequence[Tensor], steps: Optional[int] = None,
                  generator: Optional[torch.Generator] = None) -> Tensor:
    """Produced token sets [(K_i, T)] -> images (N, 3, S, S) in [0, 1] by the stage-1 detokenizer."""
    if model.detokenizer is None:
        raise UserError("this Setokim has no detokenizer (its stage-1 checkpoint saved none)")
    if not images:
        raise UserError("no images to decode")
    tokens, mask = pack_token_sets([x.to(model.device) for x in images])
    return model.detokenizer.sample(tokens, mask, steps=steps, generator=generator)
