"""Atomic checkpoints that keep the last M.

Layout under a run's output folder:

    checkpoints/step_00000500/        a complete checkpoint (only ever appears whole)
        model.safetensors, optimizer.bin, random_states_<rank>.pkl, custom_checkpoint_<i>.pkl
                                      accelerate's `save_state` (model, optimizer, every
                                      process's RNG, the LR scheduler, the data sampler)
        trainer_state.json            step, epoch, data position; written last
        setok/ ...                    the stage's parts as `from_pretrained` folders
    checkpoints/.tmp_step_00000500/   a write in progress (or one that crashed)

A checkpoint is written into `.tmp_step_*` and renamed into place with one `os.rename`,
so a crash mid-write leaves the previous checkpoints untouched and loadable; stale
temporary folders are ignored by `latest_checkpoint` and removed by the next save.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from ..errors import UserError

__all__ = ["checkpoint_path", "list_checkpoints", "latest_checkpoint", "save_checkpoint", "load_checkpoint",
           "prune_checkpoints", "STATE_FILE"]

STATE_FILE = "trainer_state.json"


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and (p / STATE_FILE).is_file():
            try:
                out.append((int(p.name[len("step_"):]), p))
            except ValueError:
                continue
    return sorted(out)


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    cks = list_checkpoints(output_dir)
    return cks[-1][1] if cks else None


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> list[Path]:
    cks = list_checkpoints(output_dir)
    removed = []
    for _, p in cks[: max(0, len(cks) - keep_last)]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict, keep_last: int,
                    write_parts: Optional[Callable[[Path], None]] = None) -> Path:
    """Write a checkpoint atomically from every process (collective: all must call it).

    accelerate's `save_state` writes the model, optimizer, RNG and registered objects;
    `write_parts(folder)` (main process) adds the `from_pretrained` folders; then
    `trainer_state.json`; then the rename. Returns the final path.
    """
    final = checkpoint_path(output_dir, step)
    tmp = final.parent / f".tmp_{final.name}"
    if accelerator.is_main_process:
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if write_parts is not None:
            write_parts(tmp)
        with open(tmp / STATE_FILE, "w") as f:
            json.dump({"step": step, **state}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():      # re-saving a step (e.g. the last one): the old copy goes first
            old = final.parent / f".tmp_old_{final.name}"
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
        prune_checkpoints(output_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | Path) -> dict:
    """Restore model, optimizer, RNG and registered objects; returns trainer_state.json."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"checkpoint {path} does not match this recipe's model: {str(e).splitlines()[0]}") from None
    return json.loads((path / STATE_FILE).read_text())
