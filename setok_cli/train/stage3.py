"""Stage III of the paper (§2.2, appendix D, Table 7): instruction tuning with LoRA.

    stage-2 Setokim (`model.setokim_from`: run folder / checkpoint / Setokim folder)
      -> LoRA adapters on the LM (`model.lora`, peft; base weights frozen by the recipe's
         `train.trainable` globs, which also keep the projector and heads training)
      -> the same conversation loss as stage II over the instruction mixture: VQA (single- and
         multi-turn: `instruct`, `chat`), referring segmentation (`segment`: one answer token,
         see models/setokim/regions.py), generation and editing requests, captions.

The stage model is stage II's (`Stage2Model`): the batch, the token cache, the losses and the
checkpoint layout (`setokim/`, a complete Setokim folder whose `adapter/` holds the LoRA
weights and `lm/` the base LM) are the same. `setok export RUN --out DIR` merges the
adapters into a plain folder.
"""
from __future__ import annotations

import copy
import math

import torch

from ..errors import UserError
from ..models.setokim import Setokim
from .recipe import Recipe
from .stage2 import parameter_report  # noqa: F401  (the report of META)
from .stage2 import Stage2Model, _any_row, _attend, _main, _mixture, _row_groups, meta_stage2_model
from .text_first import apply_text_first

__all__ = ["build_stage3", "build_stage3_model", "meta_stage3_model"]


def _source(recipe: Recipe) -> str:
    src = recipe.model.setokim_from
    if not src:
        raise UserError("model.setokim_from is missing: stage3 tunes a stage-2 Setokim (its run folder or checkpoint)")
    return src


def _check_tunable(setokim: Setokim, recipe: Recipe) -> None:
    if recipe.model.lora is not None and setokim.has_lora:
        raise UserError(f"{recipe.model.setokim_from}: already has LoRA adapters; export (merge) it first "
                        f"with `setok export`, or drop model.lora to tune these adapters further")


def _tune(setokim: Setokim, recipe: Recipe) -> Setokim:
    _check_tunable(setokim, recipe)
    if recipe.model.lora is not None:
        setokim.add_lora(copy.deepcopy(recipe.model.lora))
    return setokim


def _loss_weights(setokim: Setokim, recipe: Recipe) -> Setokim:
    """`loss.visual` / `loss.place` / `loss.stop` (when set) replace the stage-2 Setokim's own
    weights of those terms for this stage; the text loss weighs 1."""
    for key, field in (("visual", "visual_loss_weight"), ("place", "place_loss_weight"), ("stop", "stop_loss_weight")):
        w = getattr(recipe.loss, key)
        if w is None:
            continue
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise UserError(f"loss.{key} must be a number >= 0 (or null: stage II's {field}), got {w!r}")
        setattr(setokim.config, field, float(w))
    return setokim


def build_stage3_model(recipe: Recipe, progress: bool = False, main: bool = True) -> Stage2Model:
    """The stage-2 Setokim of `model.setokim_from` with fresh LoRA adapters (its token
    statistics, projector and heads carried over; `model.setokim`, if any, only sizes
    `--dry-run`), its loss weights as the recipe's `loss` section sets them; with
    `model.text_first`, its LM first trained on those text rows (train/text_first.py)."""
    setokim = _loss_weights(Setokim.from_pretrained(_source(recipe)), recipe)
    if recipe.model.system_prompt is not None:      # the conversation format this stage (and the run's pipelines) use
        setokim.config.system_prompt = recipe.model.system_prompt
    _check_tunable(setokim, recipe)                 # before the text phase's minutes
    apply_text_first(setokim, recipe, progress=progress and main, write=main)
    setokim.config.look_answers = setokim.config.look_answers or _any_row(recipe, "look")    # `setok ask` looks
    setokim.config.sized_images = setokim.config.sized_images or _any_row(recipe, "sized")   # size said first
    return Stage2Model(_tune(setokim, recipe).train(), row_groups=_row_groups(recipe),
                       shared_prefix=recipe.train.shared_prefix, **_attend(recipe))


def build_stage3(recipe: Recipe, accelerator=None):
    """The stage builder of the trainer: -> (model, dataset)."""
    dataset = _mixture(recipe)
    model = build_stage3_model(recipe, progress=recipe.train.progress, main=_main(accelerator))
    model.sources, model.text_weights = dataset.names, dataset.text_weights
    model.fit_region_targets(dataset, progress=_main(accelerator) and recipe.train.progress)
    return model, dataset


def meta_stage3_model(recipe: Recipe) -> Stage2Model:
    """Stage III on the meta device (`setok train --dry-run`), LoRA applied: the
    architecture of `model.setokim_from` when it is on disk, else the recipe's
    `model.setokim` (a stage-3 recipe may carry the stage-2 Setokim's config for sizing
    only, so the paper recipe can be sized before stage 2 has run)."""
    from ..models.hub import config_from_dict, read_config
    from ..models.setokim import SetokimConfig
    src = _source(recipe)
    r = copy.deepcopy(recipe)
    try:
        folder, _ = Setokim.locate(src)
    except UserError:
        if recipe.model.setokim is None:
            raise UserError(f"{src}: no stage-2 Setokim there yet (train stage 2 first, or give model.setokim "
                            f"to size stage 3 without it)") from None
    else:
        r.model.setokim = config_from_dict(SetokimConfig, read_config(folder), where=str(folder))
    model = meta_stage2_model(r)
    with torch.device("meta"):
        _tune(model.setokim, recipe)
    return model
