"""The parameter report of a Setokim (`setok train --dry-run`)."""
from __future__ import annotations

from .lora import is_adapter_param

__all__ = ["parameter_table"]


def parameter_table(model) -> list[tuple[str, int, int]]:
    """(part, parameters, trainable) per part, then ("all", ...), for `setok train --dry-run`."""
    rows = []
    head = f"visual_head ({model.config.visual_head})"
    lm_rows = [("lm", model.lm)]
    if model.has_lora:
        ps = [p for n, p in model.lm.named_parameters() if is_adapter_param(n)]
        base = [p for n, p in model.lm.named_parameters() if not is_adapter_param(n)]
        rows += [("lm (base)", sum(p.numel() for p in base), sum(p.numel() for p in base if p.requires_grad)),
                 ("lm (LoRA adapters)", sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad))]
        lm_rows = []
    for name, mod in [*lm_rows, ("projector", model.projector), (head, model.visual_head),
                      ("stop_head", model.stop_head), ("copy_head", model.copy_head), ("place_head", model.place_head),
                      ("setok", model.setok),
                      ("detokenizer", model.detokenizer), ("mask_decoder", model.mask_decoder)]:
        if mod is None:
            continue
        ps = list(mod.parameters())
        rows.append((name, sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad)))
    rows.append(("all", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    return rows
