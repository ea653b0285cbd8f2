"""The stage model's image tokens: each image tokenized once by the frozen SeTok.

A training image's token set (and with a place head its seeds) is cached by its key (the
resolved path and size, `ConversationDataset`); beside it a light copy of its SeTok output
(`TokenizerOutput.light`: labels, seeds, token mask) is kept, which is what the looking rows
and the edit-diff rows need to find an object's token. So an image read by the region
targets up front, by a batch's token sets, by a look and by an edit diff is tokenized once,
not once per use (before: up to three times).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UserError

__all__ = ["ImageTokenCache"]


class ImageTokenCache:
    """Mixed into the stage model, which sets `setokim`, `cache_tokens` and the dicts `_cache`,
    `_seeds` and `_outs` (all by image key). `reuse_outputs = False` keeps no SeTok outputs: looks
    and diffs tokenize their images again, as before this cache (`benchmarks/stage_tokens.py`'s
    baseline)."""

    reuse_outputs: bool = True

    @staticmethod
    def _arrays(pixel_values: Tensor) -> list:
        return [(x.permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy() for x in pixel_values]

    def _tokenize(self, pixel_values: Tensor):
        """pixel_values (N, 3, S, S) in [0, 1] -> their SeTok output, by the inference pipelines'
        path (SeTok.tokenize: its own resize and padding, as `Setokim.image_token_sets`), so a
        user's image is tokenized exactly as the training images were."""
        if self.setokim.setok is None:
            raise UserError("this Setokim has no SeTok (its stage-1 parts were not saved with it)")
        return self.setokim.setok.tokenize(self._arrays(pixel_values))

    def _keep(self, out, keys: list[str]) -> None:
        """A SeTok output of the images cached under `keys` -> the token cache: their token sets,
        with a place head their seeds, and their light outputs (`_outputs`); a key of None skips its image."""
        place = self.setokim.place_head is not None
        got = self.setokim.token_sets_of(out, seeds=place)
        sets, seeds = got if place else (got, [None] * len(keys))
        for i, (k, t, sd) in enumerate(zip(keys, sets, seeds)):
            if k is None:
                continue
            self._cache[k] = t.detach()
            if sd is not None:
                self._seeds[k] = sd
            if self.reuse_outputs:
                self._outs[k] = out.light(i)

    @torch.no_grad()
    def _outputs(self, pixel_values: Tensor, keys: list[str]) -> list:
        """Each image's own SeTok output (a batch of one, `TokenizerOutput.light`): the one kept
        when its tokens were cached, so looks and diffs do not tokenize an image again; images
        not kept (no token cache) are tokenized here."""
        todo = [i for i, k in enumerate(keys) if k not in self._outs]
        got = {}
        if todo:
            out = self._tokenize(pixel_values[todo])
            got = {keys[i]: out.light(j) for j, i in enumerate(todo)}
            if self.cache_tokens and self.reuse_outputs:
                self._outs.update(got)
        return [got[k] if k in got else self._outs[k] for k in keys]

    def image_token_seeds(self, keys: list[str]) -> list[Tensor]:
        """The seeds (K_i,) of images already tokenized under `keys` (a place head's targets)."""
        return [self._seeds[k] for k in keys]

    def image_token_sets(self, pixel_values: Tensor, keys: list[str]) -> list[Tensor]:
        """pixel_values (N, 3, S, S) in [0, 1], keys: N cache keys -> N token sets (K_i, T) in
        generation order. With a frozen tokenizer each image is tokenized once."""
        place = self.setokim.place_head is not None
        if not self.cache_tokens:
            if not self.setokim.config.freeze_tokenizer:
                raise UserError("freeze_tokenizer: false is not supported by stage 2 yet (the tokens are "
                                "computed without gradients)")
            if not place:
                return self.setokim.token_sets_of(self._tokenize(pixel_values))
            sets, seeds = self.setokim.token_sets_of(self._tokenize(pixel_values), seeds=True)
            self._seeds = dict(zip(keys, seeds))          # nothing is cached: this batch's only
            return sets
        todo = [i for i, k in enumerate(keys) if k not in self._cache]
        if todo:
            self._keep(self._tokenize(pixel_values[todo]), [keys[i] for i in todo])
        return [self._cache[k] for k in keys]

    def outputs_of(self, batch: dict):
        """A batch -> `outputs(rows)`: the light SeTok outputs of those images of the batch (what
        `look_samples` and `diff_samples` read)."""
        return lambda rows: self._outputs(batch["pixel_values"][rows], [batch["image_keys"][r] for r in rows])
