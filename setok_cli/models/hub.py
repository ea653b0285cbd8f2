"""One way to save and load every part: config.json + model.safetensors.

Every model of the package (SeTok, the detokenizer, the mask decoder, the alignment
heads, Setokim's parts) derives from `PretrainedModel`, built on huggingface_hub's
`PyTorchModelHubMixin` (which also gives `push_to_hub` and a model card):

    class MaskDecoder(PretrainedModel, model_type="setok-mask-decoder", config_class=MaskDecoderConfig):
        def __init__(self, config: MaskDecoderConfig): ...

    model.save_pretrained("out/mask_decoder")          # config.json, model.safetensors, README.md
    MaskDecoder.from_pretrained("out/mask_decoder")    # or a stage-1 checkpoint folder, or a cached hub id

What it adds to the mixin, for people who load checkpoints by hand:
- config.json holds `model_type` and `setok_version` next to the config dataclass's fields;
  loading a folder that holds another part says which part it holds and where the wanted
  one is (a training checkpoint keeps each part in its own subfolder);
- one strict `config_from_dict`: an unknown key, or a value the config rejects, is one
  `UserError` line naming the folder;
- the weights must match the model exactly (missing, unexpected and mis-shaped tensors
  are named), except tensors a part deliberately does not save (`_unsaved_prefixes`,
  e.g. a frozen encoder that config.json names);
- every file is written to a temporary folder beside the target and renamed into place,
  so a crash never leaves a half-written checkpoint;
- loading never downloads: a folder, or a hub id already in the local cache.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ..errors import UserError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
META_KEYS = ("model_type", "setok_version")

# model_type -> (what it is, its subfolder in a training checkpoint)
PARTS: dict[str, tuple[str, str]] = {}

__all__ = ["PretrainedModel", "config_from_dict", "config_to_dict", "resolve_folder", "resolve_checkpoint", "read_config", "PARTS",
           "CONFIG_NAME", "WEIGHTS_NAME"]


def config_from_dict(cls, d: dict, where: str = ""):
    """The config dataclass `cls` from a dict, strictly: unknown keys and invalid values
    are one UserError (meta keys such as model_type are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names - set(META_KEYS))
    prefix = f"{where}: " if where else ""
    if unknown:
        import difflib
        hints = []
        for k in unknown[:3]:
            close = difflib.get_close_matches(k, sorted(names), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise UserError(f"{prefix}unknown {cls.__name__} key(s) {', '.join(hints)}{more}")
    kwargs = {k: v for k, v in d.items() if k in names}
    for f in dataclasses.fields(cls):   # nested config dataclasses come as dicts
        if f.name in kwargs and isinstance(kwargs[f.name], dict):
            sub = _dataclass_type(cls, f)
            if sub is not None:
                kwargs[f.name] = config_from_dict(sub, kwargs[f.name], where)
    try:
        return cls(**kwargs)
    except UserError as e:
        raise UserError(f"{prefix}{e}") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{prefix}invalid {cls.__name__}: {e}") from None


def _dataclass_type(cls, f: dataclasses.Field):
    import typing
    try:
        hints = typing.get_type_hints(cls)
    except Exception:
        return None
    tp = hints.get(f.name)
    for cand in (tp, *getattr(tp, "__args__", ())):
        if isinstance(cand, type) and dataclasses.is_dataclass(cand):
            return cand
    return None


def config_to_dict(config) -> dict:
    """A config dataclass as JSON-ready data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def resolve_folder(path: Union[str, os.PathLike], what: str) -> Path:
    """A local folder, or a hub id already in the local Hugging Face cache (never downloads)."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        return p
    if p.exists():
        raise UserError(f"{p}: not a folder; a saved {what} is a folder with {CONFIG_NAME}")
    s = str(path)
    if s.count("/") == 1 and not s.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(s, local_files_only=True))
        except Exception:
            pass
    raise UserError(f"{what} folder {s!r} not found (nothing is downloaded: give a local folder "
                    f"or a model id in the local Hugging Face cache)")


def resolve_checkpoint(folder: Path) -> Path:
    """A run folder (`checkpoints/step_*` inside) stands for its latest checkpoint; any
    other folder for itself. A run folder without checkpoints is one UserError."""
    ck = folder / "checkpoints"
    if (folder / CONFIG_NAME).is_file() or not ck.is_dir():
        return folder
    steps = sorted(p for p in ck.iterdir() if p.is_dir() and re.fullmatch(r"step_\d+", p.name))
    if not steps:
        raise UserError(f"{folder}: a run folder without checkpoints yet ({ck} is empty)")
    return steps[-1]


def read_config(folder: Path) -> dict:
    cfile = folder / CONFIG_NAME
    try:
        with open(cfile) as fh:
            d = json.load(fh)
    except FileNotFoundError:
        raise UserError(f"{folder}: no {CONFIG_NAME}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfile}: unreadable ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{cfile}: not a JSON object")
    return d


class PretrainedModel(nn.Module, PyTorchModelHubMixin, library_name="setok", tags=["setok"],
                      repo_url="https://github.com/setok/setok"):
    """Base of every saved part. Subclasses: `class X(PretrainedModel, model_type=..., config_class=...)`
    with `__init__(self, config)`; they may override `state_to_save` (what goes into the
    safetensors file), `config_to_save` and `_build_for_load`."""

    model_type: ClassVar[str] = ""
    config_class: ClassVar[type] = type(None)
    part_name: ClassVar[str] = ""        # the part, for messages ("mask decoder")
    subfolder: ClassVar[str] = ""        # its folder inside a training checkpoint
    _unsaved_prefixes: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, model_type: str = "", config_class: Optional[type] = None, part_name: str = "",
                          subfolder: str = "", **kwargs):
        super().__init_subclass__(**kwargs)
        if model_type:
            cls.model_type = model_type
            cls.part_name = part_name or model_type
            cls.subfolder = subfolder
            PARTS[model_type] = (cls.part_name, subfolder)
        if config_class is not None:
            cls.config_class = config_class

    # ---- saving -------------------------------------------------------------------------
    def state_to_save(self) -> dict[str, torch.Tensor]:
        """The tensors written to model.safetensors (default: the state dict minus
        `_unsaved_prefixes`)."""
        sd = self.state_dict()
        if self._unsaved_prefixes:
            sd = {k: v for k, v in sd.items() if not k.startswith(self._unsaved_prefixes)}
        return sd

    def config_to_save(self) -> dict:
        from ..version import __version__
        return {"model_type": self.model_type, "setok_version": __version__, **config_to_dict(self.config)}

    def _save_pretrained(self, save_directory: Path) -> None:      # the mixin's hook: the weights
        from safetensors.torch import save_file
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_to_save().items()}
        save_file(state, str(Path(save_directory) / WEIGHTS_NAME), metadata={"format": "pt"})
        (Path(save_directory) / CONFIG_NAME).write_text(json.dumps(self.config_to_save(), indent=2) + "\n")

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs: Any) -> None:
        """config.json + model.safetensors (+ the mixin's model card), each file renamed
        into place from a temporary folder beside `save_directory`."""
        from ..files import ensure_dir, os_error_message
        dest = Path(save_directory)
        ensure_dir(dest.parent if str(dest.parent) else Path("."))
        try:
            tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".tmp-{dest.name}-"))
        except OSError as e:
            raise UserError(f"cannot write {os_error_message(e, dest)}") from None
        try:
            super().save_pretrained(tmp, **kwargs)
            ensure_dir(dest)
            for f in sorted(tmp.iterdir(), key=lambda f: f.name == CONFIG_NAME):   # config.json last
                os.replace(f, dest / f.name)
        except OSError as e:
            raise UserError(f"cannot write {os_error_message(e, dest)}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def locate(cls, path: Union[str, os.PathLike]) -> tuple[Path, dict]:
        """The folder holding this part (`path` itself, or its subfolder in a training
        checkpoint) and its config dict; a folder that holds another part is one line
        saying which part it holds and where this one is."""
        folder = resolve_checkpoint(resolve_folder(path, cls.part_name))
        if not (folder / CONFIG_NAME).is_file() and cls.subfolder and (folder / cls.subfolder / CONFIG_NAME).is_file():
            folder = folder / cls.subfolder
        if not (folder / CONFIG_NAME).is_file():
            raise UserError(f"{folder}: no {CONFIG_NAME}; not a saved {cls.part_name}")
        d = read_config(folder)
        mt = d.get("model_type", cls._legacy_model_type(folder))
        if mt != cls.model_type:
            held, sub = PARTS.get(mt, (f"a model of type {mt!r}", ""))
            msg = f"{folder} holds the {held}" if mt in PARTS else f"{folder} holds {held}"
            msg += f", not the {cls.part_name}"
            sibling = folder.parent / cls.subfolder if cls.subfolder else None
            if sibling is not None and (sibling / CONFIG_NAME).is_file():
                msg += f"; the {cls.part_name} of that checkpoint is {sibling}"
            elif cls.subfolder:
                msg += f" (a training checkpoint keeps it in its {cls.subfolder}/ folder)"
            raise UserError(msg)
        return folder, d

    @classmethod
    def _legacy_model_type(cls, folder: Path) -> str:
        """Folders written before config.json named its model_type: known by their name."""
        for mt, (_, sub) in PARTS.items():
            if sub and folder.name == sub:
                return mt
        return cls.model_type

    @classmethod
    def _build_for_load(cls, config, folder: Path):
        return cls(config)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], *,
                        map_location: str = "cpu", **overrides):
        """Load a saved part. `overrides` replace config fields (None values are ignored)."""
        from safetensors.torch import load_file
        folder, d = cls.locate(pretrained_model_name_or_path)
        d.update({k: v for k, v in overrides.items() if v is not None})
        config = config_from_dict(cls.config_class, d, where=str(folder))
        model = cls._build_for_load(config, folder)
        wfile = folder / WEIGHTS_NAME
        if not wfile.is_file():
            raise UserError(f"{folder}: no {WEIGHTS_NAME}")
        try:
            state = load_file(str(wfile), device=map_location)
        except Exception as e:
            raise UserError(f"{wfile}: unreadable ({e})") from None
        model.load_checked(state, str(folder))
        model.eval()
        return model

    def load_checked(self, state: dict[str, torch.Tensor], where: str) -> None:
        """load_state_dict, with every difference from `state_to_save()` named in one line."""
        own = self.state_to_save()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        bad = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or bad:
            def few(xs):
                return ", ".join(xs[:3]) + (f" and {len(xs) - 3} more" if len(xs) > 3 else "")
            parts = []
            if missing:
                parts.append(f"missing {few(missing)}")
            if unexpected:
                parts.append(f"unexpected {few(unexpected)}")
            if bad:
                parts.append("shape mismatch in " + few([f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                                                         for k in bad]))
            raise UserError(f"{where}: checkpoint does not match its config ({'; '.join(parts)})")
        self.load_state_dict(state, strict=False)
