"""A multi-turn conversation with Setokim (`setok chat`): the library side.

    chat = ChatSession(model, image="a.png", out_dir="out/")
    r = chat.reply("How many objects are there?")       # r.text == "3", r.images == []
    r = chat.reply("Generate an image: a red circle")   # r.images == [Path("out/chat_001.png")]

The history is the LLaVA conversation so far, with its images as token sets (the user's
image, and every image the model wrote, which later turns can refer to). Replies are
greedy by default (`Sampling`); images the model writes go through the stage-1 detokenizer
and are saved as PNGs (atomically). `attach(image)` puts another image into the next user turn.

A model whose answers look first (`config.look_answers`, models/setokim/look.py) answers a
question about an image with the tokens it looks at, then the answer ("<image>: blue"). Such a
reply's tokens (those of a reply whose text goes on after its images with ": ") are not
pictures: they stay in the history as they were written, and `chat_NNN_look.png` shows their
regions (mask decoder) tinted on the image they were read from (`Reply.looks`). While the
history holds an image, such a model places every token it writes at its place head's most
likely cell, as `setok ask` does (its looked tokens are trained at their places).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import UserError
from ..files import ensure_dir
from .setokim import Sampling, _decode, _kw, save_png

__all__ = ["ChatSession", "Reply", "is_look", "token_count"]


@dataclass
class Reply:
    text: str                                   # "<image>" where an image was written
    images: list = field(default_factory=list)  # paths of the PNGs written for this reply
    looks: list = field(default_factory=list)   # a looking answer: the PNG of the regions it looked at


class ChatSession:
    def __init__(self, model, image=None, opts: Optional[Sampling] = None, out_dir: str | Path = ".",
                 size: Optional[int] = None):
        self.model, self.opts, self.size = model, opts or Sampling(), size
        self.out_dir = Path(out_dir)
        self.turns: list[dict] = []
        self.images: list = []       # token sets (with seeds: `Setokim.readable`), one per <image> mark, in order
        self.pixels: list = []       # beside them, each image's pixels (H, W, 3) uint8 (None: a looked token)
        self.pending: list = []      # attached, not yet asked about
        self.pending_pixels: list = []
        self.written = 0
        if image is not None:
            self.attach(image)

    def attach(self, image) -> int:
        """Tokenize `image` (path / PIL / array) for the next user turn; -> its token count."""
        from ..images import as_image
        pixels = np.asarray(as_image(image))
        s = self.model.read_sets([pixels])[0]
        self.pending.append(s)
        self.pending_pixels.append(pixels)
        return token_count(s)

    def reset(self) -> None:
        self.turns, self.images, self.pixels, self.pending, self.pending_pixels = [], [], [], [], []

    @torch.no_grad()
    def reply(self, text: str) -> Reply:
        from ..models.setokim import prompt_batch
        if not isinstance(text, str) or not text.strip():
            raise UserError("empty message")
        user = "".join("<image>\n" for _ in self.pending) + text.replace("<image>", " ").strip()
        conv = self.turns + [{"from": "human", "value": user}]
        images, pixels = self.images + self.pending, self.pixels + self.pending_pixels
        g = torch.Generator().manual_seed(self.opts.seed + len(self.turns))
        kw = _kw(self.opts, g)
        looking = bool(self.model.config.look_answers)
        if looking and images:
            kw.update(place="draw", place_temperature=0.0)
        out = self.model.generate(*prompt_batch(self.model, [conv], [images]), **kw)[0]
        paths, looks, drawn = [], [], [None] * len(out.images)
        seen = [p for p in pixels if p is not None]
        if out.images and looking and is_look(out.text) and seen:
            looks = [self._look_picture(seen[-1], out.images)]
        elif out.images:
            ensure_dir(self.out_dir)
            drawn = _decode(self.model, out.images, self.opts, g, self.size)
            for im in drawn:
                paths.append(self._next_path(""))
                save_png(paths[-1], im)
        answer = out.text if out.text.strip() else "<image>" * len(out.images)
        self.turns = conv + [{"from": "gpt", "value": answer}]
        self.images = images + self.model.readable(out.images, out.seeds)
        self.pixels = pixels + list(drawn)
        self.pending, self.pending_pixels = [], []
        n_marks = sum(t["value"].count("<image>") for t in self.turns)
        if n_marks != len(self.images):        # an image cut off without its mark: keep the history consistent
            self.turns[-1]["value"] = answer.replace("<image>", " ")
            self.images, self.pixels = images, pixels
        return Reply(out.text, paths, looks)

    def _next_path(self, suffix: str) -> Path:
        self.written += 1
        return self.out_dir / f"chat_{self.written:03d}{suffix}.png"

    def _look_picture(self, pixels: np.ndarray, tokens: list) -> Path:
        """The regions of a looking reply's tokens [(K_i, T)] on the image they were read from -> its PNG."""
        from ..models.setokim.look import looked_masks, looked_picture
        ensure_dir(self.out_dir)
        path = self._next_path("_look")
        save_png(path, looked_picture(pixels, looked_masks(self.model, pixels, [t for im in tokens for t in im])))
        return path


def is_look(text: str) -> bool:
    """Whether a reply with images is a looking answer: its text goes on after its last image
    with the answer mark ("<image> <image>: 2"); a picture the model was asked for stands alone."""
    from ..data.shapes_text import ANSWER_MARK
    return "<image>" in text and ANSWER_MARK in text[text.rindex("<image>"):]


def token_count(entry) -> int:
    """The number of tokens of a history image (a token set, or a (tokens, seeds) pair)."""
    return int((entry[0] if isinstance(entry, tuple) else entry).shape[0])
