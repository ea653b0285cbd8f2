"""Questions to a local LLaVA-1.5 model (`LlavaForConditionalGeneration` folder), with or
without a visual-token reducer (integrations/llava.py).

    answer = ask_llava("llava-1.5-7b-hf", "cat.jpg", "What is this?", reduce="setok")
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

from ..errors import UserError

__all__ = ["load_llava", "ask_llava", "llava_prompt", "is_llava_folder"]

PathLike = Union[str, os.PathLike]


def is_llava_folder(folder: PathLike) -> bool:
    """A folder whose config.json names a LLaVA model (else a Setokim run is assumed)."""
    cfg = Path(folder) / "config.json"
    try:
        return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") in ("llava", "llava_next")
    except (OSError, ValueError, AttributeError):
        return False


def _check_folder(folder: PathLike) -> Path:
    p = Path(os.path.expanduser(str(folder)))
    if not p.exists():
        raise UserError(f"{p}: no such model folder")
    if not p.is_dir():
        raise UserError(f"{p}: not a folder (give a local LLaVA model folder)")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise UserError(f"{p}: not a model folder (no config.json)")
    try:
        mt = json.loads(cfg.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"{cfg}: unreadable ({e})") from None
    if mt != "llava":
        raise UserError(f"{p}: not a LLaVA-1.5 model (model_type {mt!r}, need 'llava')")
    return p


def load_llava(folder: PathLike, dtype=None):
    """-> (model in eval mode, processor) of a local LlavaForConditionalGeneration folder;
    one UserError line when the folder is missing, not a LLaVA model or unreadable."""
    p = _check_folder(folder)
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from ..models.encoders import quiet_transformers

    try:
        with quiet_transformers():
            kw = {"dtype": dtype} if dtype is not None else {}
            model = LlavaForConditionalGeneration.from_pretrained(p, **kw).eval()
            processor = AutoProcessor.from_pretrained(p)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{p}: cannot load the LLaVA model ({str(e).splitlines()[0]})") from None
    return model, processor


def llava_prompt(processor, question: str) -> str:
    """The processor's chat template for one image and a question, else LLaVA-1.5's
    "USER: <image>\\n{question} ASSISTANT:"."""
    if getattr(processor, "chat_template", None):
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conv, add_generation_prompt=True)
    token = getattr(processor, "image_token", "<image>")
    return f"USER: {token}\n{question} ASSISTANT:"


def ask_llava(model_folder: PathLike, image_path: PathLike, question: str, reduce: Optional[str] = None,
              budget: Optional[int] = None, max_new_tokens: int = 64, model=None, processor=None) -> str:
    """One greedy answer of the LLaVA model in `model_folder` to a question about one image.

    reduce: a reducer of `integrations.reducers.METHODS` (None: all the tower's tokens); budget:
    its tokens per image (None: setok's / prumerge's natural count). `model`, `processor`:
    already loaded ones (then model_folder is only named in errors)."""
    import torch

    from ..images import load_image
    from ..integrations.llava import reduce_visual_tokens, restore_visual_tokens
    from ..integrations.reducers import check_method

    if reduce is not None:
        check_method(reduce, budget)
    elif budget is not None:
        raise UserError("--budget needs --reduce METHOD")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be a positive whole number, got {max_new_tokens!r}")
    if not str(question).strip():
        raise UserError("empty question")
    if model is None or processor is None:
        model, processor = load_llava(model_folder)
    image = load_image(image_path)
    inputs = processor(images=image, text=llava_prompt(processor, question), return_tensors="pt")
    if reduce is not None:
        reduce_visual_tokens(model, reduce, budget)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    finally:
        if reduce is not None:
            restore_visual_tokens(model)
    new = out[0, inputs["input_ids"].shape[1]:]
    return processor.decode(new, skip_special_tokens=True).strip()
