"""Generation by re-reading (`setok generate --rerank N`; not in the paper): draw N candidate
images for a prompt, let the same model read each one back (the decoded picture, tokenized as
any input image) and keep the candidate under which the prompt is the most likely caption.

A written image is drawn token by token with its places sampled, and how many objects it shows
and whether each came out right varies from draw to draw (README: "Generation by re-reading").
The model's own captions are its strongest skill (fact recall about 0.9), so it can tell which
of its drawings says what was asked, as DALL-E's samples were reranked by CLIP, here with no
second model: the score is the mean cross-entropy per word of the prompt as the answer to the
caption request, given the candidate (`caption_scores`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["caption_scores", "pick"]


@torch.no_grad()
def caption_scores(model, images: Sequence[np.ndarray], captions: Sequence[str]) -> torch.Tensor:
    """Images (H, W, 3) uint8 and one caption each -> (N,) the mean cross-entropy per target
    word of the caption as the model's answer to "Describe the image briefly." about the image
    (lower: the caption fits the image better)."""
    from ..models.setokim import TASK_PROMPTS
    read = model.read_sets(list(images))
    samples = []
    for r, c in zip(read, captions):
        tokens, seeds = r if isinstance(r, tuple) else (r, None)
        samples.append({"conversations": [{"from": "human", "value": TASK_PROMPTS["caption"]},
                                          {"from": "gpt", "value": c.replace("<image>", " ").strip()}],
                        "images": [tokens], **({"seeds": [seeds]} if seeds is not None else {})})
    kw = {k: v.to(model.device) for k, v in model.collate(samples).items()}
    rows = model(**kw).text_rows.float()                                     # (N, 2): summed CE, targets
    return rows[:, 0] / rows[:, 1].clamp(min=1)


def pick(model, prompts: Sequence[str], candidates: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """candidates[c][i]: candidate c of prompt i -> per prompt the candidate whose caption score
    (`caption_scores`) is lowest (the first among equals)."""
    # one candidate at a time: the batch read back is the generation batch, whatever N is
    scores = torch.stack([caption_scores(model, cand, list(prompts)) for cand in candidates])   # (C, B)
    best = scores.argmin(0).tolist()
    return [candidates[c][i] for i, c in enumerate(best)]
