"""Stage II of the paper (§2.2, appendix D): Setokim learns to read and write SeTok tokens.

    batch (conversations + their images) -> frozen SeTok -> token sets (cached per image)
      -> Setokim: [Img] v_1 .. v_K [/Img] spliced into the Vicuna-v1 conversation
      -> L = CE(text, [Img]) + w_vis * L_visual (mse | diffusion | codebook, teacher forced) + w_stop * BCE(stop)

The data is a mixture (`data.mixture`: [{task, path, weight}]) of image -> caption
(text loss), caption -> image (visual loss) and source + instruction -> target (visual
loss), all SPEC files (see `setok_cli.data.conversations`). The tokenizer is frozen by
default, so each image's tokens are computed once and cached by (path, size); the cache
is rebuilt after a resume (it is a pure function of the frozen tokenizer).

A checkpoint's `setokim/` folder is a complete `Setokim.from_pretrained` folder (LM, text
tokenizer, projector and heads, and the stage-1 parts it decodes with), which every task
command reads; a run folder stands for its latest checkpoint.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..models.setokim import Setokim, SetokimConfig, parameter_table
from ..models.setokim.edit_diff import diff_samples
from ..models.setokim.look import look_samples
from ..models.setokim.heads import CodebookHead
from ..models.setokim.text import pack_token_sets
from .recipe import Recipe
from .token_cache import ImageTokenCache

__all__ = ["Stage2Model", "build_stage2", "build_stage2_model", "meta_stage2_model", "parameter_report"]


class Stage2Model(ImageTokenCache, nn.Module):
    """The trainer's stage model: batch -> {"loss", "text", "visual", "stop", ...}, and with
    `sources` (the mixture's set names) each set's text loss, "text/<task>:<file stem>" (NaN in
    a batch without its items: the trainer's window mean skips it)."""

    def __init__(self, setokim: Setokim, cache_tokens: bool = True, row_groups: int = 1, attend: float = 0.0,
                 attend_layer: int = -1, attend_heads: str = "max", edit_changed: float = 1.0,
                 shared_prefix: bool = True):
        super().__init__()
        self.setokim = setokim
        self.edit_changed = float(edit_changed)     # `loss.edit_changed` (changed_token_weights)
        if self.edit_changed != 1 and (setokim.config.visual_head != "mse" or setokim.copy_head is not None):
            raise UserError("loss.edit_changed weighs the MSE head's loss: it needs visual_head mse and no copy head")
        self.row_groups = int(row_groups)            # `train.length_groups` (Setokim.hidden_in_groups)
        self.shared_prefix = bool(shared_prefix)     # `train.shared_prefix` (the same; not under an AttentionTap)
        self.attend, self.attend_layer = float(attend), int(attend_layer)   # `loss.attend` (models/setokim/attend.py)
        self.attend_heads = attend_heads
        self._objects: dict[str, Tensor] = {}
        self.cache_tokens = cache_tokens and setokim.config.freeze_tokenizer
        self._cache: dict[str, Tensor] = {}
        self._seeds: dict[str, Tensor] = {}          # with a place head: each cached image's token seeds
        self._outs: dict[str, object] = {}           # each cached image's SeTok output, light (looks and diffs)
        self._regions: dict[str, Tensor] = {}
        self._diffs: dict[str, tuple] = {}           # edit_diff rows: (old, new) token indices
        self._looks: dict[str, Tensor] = {}          # looking rows: per image, each object's token
        self.sources: list[str] = []                 # `MixtureDataset.names`, set by the stage builders
        self.text_weights: list[float] = []          # `MixtureDataset.text_weights`: each set's text weight

    def image_tokens(self, pixel_values: Tensor, keys: list[str]) -> tuple[Tensor, Tensor]:
        """As image_token_sets, packed: tokens (N, K, T), token_mask (N, K)."""
        return pack_token_sets(self.image_token_sets(pixel_values, keys), int(self.setokim.config.token_dim))

    @torch.no_grad()
    def first_image_tokens(self, dataset, limit: int, distinct: bool = True, progress: bool = False,
                           batch_images: int = 64) -> tuple[Tensor, Tensor]:
        """The tokens (N, K, T) and mask (N, K) of the first `limit` images of the data
        (`distinct`: each image once), in data order (the same images on every process);
        cached as training's are."""
        pix, keys, seen = [], [], set()
        for i in range(len(dataset)):
            it = dataset[i]
            for p, k in zip(it["pixel_values"], it["image_keys"]):
                if not (distinct and k in seen) and len(pix) < limit:
                    seen.add(k)
                    pix.append(p)
                    keys.append(k)
            if len(pix) >= limit:
                break
        sets = []
        with _progress(progress, "image tokens", len(pix)) as advance:
            for a in range(0, len(pix), batch_images):
                sets += self.image_token_sets(torch.stack(pix[a:a + batch_images]), keys[a:a + batch_images])
                advance(len(pix[a:a + batch_images]))
        return pack_token_sets(sets, int(self.setokim.config.token_dim))

    @torch.no_grad()
    def fit_token_stats(self, dataset, limit: int = 256) -> int:
        """Standardise the tokens per channel with the statistics of the first `limit`
        images of the data, repeats included (as the shipped runs were fitted). Returns how many."""
        tokens, mask = self.first_image_tokens(dataset, limit, distinct=False)
        self.setokim.fit_token_stats(tokens, mask)
        return int(tokens.shape[0])

    @torch.no_grad()
    def fit_codebook(self, dataset, progress: bool = True) -> int:
        """A codebook head's codes: k-means of the standardised tokens of the first
        `codebook.fit_images` images of the data (after fit_token_stats). Returns how many
        images it saw; 0 for the other heads."""
        head = self.setokim.visual_head
        if not isinstance(head, CodebookHead):
            return 0
        tokens, mask = self.first_image_tokens(dataset, self.setokim.config.codebook.fit_images, progress=progress)
        head.fit(self.setokim.normalize(tokens[mask].float()))
        return int(tokens.shape[0])

    @torch.no_grad()
    def fit_region_targets(self, dataset, batch_images: int = 32, progress: bool = True) -> int:
        """The region target of every segment item the mixture holds, computed up front:
        each image decoded once for all of its referring expressions (`region_targets`
        would decode it once per expression), `batch_images` images per call. The same
        targets as computing them batch by batch. Returns how many were computed."""
        from ..data.conversations import image_key, read_mask
        from ..data.datasets import _read_rgb
        from ..models.setokim.regions import best_region_tokens, read_images
        sets = getattr(dataset, "sets", [dataset])
        jobs: dict[tuple[str, Optional[int]], list[tuple[str, str]]] = {}    # image -> [(key, mask path)]
        for j, ds in enumerate(sets):
            if getattr(ds, "task", None) != "segment":
                continue
            used = dataset.local[dataset.owner == j].unique().tolist() if hasattr(dataset, "owner") else range(len(ds))
            for i in used:
                image, mask, key = ds.segment_entry(i)
                if key not in self._regions:
                    jobs.setdefault((image, ds.image_size), []).append((key, mask))
        if not jobs:
            return 0
        images = list(jobs)
        with _progress(progress, "region targets", len(images)) as advance:
            for a in range(0, len(images), batch_images):
                chunk = images[a:a + batch_images]
                arrays = [_read_rgb(p, size) for p, size in chunk]
                seen = read_images(self.setokim, arrays)
                if self.cache_tokens and self.reuse_outputs:   # what training reads (the same key): tokenized once
                    keys = [image_key(p, size) for p, size in chunk]
                    self._keep(seen.out, [None if k in self._cache else k for k in keys])
                keys, masks, rows = [], [], []
                for r, (img, arr) in enumerate(zip(chunk, arrays)):
                    for key, mask in jobs[img]:
                        keys.append(key)
                        masks.append(read_mask(mask, arr.shape[:2]))
                        rows.append(r)
                toks, _ = best_region_tokens(self.setokim, seen, masks, rows)
                for key, t in zip(keys, toks):
                    self._regions[key] = t.detach().unsqueeze(0)
                advance(len(chunk))
        return sum(len(v) for v in jobs.values())

    @torch.no_grad()
    def region_targets(self, batch: dict) -> dict[int, Tensor]:
        """Segment items -> {item: target token set (1, T)}: the item's image's SeTok token
        whose decoded mask fits the referred mask best (`regions.best_region_tokens`),
        computed once per (mask, size) with the frozen tokenizer and mask decoder."""
        from ..models.setokim.regions import best_region_tokens, read_images
        segs = batch.get("segment") or []
        if not any(s is not None for s in segs):
            return {}
        first = [0] + torch.as_tensor(batch["image_counts"]).cumsum(0).tolist()[:-1]
        todo = [b for b, s in enumerate(segs) if s is not None and s["key"] not in self._regions]
        if todo:
            pix = batch["pixel_values"][[first[b] for b in todo]]
            seen = read_images(self.setokim, self._arrays(pix))
            toks, _ = best_region_tokens(self.setokim, seen, [segs[b]["mask"].cpu() for b in todo])
            for b, t in zip(todo, toks):
                self._regions[segs[b]["key"]] = t.detach().unsqueeze(0)
        return {b: self._regions[s["key"]] for b, s in enumerate(segs) if s is not None}

    @torch.no_grad()
    def attend_targets(self, batch: dict) -> list[tuple[int, int, Tensor]]:
        """Question items -> (row, answer turn, bool (K,) over the row's image tokens in
        generation order: those of the objects its question names), for `attend.attend_loss`.
        Each image's token objects are computed once (`attend.token_objects`)."""
        from PIL import Image

        from ..models.setokim.attend import token_objects
        first = [0] + torch.as_tensor(batch["image_counts"]).cumsum(0).tolist()[:-1]
        items = [(b, a) for b, a in enumerate(batch.get("attend") or []) if a is not None]
        todo = {batch["image_keys"][first[b]]: (first[b], a["instances"]) for b, a in items
                if batch["image_keys"][first[b]] not in self._objects}
        if todo:
            keys = list(todo)
            out = self.setokim.setok.tokenize(self._arrays(batch["pixel_values"][[todo[k][0] for k in keys]]))
            for i, k in enumerate(keys):
                with Image.open(todo[k][1]) as im:              # the grid covers the whole image (squash)
                    self._objects[k] = token_objects(out, i, np.asarray(im))
        targets = []
        for b, a in items:
            objs = self._objects[batch["image_keys"][first[b]]]
            for turn, ids in enumerate(a["turns"]):
                if ids:
                    targets.append((b, turn, torch.isin(objs, torch.tensor(ids))))
        return targets

    # ---- the step --------------------------------------------------------------------
    def samples(self, batch: dict) -> list[dict]:
        """A batch -> `Setokim.collate`'s samples: each row's conversation and the token sets it
        reads and writes (its images', a segment answer's region token, the tokens a diff or a look
        writes), with their seeds under a place head. Every image through the token cache."""
        m = self.setokim
        sets = self.image_token_sets(batch["pixel_values"], batch["image_keys"])
        regions = self.region_targets(batch)
        per_item = torch.as_tensor(batch["image_counts"]).cumsum(0).tolist()
        samples = [{"id": int(i), "conversations": c, "images": sets[a:b] + ([regions[j]] if j in regions else [])}
                   for j, (i, c, a, b) in enumerate(zip(batch["index"], batch["conversations"],
                                                        [0] + per_item[:-1], per_item))]
        if m.place_head is not None:   # a segment answer is one of its input image's tokens: that token's seed
            seeds = self.image_token_seeds(batch["image_keys"])
            for j, (s, a, b) in enumerate(zip(samples, [0] + per_item[:-1], per_item)):
                k = int(torch.cdist(regions[j].float(), sets[a].float()).argmin()) if j in regions else 0
                s["seeds"] = seeds[a:b] + ([seeds[a][k:k + 1]] if j in regions else [])
        outputs = self.outputs_of(batch)
        if any(batch.get("edit_diff") or []):        # the source, its old token, the target's new token
            diff_samples(m, batch, samples, self._diffs, outputs)
        if any(batch.get("look") or []):             # the source, then the tokens its answers look up
            look_samples(m, batch, samples, self._looks, outputs)
        return samples

    def forward(self, batch: dict) -> dict[str, Tensor]:
        m = self.setokim
        samples = self.samples(batch)
        kw = {k: v.to(m.device) for k, v in m.collate(samples).items()}
        if any(w != 1 for w in self.text_weights):   # a mixture row's `text_weight`
            kw["text_weight"] = torch.tensor(self.text_weights)[batch["source"].clamp(min=0)].to(m.device)
        if self.edit_changed != 1:
            std = lambda t: m.normalize(t.to(m.token_mean.device)).cpu()     # noqa: E731
            kw["visual_weight"] = pack_weights(changed_token_weights(samples, self.edit_changed, std))
        targets = self.attend_targets(batch) if self.attend > 0 else []
        if not targets:
            out = m(**kw, row_groups=self.row_groups, prefix=self.shared_prefix)
            attend = None
        else:
            from ..models.setokim.attend import AttentionTap, attend_loss
            tap = AttentionTap(m, self.attend_layer)
            with tap.on():
                out = m(**kw, row_groups=self.row_groups)
            sp = m.splice(kw["input_ids"], kw["labels"], kw["attention_mask"], kw["image_token_mask"])
            attend = attend_loss(tap.weights, sp, sp.attention_mask, self.row_groups, targets, self.attend_heads)
        loss = out.loss if attend is None else out.loss + self.attend * attend
        res = {"loss": loss, "text": out.text_loss.detach(), "visual": out.visual_loss.detach(),
               "stop": out.stop_loss.detach(),
               **({} if out.place_loss is None else {"place": out.place_loss.detach()}),
               "visual_tokens": torch.tensor(float(out.num_visual) / max(len(samples), 1))}
        if self.sources and out.text_rows is not None:
            src = batch["source"].to(out.text_rows.device)
            for j, name in enumerate(self.sources):
                got = out.text_rows[src == j].sum(0)                                 # (2,): summed loss, targets
                res[f"text/{name}"] = torch.where(got[1] > 0, got[0] / got[1].clamp(min=1), float("nan"))  # no sync
        if self.attend > 0:
            res["attend"] = attend.detach() if attend is not None else torch.tensor(float("nan"))
        return res

    def save_parts(self, folder: str | Path) -> None:
        """setokim/: the whole Setokim folder (what `setok caption/generate/edit --model` read)."""
        self.setokim.save_pretrained(Path(folder) / "setokim")


@contextmanager
def _progress(show: bool, what: str, total: int):
    """A transient rich bar on stderr (`show`: the main process); yields advance(n)."""
    if not show:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    with Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


def _setokim_config(recipe: Recipe) -> SetokimConfig:
    c = recipe.model.setokim
    if c is None:
        raise UserError("model.setokim is missing: stage2 needs the Setokim section (lm, stage1, visual_head)")
    return copy.deepcopy(c)


def build_stage2_model(recipe: Recipe) -> Stage2Model:
    """The stage-2 model of a recipe: the LM (from its folder, or from scratch with the
    tiny word-level tokenizer built from the data's text), the stage-1 parts, fresh heads."""
    for key in ("visual", "place", "stop"):
        if getattr(recipe.loss, key) is not None:
            raise UserError(f"loss.{key} weighs a stage-2 Setokim's term in stage III; in stage II set "
                            f"model.setokim.{key}_loss_weight")
    cfg = _setokim_config(recipe)
    if cfg.text_tokenizer is None and isinstance(cfg.lm, dict):
        # a from-scratch LM: a word-level tokenizer of the training data's text (the same on
        # every process: it depends on the data files only), saved with each checkpoint
        import tempfile

        from ..models.setokim.text import build_word_tokenizer
        tok = build_word_tokenizer([m["path"] for m in recipe.data.mixture] + list(recipe.data.vocab_files))
        with tempfile.TemporaryDirectory(prefix="setok-text-tokenizer-") as folder:
            tok.save_pretrained(folder)
            cfg.text_tokenizer = folder
            setokim = Setokim.from_config(cfg)        # reads the tokenizer into memory
    else:
        setokim = Setokim.from_config(cfg)
    setokim.config.text_tokenizer = None        # the checkpoint holds it (tokenizer/)
    setokim.config.sized_images = _any_row(recipe, "sized")      # generation says its size first (sized.py)
    return Stage2Model(setokim, row_groups=_row_groups(recipe), shared_prefix=recipe.train.shared_prefix,
                       **_attend(recipe))


def _any_row(recipe: Recipe, option: str) -> bool:
    """Whether a mixture row sets `option` (look, sized): the model is marked for its pipelines."""
    return any(isinstance(m, dict) and m.get(option) for m in recipe.data.mixture or [])


def _attend(recipe: Recipe) -> dict:
    """The Stage2Model options of the recipe's `loss` section (attention, edit weights)."""
    w, layer, heads = recipe.loss.attend, recipe.loss.attend_layer, recipe.loss.attend_heads
    if not isinstance(w, (int, float)) or w < 0 or not isinstance(layer, int) or heads not in ("max", "mean"):
        raise UserError(f"loss.attend must be a number >= 0, loss.attend_layer an integer and loss.attend_heads "
                        f"max or mean; got {w!r}, {layer!r}, {heads!r}")
    ec = recipe.loss.edit_changed
    if not isinstance(ec, (int, float)) or ec <= 0:
        raise UserError(f"loss.edit_changed must be a number > 0, got {ec!r}")
    return {"attend": float(w), "attend_layer": layer, "attend_heads": heads, "edit_changed": float(ec)}


def changed_token_weights(samples: list[dict], weight: float, standardize=None, min_cos: float = 0.9) -> list[Tensor]:
    """Per image of `samples` (collate's order: each sample's "images" in reading order), a
    weight per token (K_i,): `weight` for a token of an image the row writes (an `<image>` in
    an assistant turn) that no token of the images the row read before it matches (cosine >=
    `min_cos` after `standardize`), 1 for every other token. Rows that read no image first
    (generation from text) keep 1: only an edit's changed, moved or added object is weighted."""
    from ..models.setokim.text import IMAGE_TOKEN
    out: list[Tensor] = []
    for s in samples:
        imgs = list(s.get("images") or [])
        written = [str(t.get("from", "")) in ("gpt", "assistant") for t in s["conversations"]
                   for _ in range(str(t.get("value", "")).count(IMAGE_TOKEN))]
        read: list[Tensor] = []
        for tokens, w in zip(imgs, written):
            x = tokens.float() if standardize is None else standardize(tokens.float())
            x = F.normalize(x, dim=-1)
            wt = torch.ones(tokens.shape[0])
            if w and read:
                best = (x @ torch.cat(read).T).max(-1).values
                wt[best < min_cos] = weight
            read.append(x)
            out.append(wt)
    return out


def pack_weights(weights: list[Tensor]) -> Tensor:
    """[(K_i,)] -> (N, K_max), zero-padded as `pack_token_sets` pads the tokens."""
    K = max([int(w.shape[0]) for w in weights] + [1])
    return torch.stack([F.pad(w, (0, K - w.shape[0])) for w in weights]) if weights else torch.zeros(0, K)


def _row_groups(recipe: Recipe) -> int:
    g = recipe.train.length_groups
    if not isinstance(g, int) or g < 1:
        raise UserError(f"train.length_groups must be an integer >= 1, got {g!r}")
    return g


def _mixture(recipe: Recipe):
    from ..data.conversations import recipe_mixture
    return recipe_mixture(recipe.data.mixture, recipe.data.image_size, recipe.seed)


def build_stage2(recipe: Recipe, accelerator=None):
    """The stage builder of the trainer: -> (model, dataset)."""
    dataset = _mixture(recipe)
    model = build_stage2_model(recipe)
    model.sources, model.text_weights = dataset.names, dataset.text_weights
    model.fit_token_stats(dataset)
    model.fit_codebook(dataset, progress=_main(accelerator) and recipe.train.progress)
    model.fit_region_targets(dataset, progress=_main(accelerator) and recipe.train.progress)
    return model, dataset


def _main(accelerator) -> bool:
    return accelerator is None or bool(accelerator.is_main_process)


def meta_stage2_model(recipe: Recipe) -> Stage2Model:
    """The recipe's Setokim on the meta device (`setok train --dry-run`): the LM from its
    config or a known architecture (Vicuna-7B), the SeTok from the stage-1 checkpoint's
    config when it is on disk, else from `model.tokenizer.config` (the paper recipe names
    the stage-1 tokenizer's shape there, so it can be sized before stage 1 has run)."""
    from ..models.setok import SeTokConfig
    from ..models.stage1 import stage1_folder
    from .stage1 import _encoder_architecture
    cfg = _setokim_config(recipe)
    tok_cfg = None
    if cfg.stage1 is not None:
        try:
            folder = stage1_folder(cfg.stage1)
        except UserError:
            folder = None
        if folder is not None:
            from ..models.hub import read_config
            from ..models.setok import SeTok
            tok_cfg = SeTokConfig.from_dict(read_config(SeTok.locate(folder)[0]))
    if tok_cfg is None and recipe.model.tokenizer.config:
        tok_cfg = SeTokConfig.from_dict(dict(recipe.model.tokenizer.config))
    if tok_cfg is None:
        return Stage2Model(Setokim.on_meta(cfg))
    from ..models.setok import SeTok
    enc = None if tok_cfg.encoder == "builtin" else _encoder_architecture(tok_cfg.encoder)
    with torch.device("meta"):
        setok = SeTok(tok_cfg, encoder=enc) if enc is not None else SeTok(tok_cfg)
    return Stage2Model(Setokim.on_meta(cfg, setok=setok))


def parameter_report(model) -> dict[str, dict[str, int]]:
    m = model.setokim if isinstance(model, Stage2Model) else model
    return {name: {"total": total, "trainable": train} for name, total, train in parameter_table(m)}
