"""SeTok as a drop-in visual-token reducer for LLaVA-1.5 (paper Table 9), and the reducers
users pick today, at the same token budget.

    model = LlavaForConditionalGeneration.from_pretrained(folder)
    reduce_visual_tokens(model, method="setok")             # each image: its own count
    reduce_visual_tokens(model, method="visionzip", budget=64)
    out = model.generate(**processor(images=img, text=prompt, return_tensors="pt"))

The patch replaces the model's image-feature step: the vision tower's selected layer
(`vision_feature_layer`, CLS cut by the "default" strategy), (B, N, D), goes through the
reducer, each image becomes (K_i, D) tokens, and the unchanged projector maps them to the
LLM width. The prompt's image placeholders (one `<image>` or the processor's run of N of
them) are re-spliced to K_i per image, so a batch of images with different counts works;
`generate` returns the caller's prompt followed by the new tokens, as it does unpatched.

The reducers themselves (setok, pool2d, random, tome, visionzip, prumerge: `METHODS`), their
budgets and shapes are integrations/reducers.py; their names stay importable from here.

Importance (visionzip, prumerge) is the CLS token's attention to each patch in the selected
layer, averaged over heads, recomputed from that layer's input and its q/k projections
(CLIP / SigLIP-style towers). A tower without a CLS attention (the builtin encoder) gets a
stated substitute: each patch's distance from the image's mean feature (`IMPORTANCE_SUBSTITUTE`).

LLaVA-NeXT: its anyres packing (tiles, unpadding and newline tokens) happens after the
projection, so this pre-projector hook does not fit it; `reduce_visual_tokens` says so.
"""
from __future__ import annotations

import math
import types
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import UserError
from .reducers import (IMPORTANCE_SUBSTITUTE, METHODS, NEEDS_IMPORTANCE, check_method, cluster_mean_tokens,
                       feature_importance, pool_shape, reduce_features, setok_clusters)

__all__ = ["METHODS", "NEEDS_IMPORTANCE", "IMPORTANCE_SUBSTITUTE", "reduce_features", "reduce_visual_tokens",
           "restore_visual_tokens", "splice_image_tokens", "feature_importance", "pool_shape", "BuiltinTower",
           "cluster_mean_tokens", "setok_clusters", "check_method"]

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- towers

class BuiltinTower(nn.Module):
    """The builtin encoder as a LLaVA vision tower: pixel_values (B, 3, H, W) in [0, 1] ->
    hidden_states (B, 1 + N, D), D = 16 + position_channels.

    A ViT adds a position embedding to its patches; the builtin encoder has none, so the
    tower appends a 2-D sin-cos embedding (`position_channels` wide, 0: none) times
    `position_weight`, which lets a pooled or averaged token still say where it came from.
    The weight (0.2) keeps it small next to the appearance channels, as a ViT's content
    outweighs its position embedding: at 1.0 the clustering would cut flat regions into
    position cells (SeTok's natural count on the synthetic world: ~31 instead of ~5). Slot 0 is a CLS stand-in (the
    mean patch), cut by the "default" feature-select strategy. There is no attention:
    reducers that need one use `IMPORTANCE_SUBSTITUTE`."""

    has_cls_attention = False

    def __init__(self, image_size: int = 336, position_channels: int = 32, position_weight: float = 0.2):
        super().__init__()
        from ..models.builtin_encoder import BuiltinEncoder

        self.encoder = BuiltinEncoder(image_size=image_size)
        self.patch_size = self.encoder.patch_size
        self.position_channels = int(position_channels)
        self.position_weight = float(position_weight)
        self.hidden_size = self.encoder.hidden_size + self.position_channels

    def patch_features(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, N, hidden_size), no CLS."""
        from ..models.position import sincos_2d

        f = self.encoder(pixel_values)  # (B, h, w, 16)
        B, h, w, _ = f.shape
        if self.position_channels:
            pe = self.position_weight * sincos_2d(self.position_channels, h, w, device=f.device).expand(B, h, w, -1)
            f = torch.cat([f, pe], -1)
        return f.reshape(B, h * w, -1)

    def forward(self, pixel_values: Tensor, output_hidden_states: bool = True, return_dict: bool = True, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        f = self.patch_features(pixel_values)
        hs = torch.cat([f.mean(1, keepdim=True), f], 1)
        return BaseModelOutputWithPooling(last_hidden_state=hs, pooler_output=hs[:, 0], hidden_states=(hs, hs))


def _cls_attention(tower: nn.Module, hidden_states: Sequence[Tensor], layer: int) -> Optional[Tensor]:
    """CLS -> patch attention (mean over heads) inside the encoder layer that produced
    hidden_states[layer], recomputed from its input and q/k projections. (B, N) or None when
    the tower is not a CLIP / SigLIP-style encoder with a CLS token."""
    vm = getattr(tower, "vision_model", tower)
    layers = getattr(getattr(vm, "encoder", None), "layers", None)
    if layers is None:
        return None
    n = len(hidden_states)
    li = layer % n  # hidden_states[0] is the embeddings; layer li is layers[li - 1]
    if li == 0:
        return None
    blk = layers[li - 1]
    attn = getattr(blk, "self_attn", None)
    ln = getattr(blk, "layer_norm1", None)
    if attn is None or ln is None or not hasattr(attn, "q_proj"):
        return None
    h = ln(hidden_states[li - 1])
    B, L, D = h.shape
    heads = getattr(attn, "num_heads", None) or attn.config.num_attention_heads
    hd = D // heads
    q = attn.q_proj(h[:, :1]).view(B, 1, heads, hd).transpose(1, 2)
    k = attn.k_proj(h).view(B, L, heads, hd).transpose(1, 2)
    a = torch.softmax((q @ k.transpose(-1, -2)).float() / math.sqrt(hd), -1)  # (B, heads, 1, L)
    return a.mean(1)[:, 0, 1:]  # patches only


# ----------------------------------------------------------------------------- the splice

def splice_image_tokens(input_ids: Tensor, counts: Sequence[int], image_token_id: int,
                        attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                        pad_token_id: int = 0) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Every image's run of placeholders (one `<image>` or the processor's N of them) ->
    counts[j] placeholders, images numbered in reading order over the batch; rows re-padded
    on their side (left when any row starts with padding).

    input_ids (B, L) -> (input_ids (B, L'), attention_mask (B, L'), labels (B, L') or None);
    image positions get label IGNORE_INDEX."""
    B, L = input_ids.shape
    dev = input_ids.device
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(dev)
    keep = mask.bool()
    img = (input_ids == image_token_id) & keep
    prev = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=dev), img[:, :-1]], 1)
    start = img & ~prev  # first placeholder of each image
    n_img = int(start.sum())
    counts_t = torch.as_tensor(list(counts), dtype=torch.long, device=dev)
    if n_img != counts_t.numel():
        raise UserError(f"the prompts hold {n_img} image(s), the pixel values {counts_t.numel()}")
    rep = keep.long() * (~img).long()  # text tokens once, padding dropped
    rep = rep.masked_scatter(start, counts_t) if n_img else rep
    lengths = rep.sum(1)
    Lp = int(lengths.max()) if B else 0
    flat_ids = torch.repeat_interleave(input_ids.reshape(-1), rep.reshape(-1))
    row = torch.repeat_interleave(torch.arange(B, device=dev).view(B, 1).expand(B, L).reshape(-1), rep.reshape(-1))
    # position inside its row
    offs = torch.cumsum(torch.nn.functional.pad(lengths, (1, 0)), 0)[:-1]
    pos = torch.arange(flat_ids.numel(), device=dev) - offs[row]
    left = bool(attention_mask is not None and (~keep[:, 0]).any() and keep[:, -1].all())
    if left:
        pos = pos + (Lp - lengths)[row]
    new_ids = torch.full((B, Lp), pad_token_id, dtype=input_ids.dtype, device=dev)
    new_ids[row, pos] = flat_ids
    new_mask = torch.zeros((B, Lp), dtype=mask.dtype, device=dev)
    new_mask[row, pos] = 1
    new_labels = None
    if labels is not None:
        flat_lab = torch.repeat_interleave(labels.to(dev).reshape(-1), rep.reshape(-1))
        flat_lab = torch.where(flat_ids == image_token_id, torch.full_like(flat_lab, IGNORE_INDEX), flat_lab)
        new_labels = torch.full((B, Lp), IGNORE_INDEX, dtype=labels.dtype, device=dev)
        new_labels[row, pos] = flat_lab
    return new_ids, new_mask, new_labels


# ----------------------------------------------------------------------------- the patch

def _llava_classes():
    from transformers import LlavaForConditionalGeneration
    try:
        from transformers import LlavaNextForConditionalGeneration
    except ImportError:  # pragma: no cover
        LlavaNextForConditionalGeneration = ()
    return LlavaForConditionalGeneration, LlavaNextForConditionalGeneration


def _tower_patches(model) -> Optional[int]:
    tower = model.model.vision_tower
    if isinstance(tower, BuiltinTower):
        s = tower.encoder.image_size // tower.patch_size
        return s * s
    vc = model.config.vision_config
    size, p = getattr(vc, "image_size", None), getattr(vc, "patch_size", None)
    if isinstance(size, int) and isinstance(p, int) and p:
        return (size // p) ** 2
    return None


def reduce_visual_tokens(model, method: str = "setok", budget: Optional[int] = None, *, seed: int = 0,
                         setok: Optional[nn.Module] = None, max_tokens: int = 64):
    """Patch a loaded `LlavaForConditionalGeneration` so each image reaches the LLM as
    `method`'s tokens (integrations/reducers.py), in place; returns the model.

    Calling it again replaces the reducer; `restore_visual_tokens(model)` undoes it.
    The reducer's last counts and the source of its importance are kept on
    `model.visual_token_reducer` ({"method", "budget", "counts", "importance"})."""
    Llava, LlavaNext = _llava_classes()
    if LlavaNext and isinstance(model, LlavaNext):
        raise UserError("LLaVA-NeXT packs its anyres tiles after the projector; the reducer hook fits "
                        "LlavaForConditionalGeneration (LLaVA-1.5) only")
    if not isinstance(model, Llava):
        raise UserError(f"reduce_visual_tokens needs a LlavaForConditionalGeneration, got {type(model).__name__}")
    check_method(method, budget, _tower_patches(model))
    restore_visual_tokens(model)
    inner = model.model
    state = {"method": method, "budget": budget, "counts": None, "importance": None}
    cfg = model.config

    def get_image_features(self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None,
                           image_sizes=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        layer = cfg.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = (cfg.vision_feature_select_strategy if vision_feature_select_strategy is None
                    else vision_feature_select_strategy)
        tower = self.vision_tower
        out = tower(pixel_values, output_hidden_states=True, return_dict=True)
        hs = out.hidden_states
        layers = [layer] if isinstance(layer, int) else list(layer)
        sel = torch.cat([hs[i] for i in layers], -1)
        has_cls = strategy == "default"
        patches = sel[:, 1:] if has_cls else sel
        importance = None
        if method in NEEDS_IMPORTANCE:
            importance = _cls_attention(tower, hs, layers[0]) if has_cls else None
            state["importance"] = "CLS attention" if importance is not None else IMPORTANCE_SUBSTITUTE
        red = reduce_features(patches, method, budget, importance=importance, seed=seed, setok=setok,
                              max_tokens=max_tokens)
        counts = [int(t.shape[0]) for t in red]
        state["counts"] = counts
        proj = self.multi_modal_projector(torch.cat(red, 0).to(patches.dtype))
        return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state,
                                          pooler_output=list(torch.split(proj, counts)))

    def _spliced(self_outer, input_ids, pixel_values, attention_mask, labels, kwargs):
        image = inner.get_image_features(pixel_values, vision_feature_layer=kwargs.pop("vision_feature_layer", None),
                                         vision_feature_select_strategy=kwargs.pop(
                                             "vision_feature_select_strategy", None))
        counts = [int(t.shape[0]) for t in image.pooler_output]
        pad = cfg.text_config.pad_token_id if getattr(cfg.text_config, "pad_token_id", None) is not None else 0
        ids, mask, labels = splice_image_tokens(input_ids, counts, cfg.image_token_id, attention_mask, labels, pad)
        kwargs.pop("position_ids", None)  # the positions change with the splice; the model recomputes them
        kwargs.pop("image_sizes", None)
        return ids, mask, labels, {"image": image}

    orig_forward, orig_generate = model.forward, model.generate

    def forward(self_outer, input_ids=None, pixel_values=None, attention_mask=None, labels=None, **kwargs):
        if pixel_values is not None and input_ids is not None:
            input_ids, attention_mask, labels, mm = _spliced(self_outer, input_ids, pixel_values, attention_mask,
                                                             labels, kwargs)
            return orig_forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                mm_encoder_outputs=mm, **kwargs)
        return orig_forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                            labels=labels, **kwargs)

    def generate(self_outer, input_ids=None, pixel_values=None, attention_mask=None, **kwargs):
        if pixel_values is None or input_ids is None:
            return orig_generate(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                 **kwargs)
        ids, mask, _, mm = _spliced(self_outer, input_ids, pixel_values, attention_mask, None, kwargs)
        out = orig_generate(input_ids=ids, attention_mask=mask, mm_encoder_outputs=mm, **kwargs)
        if isinstance(out, Tensor):  # the caller's prompt, then the new tokens (as unpatched)
            return torch.cat([input_ids, out[:, ids.shape[1]:]], 1)
        return out

    inner.get_image_features = types.MethodType(get_image_features, inner)
    model.forward = types.MethodType(forward, model)
    model.generate = types.MethodType(generate, model)
    model.visual_token_reducer = state
    return model


def restore_visual_tokens(model):
    """Undo `reduce_visual_tokens` (no-op on an unpatched model)."""
    for obj, names in ((model.model, ("get_image_features",)), (model, ("forward", "generate"))):
        for n in names:
            obj.__dict__.pop(n, None)
    model.__dict__.pop("visual_token_reducer", None)
    return model
