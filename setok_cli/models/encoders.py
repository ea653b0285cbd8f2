"""Frozen vision encoders that turn images into a patch grid (B, h, w, D).

    load_encoder("builtin")                          -> BuiltinEncoder (no weights)
    load_encoder("/path/to/clip-vit-large-patch14-336") or a model id already in the
    local Hugging Face cache                         -> HFVisionEncoder

Every encoder takes pixel_values (B, 3, H, W) as RGB in [0, 1] (it normalises itself)
with H, W multiples of its patch size, and exposes `patch_size`, `hidden_size`,
`image_size` (the square input it was trained at), `pad_mode` and `spec`.

Hugging Face adapters (chosen by the checkpoint's `model_type`, see ADAPTERS):
  clip / clip_vision_model      CLIPVisionModel, hidden state of the second-to-last layer
                                (LLaVA-1.5's choice), CLS dropped
  siglip / siglip_vision_model  SiglipVisionModel, last hidden state; no CLS, so all
                                patches (27 x 27 at 384 px) are kept
  dinov2 / dinov2_with_registers  Dinov2Model, last hidden state (layer-normed), CLS and
                                register tokens dropped
Nothing is downloaded at run time (local_files_only=True everywhere).
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import UserError
from .builtin_encoder import BuiltinEncoder

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@contextlib.contextmanager
def quiet_transformers():
    """transformers quiet while a part is read or written: no load report for every
    ignored key (e.g. CLIP's text tower), no progress bars (the CLI prints its own)."""
    from transformers.utils import logging as hf_logging

    prev = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(prev)
        if bars:
            hf_logging.enable_progress_bar()


class HFVisionEncoder(nn.Module):
    """A frozen Hugging Face vision tower -> patch grid. Subclasses set the family details."""

    model_class: str = ""
    default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD
    default_layer = -1  # index into hidden_states
    pad_mode = "mean"  # letterbox padding: the normalisation mean (zero after normalising)

    def __init__(self, model: nn.Module, spec: str, layer: Optional[int] = None,
                 image_mean=None, image_std=None, image_size: Optional[int] = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.spec = spec
        cfg = model.config
        self.patch_size = int(cfg.patch_size)
        self.hidden_size = int(cfg.hidden_size)
        self.image_size = int(image_size or cfg.image_size)
        self.layer = self.default_layer if layer is None else int(layer)
        self.register_buffer("mean", torch.tensor(image_mean or self.default_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std or self.default_std).view(1, 3, 1, 1), persistent=False)
        self.image_mean = tuple(self.mean.flatten().tolist())

    def num_prefix_tokens(self) -> int:
        return 0

    def train(self, mode: bool = True):  # frozen: always in eval mode (dropout off)
        return super().train(False)

    def _hidden(self, x: Tensor) -> Tensor:
        out = self.model(pixel_values=x, output_hidden_states=self.layer != -1)
        return out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]

    @torch.no_grad()
    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values: (B, 3, H, W) RGB in [0, 1] -> (B, H/p, W/p, D) float32."""
        B, _, H, W = pixel_values.shape
        p = self.patch_size
        x = (pixel_values.float() - self.mean) / self.std
        x = x.to(next(self.model.parameters()).dtype)
        hs = self._hidden(x)  # (B, prefix + h*w, D)
        hs = hs[:, self.num_prefix_tokens():]
        h, w = H // p, W // p
        if hs.shape[1] != h * w:
            raise RuntimeError(f"{self.spec}: expected {h * w} patch tokens for a {H}x{W} input, got {hs.shape[1]}")
        return hs.reshape(B, h, w, -1).float()


class CLIPEncoder(HFVisionEncoder):
    model_class = "CLIPVisionModel"
    default_mean, default_std = CLIP_MEAN, CLIP_STD
    default_layer = -2  # LLaVA-1.5: penultimate layer

    def num_prefix_tokens(self) -> int:
        return 1  # CLS


class SiglipEncoder(HFVisionEncoder):
    model_class = "SiglipVisionModel"
    default_mean, default_std = HALF, HALF

    def _hidden(self, x: Tensor) -> Tensor:
        # transformers' SigLIP is trained at one resolution; interpolate for other sizes
        kw = {"interpolate_pos_encoding": True} if x.shape[-1] != self.model.config.image_size else {}
        out = self.model(pixel_values=x, output_hidden_states=self.layer != -1, **kw)
        return out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]


class Dinov2Encoder(HFVisionEncoder):
    model_class = "Dinov2Model"
    default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD

    def num_prefix_tokens(self) -> int:
        return 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)


class Dinov2RegistersEncoder(Dinov2Encoder):
    model_class = "Dinov2WithRegistersModel"


# model_type in config.json -> adapter. Add a family with register_adapter().
ADAPTERS: dict[str, type[HFVisionEncoder]] = {
    "clip": CLIPEncoder,
    "clip_vision_model": CLIPEncoder,
    "siglip": SiglipEncoder,
    "siglip_vision_model": SiglipEncoder,
    "dinov2": Dinov2Encoder,
    "dinov2_with_registers": Dinov2RegistersEncoder,
}

# default input size where the checkpoint's own is not what we want (DINOv2 says 518)
DEFAULT_IMAGE_SIZE = {"dinov2": 336, "dinov2_with_registers": 336}


def register_adapter(model_type: str, adapter: type[HFVisionEncoder]) -> None:
    ADAPTERS[model_type] = adapter


def _looks_like_model_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not spec.endswith("/")


def resolve_encoder_dir(spec: str) -> str:
    """A local directory for `spec`: the directory itself, or the snapshot of a model id in
    the local Hugging Face cache. Raises UserError saying how to fetch it otherwise."""
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"encoder directory {spec!r} has no config.json (is it a Hugging Face model folder?)")
        return path
    if os.path.exists(path):
        raise UserError(f"encoder {spec!r} is a file; give the model's folder (with config.json)")
    if not _looks_like_model_id(spec):
        raise UserError(f"encoder {spec!r} not found: it is neither 'builtin', a local model folder, nor a "
                        f"Hugging Face model id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(spec, local_files_only=True)
    except Exception:
        raise UserError(f"encoder {spec!r} is not in the local Hugging Face cache and setok never downloads at "
                        f"run time; fetch it once with: huggingface-cli download {spec}") from None


def _preprocessor_stats(path: str):
    f = os.path.join(path, "preprocessor_config.json")
    if not os.path.isfile(f):
        return None, None
    try:
        with open(f) as fh:
            d = json.load(fh)
        return tuple(d["image_mean"]), tuple(d["image_std"])
    except Exception:
        return None, None


def load_encoder(spec: str = "builtin", *, layer: Optional[int] = None, image_size: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The frozen encoder named by `spec` ("builtin", a local folder or a cached model id)."""
    if spec is None or spec == "builtin":
        return BuiltinEncoder(image_size=image_size or 336)
    path = resolve_encoder_dir(spec)
    import transformers

    with open(os.path.join(path, "config.json")) as fh:
        model_type = json.load(fh).get("model_type")
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        raise UserError(f"encoder {spec!r} has model_type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}")
    cls = getattr(transformers, adapter.model_class)
    try:
        with quiet_transformers():
            model = cls.from_pretrained(path, local_files_only=True, **({"dtype": dtype} if dtype else {}))
    except Exception as e:
        raise UserError(f"cannot load encoder {spec!r} as {adapter.model_class}: {e}") from None
    mean, std = _preprocessor_stats(path)
    size = image_size or DEFAULT_IMAGE_SIZE.get(model_type)
    return adapter(model, spec, layer=layer, image_mean=mean, image_std=std, image_size=size)
