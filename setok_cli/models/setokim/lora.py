"""What stage III (LoRA through peft) adds to the LM: wrapping it, the names it adds, the base weights under it."""
from __future__ import annotations

from pathlib import Path

from ...errors import UserError

__all__ = ["is_adapter_param", "is_peft", "wrap_lora", "load_adapters", "_base_state_dict"]


def is_adapter_param(name: str) -> bool:
    """A parameter stage III adds to the LM: a LoRA factor or a peft `modules_to_save` copy."""
    return "lora_" in name or ".modules_to_save." in name


def _base_state_dict(lm) -> dict:
    """The base LM's state dict under its plain names: LoRA's `base_layer` and
    modules_to_save's `original_module` weights (both unchanged by stage III), without the
    adapters and the trained copies (those are in adapter/)."""
    out = {}
    for k, v in lm.state_dict().items():
        if is_adapter_param(k):
            continue
        out[k.replace(".base_layer.", ".").replace(".original_module.", ".")] = v
    return out


def is_peft(module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(module, PeftModel)


def wrap_lora(lm, spec, seed: int):
    """The LM wrapped in fresh LoRA adapters of `spec` (a LoraSpec; peft's get_peft_model,
    B = 0), initialised from `seed`; names that are not linear layers / modules of the LM are
    one UserError line."""
    import warnings

    import torch
    from peft import get_peft_model
    from torch import nn

    names = {n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in spec.target_modules if t not in names]
    if missing:
        raise UserError(f"lora.target_modules {missing} are not linear layers of the LM "
                        f"(it has {', '.join(sorted(names))})")
    leaves = {n.rsplit(".", 1)[-1] for n, _ in lm.named_modules()}
    missing = [t for t in spec.modules_to_save if t not in leaves]
    if missing:
        raise UserError(f"lora.modules_to_save {missing} are not modules of the LM "
                        f"(e.g. embed_tokens, lm_head)")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)     # peft's own call of a renamed transformers API
        torch.manual_seed(seed)
        return get_peft_model(lm, spec.peft_config())


def load_adapters(lm, folder: Path):
    """The LM with the LoRA adapters saved in `folder` (peft's format), for inference."""
    import warnings

    from peft import PeftModel

    from .loading import quiet
    if not (Path(folder) / "adapter_config.json").is_file():
        raise UserError(f"{Path(folder).parent}: its config has `lora` but there is no "
                        f"{Path(folder).name}/adapter_config.json")
    with quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return PeftModel.from_pretrained(lm, str(folder), is_trainable=False)
