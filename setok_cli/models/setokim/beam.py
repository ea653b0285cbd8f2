"""Text answers by beam search (`setok caption --num-beams N`; not in the paper).

Greedy decoding commits to each word as it comes; a caption that starts "Three objects:"
then has to list three. Beam search keeps the N most likely partial answers at each step
and returns the most likely whole one (length-normalised: `length_penalty`), so a count
can follow from the objects the model is surest of rather than lead them.

It runs transformers' own `generate` over the spliced prompt embeddings (the same
`splice` / `embed` as `generate.py`, positions from the left-padded attention mask,
which `splice` also uses), with `[Img]` and `[/Img]` suppressed: the answers are words
only. At one beam it writes exactly what `generate.generate(text_only=True)` writes at
temperature 0 (tested).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...errors import UserError

__all__ = ["beam_texts"]


@torch.no_grad()
def beam_texts(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
               image_tokens: Optional[Tensor] = None, image_token_mask: Optional[Tensor] = None,
               image_token_seeds: Optional[Tensor] = None, *, num_beams: int = 4, max_new_tokens: int = 48,
               length_penalty: float = 1.0, return_scores: bool = False):
    """input_ids, attention_mask (B, L0) left-padded prompts with image placeholders and
    their images (N, K, T), (N, K), seeds (N, K) or None (`prompt_batch` makes all five)
    -> B answers in words, each the most likely of `num_beams` beams (score: summed
    log-probability / length ** length_penalty, the length counting `</s>`), and with
    return_scores their scores (B,) too (at length_penalty 1: minus the model's mean text
    cross-entropy on the answer, as training computes it; tested)."""
    if num_beams < 1:
        raise UserError(f"num_beams must be >= 1, got {num_beams}")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    was_training = model.training
    model.eval()
    try:
        sp = model.splice(input_ids, None, attention_mask, image_token_mask, padding_side="left")
        emb = model.embed(sp, image_tokens, image_token_mask, image_token_seeds)        # (B, L, H)
        out = model.lm.generate(inputs_embeds=emb, attention_mask=sp.attention_mask, num_beams=num_beams,
                                do_sample=False, max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                                early_stopping=True, suppress_tokens=[model.img_start_id, model.img_end_id],
                                eos_token_id=model.eos_id, pad_token_id=model.pad_id,
                                output_scores=return_scores, output_logits=return_scores,
                                return_dict_in_generate=True)
    finally:
        model.train(was_training)
    tok = model.text_tokenizer
    texts = [tok.decode(row, skip_special_tokens=True).strip() for row in out.sequences.tolist()]   # (B, <= max_new)
    if not return_scores:
        return texts
    scores = out.sequences_scores if num_beams > 1 else _greedy_scores(out, model.eos_id)
    return texts, scores.float()


def _greedy_scores(out, eos: int) -> Tensor:
    """One beam (greedy): each row's mean log-probability of its ids up to and with `</s>`."""
    logp = torch.stack([s.float().log_softmax(-1) for s in out.logits], 1)    # (B, S, V), the raw logits
    ids = out.sequences[:, -logp.shape[1]:]
    ended = (ids == eos).long().cumsum(1)
    keep = (ended == 0) | ((ended == 1) & (ids == eos))                        # up to the first </s>
    lp = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1) * keep
    return lp.sum(1) / keep.sum(1).clamp(min=1)
