"""Reading Setokim's parts: the LM, its text tokenizer, the stage-1 checkpoint."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ...errors import UserError
from ..hub import CONFIG_NAME, resolve_checkpoint, resolve_folder
from .config import LM_PRESETS

__all__ = ["stage1_folder", "load_stage1", "lm_config", "load_lm", "load_text_tokenizer", "quiet", "first_line",
           "STAGE1_PARTS"]

STAGE1_PARTS = ("setok", "detokenizer", "mask_decoder")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def stage1_folder(path: Union[str, os.PathLike]) -> Path:
    """A stage-1 run folder (its latest checkpoint) or checkpoint folder, or a bare SeTok
    folder; one UserError line when it holds no SeTok."""
    folder = resolve_checkpoint(resolve_folder(path, "stage-1 checkpoint"))
    if (folder / "setok" / CONFIG_NAME).is_file() or (folder / CONFIG_NAME).is_file():
        return folder
    raise UserError(f"{folder}: not a stage-1 checkpoint (no setok/{CONFIG_NAME})")


def load_stage1(folder: Path) -> dict[str, Optional[nn.Module]]:
    """The SeTok and, where saved, the detokenizer and mask decoder of a stage-1 folder."""
    from ..detokenizer import Detokenizer
    from ..mask_decoder import MaskDecoder
    from ..setok import SeTok
    sub = folder / "setok"
    parts: dict[str, Optional[nn.Module]] = {"setok": SeTok.from_pretrained(sub if sub.is_dir() else folder)}
    d = folder / "detokenizer"
    parts["detokenizer"] = Detokenizer.from_pretrained(d) if (d / CONFIG_NAME).is_file() else None
    m = folder / "mask_decoder"
    parts["mask_decoder"] = MaskDecoder.from_pretrained(m) if (m / CONFIG_NAME).is_file() else None
    return parts


def lm_config(spec: Union[str, dict], text_vocab: Optional[int], meta: bool):
    """The LM's transformers config: inline dict (LlamaConfig), a folder's config.json,
    or (meta only) a known architecture named by the id's last part."""
    from transformers import AutoConfig, LlamaConfig
    if isinstance(spec, dict):
        if not spec:      # LlamaConfig's defaults are a 7B model: never built by omission
            raise UserError("lm: give a model folder / id, or a LlamaConfig dict with its sizes")
        d = dict(spec)
        if text_vocab is not None:
            if d.get("vocab_size", text_vocab) != text_vocab:
                raise UserError(f"lm.vocab_size {d['vocab_size']} differs from the text tokenizer's {text_vocab}")
            d["vocab_size"] = text_vocab
        try:
            return LlamaConfig(**d)
        except (TypeError, ValueError) as e:
            raise UserError(f"lm: invalid LlamaConfig ({first_line(e)})") from None
    try:
        folder = resolve_folder(spec, "language model")
    except UserError:
        key = next((k for k in LM_PRESETS if Path(spec).name.lower().startswith(k)), None)
        if not meta or key is None:
            raise
        return LlamaConfig(**LM_PRESETS[key])
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise UserError(f"{folder}: not a transformers model folder ({first_line(e)})") from None


@contextlib.contextmanager
def quiet():
    """No transformers progress bars while a part is written or read (the CLI prints its own)."""
    from transformers.utils import logging as tlog
    was = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tlog.enable_progress_bar()


def load_lm(spec: Union[str, dict], dtype: Optional[str], text_vocab: Optional[int], seed: int):
    from transformers import AutoModelForCausalLM
    kw = {"dtype": _DTYPES[dtype]} if dtype else {}
    if isinstance(spec, dict):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            lm = AutoModelForCausalLM.from_config(lm_config(spec, text_vocab, False), **kw)
        return lm
    folder = resolve_folder(spec, "language model")
    try:
        with quiet():
            return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **kw)
    except Exception as e:
        raise UserError(f"{folder}: cannot load the language model ({first_line(e)})") from None


def load_text_tokenizer(path: Union[str, os.PathLike]):
    from transformers import AutoTokenizer
    folder = resolve_folder(path, "text tokenizer")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise UserError(f"{folder}: cannot load the text tokenizer ({first_line(e)})") from None
