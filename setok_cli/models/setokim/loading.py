"""Reading Setokim's parts: the LM, its text tokenizer, the stage-1 checkpoint."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ...errors import UserError
from ..encoders import quiet_transformers as quiet  # noqa: F401 (re-exported)
from ..hub import resolve_folder
from ..stage1 import load_stage1 as _load_stage1
from ..stage1 import stage1_folder  # noqa: F401 (re-exported)
from .config import LM_PRESETS

__all__ = ["stage1_folder", "load_stage1", "lm_config", "load_lm", "load_text_tokenizer", "quiet", "first_line",
           "STAGE1_PARTS", "use_detokenizer"]

STAGE1_PARTS = ("setok", "detokenizer", "mask_decoder")   # what Setokim reads and writes with
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def load_stage1(folder: Path) -> dict[str, Optional[nn.Module]]:
    """The SeTok and, where saved, the detokenizer and mask decoder of a stage-1 folder."""
    return _load_stage1(folder, STAGE1_PARTS)


def use_detokenizer(model: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Decode `model`'s images with the detokenizer of another stage-1 run / checkpoint, one
    trained over the same tokenizer (e.g. `recipes/tiny/detokenizer.yaml`'s run). Its SeTok must
    equal the model's tensor for tensor, or the detokenizer would read tokens it was never shown:
    otherwise one UserError line, and the model is left as it was. -> the checkpoint folder."""
    from ..stage1 import load_stage1 as _load
    folder = stage1_folder(path)
    parts = _load(folder, ("setok", "detokenizer"))
    if parts["detokenizer"] is None:
        raise UserError(f"{folder}: saved no detokenizer/")
    if model.setok is None or model.setok.config.to_dict() != parts["setok"].config.to_dict() \
            or not _same_weights(model.setok, parts["setok"]):
        raise UserError(f"{folder}: its tokenizer is not this model's, so its detokenizer would decode other tokens "
                        f"(train it over the model's stage-1 run: recipes/tiny/detokenizer.yaml)")
    ref = next(model.parameters())
    model.detokenizer = parts["detokenizer"].to(ref.device).requires_grad_(False).eval()
    return folder


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k].cpu(), sb[k].cpu())
                                          for k in sa)


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
