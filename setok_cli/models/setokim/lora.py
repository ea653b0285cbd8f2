"""Names of what stage III (LoRA through peft) adds to the LM, and the base weights under it."""
from __future__ import annotations

__all__ = ["is_adapter_param", "is_peft", "_base_state_dict"]


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
