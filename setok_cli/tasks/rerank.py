"""Generation by re-reading (`setok generate --rerank N`; not in the paper): draw N candidate
images for a prompt, let the same model read each one back (the decoded picture, tokenized as
any input image) and keep the candidate under which the prompt is the most likely caption.

A written image is drawn token by token with its places sampled, and how many objects it shows
and whether each came out right varies from draw to draw (README: "Generation by re-reading").
The model's own captions are its strongest skill (fact recall about 0.9), so it can tell which
of its drawings says what was asked, as DALL-E's samples were reranked by CLIP, here with no
second model: the score is the mean cross-entropy per word of the prompt as the answer to the
caption request, given the candidate (`caption_scores`).

Captions are reranked the other way round (`setok caption --rerank N`): N captions are written
(the first at the given settings, greedy by default, the others sampled), and the one kept is
the caption from which the model would write this very image best: the lowest training loss of
the image's own tokens as the answer to "Generate an image: {caption}" (`image_scores`). A
caption that leaves an object out, or names one that is not there, predicts the tokens (and
where the image ends) worse.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

__all__ = ["caption_scores", "image_scores", "best_of", "pick", "pick_captions"]


def _words(caption: str) -> str:
    """A written caption as text to read: an image mark it wrote is not a prompt image."""
    return " ".join(caption.replace("<image>", " ").split())


def _sample(read, question: str, answer: str) -> dict:
    """One input image as prompts read it ((tokens, seeds) or tokens) -> a training sample of
    one question and answer about it (`Setokim.collate`)."""
    tokens, seeds = read if isinstance(read, tuple) else (read, None)
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
            "images": [tokens], **({"seeds": [seeds]} if seeds is not None else {})}


@torch.no_grad()
def caption_scores(model, images: Sequence[np.ndarray], captions: Sequence[str]) -> torch.Tensor:
    """Images (H, W, 3) uint8 and one caption each -> (N,) the mean cross-entropy per target
    word of the caption as the model's answer to "Describe the image briefly." about the image
    (lower: the caption fits the image better)."""
    from ..models.setokim import TASK_PROMPTS
    read = model.read_sets(list(images))
    samples = [_sample(r, TASK_PROMPTS["caption"], _words(c)) for r, c in zip(read, captions)]
    kw = {k: v.to(model.device) for k, v in model.collate(samples).items()}
    rows = model(**kw).text_rows.float()                                     # (N, 2): summed CE, targets
    return rows[:, 0] / rows[:, 1].clamp(min=1)


def best_of(model, prompts: Sequence[str], draw: Callable[[list[int], int], list[np.ndarray]], n: int,
            stop: Optional[float] = None) -> tuple[list[np.ndarray], list[int]]:
    """Up to n candidates per prompt, drawn in turn: draw(idx, c) -> candidate c of the prompts
    idx (one image each). Each candidate is scored as it comes (`caption_scores`), and each
    prompt keeps its lowest-scoring one (the first among equals). With `stop`, a prompt whose
    best score is at most `stop` draws no more (the others go on as a smaller batch), so easy
    prompts cost one or two drawings. -> (the kept image per prompt, candidates drawn per prompt).
    With n = 1 the one candidate is kept unscored."""
    B = len(prompts)
    if n == 1:
        return draw(list(range(B)), 0), [1] * B
    best: list = [None] * B
    score = [float("inf")] * B
    drawn = [0] * B
    todo = list(range(B))
    for c in range(n):
        if not todo:
            break
        imgs = draw(todo, c)
        for i, img, s in zip(todo, imgs, caption_scores(model, imgs, [prompts[i] for i in todo]).tolist()):
            drawn[i] += 1
            s = s if s == s else float("inf")           # a NaN score never wins over a real one
            if best[i] is None or s < score[i]:
                best[i], score[i] = img, s
        if stop is not None:
            todo = [i for i in todo if not score[i] <= stop]
    return best, drawn


def pick(model, prompts: Sequence[str], candidates: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """candidates[c][i]: candidate c of prompt i -> per prompt the candidate whose caption score
    (`caption_scores`) is lowest (the first among equals): `best_of` over given candidates."""
    # one candidate at a time: the batch read back is the generation batch, whatever N is
    return best_of(model, prompts, lambda idx, c: [candidates[c][i] for i in idx], len(candidates))[0]


@torch.no_grad()
def image_scores(model, read: Sequence, captions: Sequence[str]) -> torch.Tensor:
    """Images as prompts read them (`Setokim.read_sets`) and one caption each -> (N,) the model's
    training loss (text, visual, stop and place terms, as stage II weighs them) of each image's
    own tokens as the answer to "Generate an image: {caption}", teacher-forced, one row at a time
    (the loss is a batch mean). Lower: the caption draws this image better."""
    from ..models.setokim import TASK_PROMPTS
    out = []
    for r, c in zip(read, captions):
        sample = _sample(r, TASK_PROMPTS["generate"].format(caption=_words(c)), "<image>")
        kw = {k: v.to(model.device) for k, v in model.collate([sample]).items()}
        out.append(model(**kw).loss.float())
    return torch.stack(out)


def pick_captions(model, read: Sequence, candidates: Sequence[Sequence[str]]) -> list[str]:
    """candidates[c][i]: caption c of image i -> per image the caption whose `image_scores` is
    lowest (the first among equals)."""
    scores = torch.stack([image_scores(model, read, list(cand)) for cand in candidates])     # (C, B)
    return [candidates[c][i] for i, c in enumerate(scores.argmin(0).tolist())]
