"""Images whose size is said first (not in the paper; the mixture row option `sized: true` on
generate rows).

A written image ends where the stop head says so, after each token. Of 250 val prompts the
recipe's stop head ends the image at the caption's object count plus one (one token per
object and the background) in 157, and those images have the right number of objects 82% of
the time; at any other length almost never (README: "Generation by re-reading";
benchmarks/generation_lengths.py). A sized answer says the number of objects in words before
the image, a copy of the caption's word, which the LM writes best:

    Generate an image: A picture of two objects: a red circle and a blue star.
    -> two objects <image>                         (the image: its K tokens, as before)

and generation then writes that number plus one tokens (`SIZED_EXTRA`, the background) and
stops, whatever the stop head says. The training targets stay the target image's own tokens.
The rule is read from the two words before `[Img]` (a number word, then "object" / "objects"),
so answers that write digits before a token (an edit diff's place, "Add at 5 3 <image>") are
not sized; it applies only to a model a sized row trained (`config.sized_images`).

Measured (val, two seeds): every sized image has the said length, counts rise 5 to 12 points,
but recall falls 7 (the 82% was a selection: cutting the other drawings to that length does not
make them right), so the recipe does not size; `setok generate --rerank N` (tasks/rerank.py) is
what meets the counts.
"""
from __future__ import annotations

import json
from typing import Optional

import torch
from torch import Tensor

from ...data.shapes_world import NUMBER_WORDS
from ...errors import UserError
from .text import IMAGE_TOKEN

__all__ = ["SIZED_EXTRA", "sized_answer", "entry_objects", "size_words", "sized_length"]

SIZED_EXTRA = 1     # tokens beyond one per object: the background


def sized_answer(n: int) -> str:
    """The answer of a sized generate row: "two objects <image>"."""
    return f"{NUMBER_WORDS[n]} {'object' if n == 1 else 'objects'} {IMAGE_TOKEN}"


def entry_objects(entry: dict) -> int:
    """A generate entry of the world -> its number of objects (its scene's); one UserError line
    where the entry names no scene the count can be read from."""
    scene = entry.get("scene")
    try:
        n = len(json.loads(open(scene).read())["objects"])
    except (OSError, TypeError, ValueError, KeyError) as e:
        raise UserError(f"sized: {entry.get('image', '?')}: its scene ({scene!r}) gives no object count: {e}") from None
    if not 1 <= n < len(NUMBER_WORDS):
        raise UserError(f"sized: {entry.get('image', '?')}: {n} objects, more than the number words say")
    return n


def size_words(tokenizer, vocab_size: int) -> Optional[tuple[Tensor, Tensor]]:
    """-> (number (V,) long: the value of each id that is a number word, -1 elsewhere;
    noun (V,) bool: "object" / "objects"), or None where the tokenizer has neither."""
    number = torch.full((vocab_size,), -1, dtype=torch.long)
    noun = torch.zeros(vocab_size, dtype=torch.bool)
    for k, w in enumerate(NUMBER_WORDS):
        ids = tokenizer.encode(w, add_special_tokens=False)
        if len(ids) == 1 and ids[0] < vocab_size:
            number[ids[0]] = k
    for w in ("object", "objects"):
        ids = tokenizer.encode(w, add_special_tokens=False)
        if len(ids) == 1 and ids[0] < vocab_size:
            noun[ids[0]] = True
    return (number, noun) if (number >= 0).any() and noun.any() else None


def sized_length(words: Optional[tuple[Tensor, Tensor]], before: Tensor, last: Tensor) -> Tensor:
    """The two text ids before each row's `[Img]` (B,), (B,) -> its image's length (B,): the
    number said + SIZED_EXTRA where they read "<number word> object(s)", else -1 (the stop head
    decides)."""
    if words is None:
        return torch.full_like(last, -1)
    number, noun = (t.to(last.device) for t in words)
    n = number[before.clamp(min=0, max=number.shape[0] - 1)]
    ok = (before >= 0) & (last >= 0) & (n >= 1) & noun[last.clamp(min=0, max=noun.shape[0] - 1)]
    return torch.where(ok, n + SIZED_EXTRA, torch.full_like(n, -1))
