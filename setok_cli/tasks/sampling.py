"""The pipelines' sampling settings (`Sampling`), shared by every Setokim task and command."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import UserError

__all__ = ["Sampling", "CAPTION_BEAMS"]

CAPTION_BEAMS = 4     # chosen on val (README: "Captions by beam search"): +1.2 points of recall at 4, 8 adds none


@dataclass
class Sampling:
    """Sampling settings (temperature 0: greedy text; visual_temperature 0: the diffusion
    head's deterministic sample, the codebook head's most likely code; both unused by parts
    that do not sample)."""
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    visual_steps: Optional[int] = None          # the diffusion head's DDIM steps (None: its config)
    visual_temperature: Optional[float] = None  # diffusion noise scale / codebook temperature (None: config)
    decode_steps: Optional[int] = None          # the detokenizer's sampling steps (None: its config)
    copy: str = "hard"                          # a copy head's pointer: "hard" (argmax source) or "soft"
    seed: int = 0
    bank: Optional[torch.Tensor] = None         # real tokens (M, T) to snap written tokens to (models/setokim/bank.py)
    source_margin: float = 2.5                  # with a bank: the input image's token wins unless the bank's is
                                                # this many times closer
    guidance: float = 1.0                       # classifier-free guidance of generation (1: none)
    bank_layouts: Optional[torch.Tensor] = None  # the bank tokens' regions (M, P): keep written objects apart
    max_overlap: float = 0.25                   # with bank_layouts: a token's largest share on objects placed before
    snap_metric: str = "cos"                    # with a bank: "cos" (nearest by direction) or "l2"
    place_temperature: float = 1.0              # a place head's temperature over seed cells (0: most likely)
    place: str = "auto"                         # which rows draw a place: auto (no input image), draw, off
    keep_pixels: Optional[int] = None           # an edit: paste the source's pixels back over the objects it
                                                # copied token for token, grown by this many layout cells
                                                # (with a bank that stores layouts; None: off)
    diff: bool = False                          # an edit: as a token diff (models/setokim/edit_diff.py)
    lookup: str = "diff"                        # an edit diff's old token: "diff" (the answer writes it) or
                                                # "segment" (the model segments the instruction's object first)
    rerank: int = 1                             # generation: draw this many candidates per image, keep the one
                                                # the model reads back as the prompt best (tasks/rerank.py);
                                                # captions: this many, the one the image is drawn from best
    rerank_temperature: float = 0.7             # captions: the temperature of candidates 2..N
    rerank_stop: Optional[float] = None         # generation: stop drawing an image's candidates once one scores
                                                # at most this (tasks/rerank.best_of; None: all N)
    look_snap: bool = False                     # ask, a looking model: write the image's nearest tokens (snap_source)
    num_beams: Optional[int] = None             # captions: beam search over this many beams (models/setokim/beam.py;
                                                # 1: as sampled above; None: CAPTION_BEAMS when greedy, else 1)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 and self.top_p == 1

    @property
    def caption_beams(self) -> int:
        """The beams a caption is written with: num_beams, or CAPTION_BEAMS when decoding is greedy."""
        return self.num_beams if self.num_beams is not None else (CAPTION_BEAMS if self.greedy else 1)

    def __post_init__(self):
        if (self.temperature < 0 or not (0 < self.top_p <= 1) or self.max_new_tokens < 1 or self.rerank < 1
                or (self.num_beams is not None and self.num_beams < 1)):
            raise UserError("sampling: temperature >= 0, 0 < top_p <= 1, max_new_tokens, rerank and num_beams >= 1")
        if (self.num_beams or 1) > 1 and not self.greedy:
            raise UserError("beam search is deterministic: give --num-beams or --temperature / --top-p, not both")
        if self.rerank_stop is not None and not self.rerank_stop >= 0:
            raise UserError(f"rerank_stop must be >= 0 (a caption score), got {self.rerank_stop!r}")
        if self.lookup not in ("diff", "segment"):
            raise UserError(f"lookup must be 'diff' or 'segment', got {self.lookup!r}")
