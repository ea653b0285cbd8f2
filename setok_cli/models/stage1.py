"""A stage-1 checkpoint as its parts: what stage 2, the pipelines and `setok eval reconstruct` read.

    folder = stage1_folder("runs/tiny-stage1")     # a run folder (latest checkpoint), a checkpoint, or a SeTok folder
    parts = load_stage1(folder)                     # {"setok", "detokenizer", "mask_decoder", "alignment"} (None: not saved)
    recipe = stage1_recipe(folder)                  # the checkpoint's resolved recipe.yaml ({} when absent)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

from torch import nn

from ..errors import UserError
from .hub import CONFIG_NAME, resolve_checkpoint, resolve_folder

__all__ = ["STAGE1_PARTS", "stage1_folder", "load_stage1", "stage1_recipe"]

STAGE1_PARTS = ("setok", "detokenizer", "mask_decoder", "alignment")


def stage1_folder(path: Union[str, os.PathLike]) -> Path:
    """A stage-1 run folder (its latest checkpoint) or checkpoint folder, or a bare SeTok
    folder; one UserError line when it holds no SeTok."""
    folder = resolve_checkpoint(resolve_folder(path, "stage-1 checkpoint"))
    if (folder / "setok" / CONFIG_NAME).is_file() or (folder / CONFIG_NAME).is_file():
        return folder
    raise UserError(f"{folder}: not a stage-1 checkpoint (no setok/{CONFIG_NAME}); give a run folder or one of "
                    f"its checkpoints/step_* folders")


def load_stage1(folder: Path, parts: Sequence[str] = STAGE1_PARTS) -> dict[str, Optional[nn.Module]]:
    """The SeTok and, where the checkpoint saved them, the other `parts` (None otherwise),
    each in eval mode."""
    from .alignment import ConceptAlignment
    from .detokenizer import Detokenizer
    from .mask_decoder import MaskDecoder
    from .setok import SeTok
    classes = {"setok": SeTok, "detokenizer": Detokenizer, "mask_decoder": MaskDecoder, "alignment": ConceptAlignment}
    out: dict[str, Optional[nn.Module]] = {}
    for name in parts:
        sub = folder / name
        if name == "setok" and not sub.is_dir():
            sub = folder                                  # a bare SeTok folder
        out[name] = classes[name].from_pretrained(sub).eval() if (sub / CONFIG_NAME).is_file() else None
    if out.get("setok", True) is None:
        raise UserError(f"{folder}: no SeTok saved (setok/{CONFIG_NAME})")
    return out


def stage1_recipe(folder: Path) -> dict:
    """The checkpoint's recipe.yaml as a dict ({} when there is none)."""
    f = folder / "recipe.yaml"
    if not f.is_file():
        return {}
    import yaml
    try:
        d = yaml.safe_load(f.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{f}: unreadable ({e})") from None
    return d if isinstance(d, dict) else {}
