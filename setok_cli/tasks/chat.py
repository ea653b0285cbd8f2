"""A multi-turn conversation with Setokim (`setok chat`): the library side.

    chat = ChatSession(model, image="a.png", out_dir="out/")
    r = chat.reply("How many objects are there?")       # r.text == "3", r.images == []
    r = chat.reply("Generate an image: a red circle")   # r.images == [Path("out/chat_001.png")]

The history is the LLaVA conversation so far, with its images as token sets (the user's
image, and every image the model wrote, which later turns can refer to). Replies are
greedy by default (`Sampling`); images the model writes go through the stage-1 detokenizer
and are saved as PNGs (atomically). `attach(image)` puts another image into the next user turn.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..errors import UserError
from ..files import ensure_dir
from .setokim import Sampling, _decode, _kw, save_png

__all__ = ["ChatSession", "Reply", "token_count"]


@dataclass
class Reply:
    text: str                                   # "<image>" where an image was written
    images: list = field(default_factory=list)  # paths of the PNGs written for this reply


class ChatSession:
    def __init__(self, model, image=None, opts: Optional[Sampling] = None, out_dir: str | Path = ".",
                 size: Optional[int] = None):
        self.model, self.opts, self.size = model, opts or Sampling(), size
        self.out_dir = Path(out_dir)
        self.turns: list[dict] = []
        self.images: list = []       # token sets (with seeds: `Setokim.readable`), one per <image> mark, in order
        self.pending: list = []      # attached, not yet asked about
        self.written = 0
        if image is not None:
            self.attach(image)

    def attach(self, image) -> int:
        """Tokenize `image` (path / PIL / array) for the next user turn; -> its token count."""
        s = self.model.read_sets([image])[0]
        self.pending.append(s)
        return token_count(s)

    def reset(self) -> None:
        self.turns, self.images, self.pending = [], [], []

    @torch.no_grad()
    def reply(self, text: str) -> Reply:
        from ..models.setokim import prompt_batch
        if not isinstance(text, str) or not text.strip():
            raise UserError("empty message")
        user = "".join("<image>\n" for _ in self.pending) + text.replace("<image>", " ").strip()
        conv = self.turns + [{"from": "human", "value": user}]
        images = self.images + self.pending
        g = torch.Generator().manual_seed(self.opts.seed + len(self.turns))
        out = self.model.generate(*prompt_batch(self.model, [conv], [images]), **_kw(self.opts, g))[0]
        paths = []
        if out.images:
            ensure_dir(self.out_dir)
            for im in _decode(self.model, out.images, self.opts, g, self.size):
                self.written += 1
                p = self.out_dir / f"chat_{self.written:03d}.png"
                save_png(p, im)
                paths.append(p)
        answer = out.text if out.text.strip() else "<image>" * len(out.images)
        self.turns = conv + [{"from": "gpt", "value": answer}]
        self.images = images + self.model.readable(out.images, out.seeds)
        self.pending = []
        n_marks = sum(t["value"].count("<image>") for t in self.turns)
        if n_marks != len(self.images):        # an image cut off without its mark: keep the history consistent
            self.turns[-1]["value"] = answer.replace("<image>", " ")
            self.images = images
        return Reply(out.text, paths)


def token_count(entry) -> int:
    """The number of tokens of a history image (a token set, or a (tokens, seeds) pair)."""
    return int((entry[0] if isinstance(entry, tuple) else entry).shape[0])
