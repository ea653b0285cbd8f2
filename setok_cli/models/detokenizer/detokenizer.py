"""The detokenizer of SeTok's stage-1 training (paper eq. 3): tokens -> image.

    tokens (B, K, T) + token_mask (B, K)
      -> TokenMapper (mapper.py): Q learnable queries cross-attend to the tokens
      -> encoder_hidden_states (B, Q, C)
      -> diffusers UNet2DConditionModel, trained by DDPM eps-prediction:
         L_unet = E || eps - eps_theta(z_t, t, U) ||^2
      -> sampling with a few-step DDIM scheduler.
    [+ the token canvas (canvas.py) and CoordConv channels at the UNet's input, for a UNet
       trained from scratch]

Two spaces: "latent" (the paper: a Stable Diffusion 1.5 AutoencoderKL, frozen, scaling
factor 0.18215) and "pixel" (the tiny recipe: the UNet denoises RGB in [-1, 1] directly).

Pretrained parts load from local folders only (`local_files_only=True`); a missing
folder is one clear `UserError`. With `load_weights=False` (or under the meta device)
every part is built from its architecture alone: the presets below hold the SD-1.5 and
BERT-base shapes, so the paper model can be sized without any file on disk.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import UserError
from ..hub import PretrainedModel, config_from_dict
from ..position import coord_grid
from .canvas import SpriteCanvas, canvas_mask_loss, make_canvas
from .mapper import MapperConfig, TokenMapper

__all__ = ["DetokenizerConfig", "Detokenizer", "UNET_PRESETS", "VAE_PRESETS", "unet_config", "count_parameters"]

# SD-1.5's UNet: diffusers' defaults plus these (859,520,964 parameters).
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "sd15": dict(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    # ~1.7M parameters, RGB in pixel space
    "tiny": dict(sample_size=32, in_channels=3, out_channels=3, cross_attention_dim=64, attention_head_dim=8,
                 block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
}
# SD-1.5's VAE (83,653,863 parameters).
VAE_PRESETS: dict[str, dict[str, Any]] = {
    "sd15": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                 block_out_channels=(128, 256, 512, 512),
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
}


@dataclass
class DetokenizerConfig:
    space: str = "pixel"                  # "pixel" | "latent"
    image_size: int = 32                  # the resolution the UNet works at (pixels; latents are /8)
    mapper: MapperConfig = field(default_factory=MapperConfig)
    unet_preset: Optional[str] = "tiny"   # a key of UNET_PRESETS
    unet: dict = field(default_factory=dict)   # UNet2DConditionModel keyword overrides
    unet_pretrained: Optional[str] = None  # local folder: an SD-1.5 root (with unet/) or a UNet folder
    vae_preset: Optional[str] = None      # "sd15" in latent space
    vae_pretrained: Optional[str] = None  # local folder: an SD-1.5 root (with vae/) or a VAE folder
    vae_scaling_factor: float = 0.18215
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"   # SD-1.5 uses "scaled_linear"
    # what the UNet predicts and the loss compares: "epsilon" (eq. 3; SD-1.5), "sample" (x0)
    # or "v_prediction"
    prediction_type: str = "epsilon"
    sample_steps: int = 25                # sampling steps
    sampler: str = "ddim"                 # "ddim" | "dpm" (DPMSolverMultistep) | "ddpm" (ancestral, slow)
    # classifier-free guidance: in training a row's condition becomes the null condition
    # (zeros) with probability cond_dropout; sampling mixes
    # eps = eps_null + guidance_scale * (eps_cond - eps_null). 0 / 1.0: off.
    cond_dropout: float = 0.0
    guidance_scale: float = 1.0
    # The options below are for a UNet trained from scratch (a pretrained UNet's first
    # convolution has no inputs for them).
    # CoordConv: 2 appends x and y in [-1, 1] to the UNet's input, so every pixel knows where it is
    coord_channels: int = 0
    # the token canvas (canvas.py; 0 channels: off): a canvas_grid x canvas_grid image of
    # canvas_channels drawn from the tokens alone, upsampled into the UNet's input
    canvas_channels: int = 0
    canvas_grid: int = 16
    canvas_hidden: int = 64
    canvas_kind: str = "mlp"              # "mlp" | "bilinear" | "local" | "sprite" (see canvas.py)
    canvas_octaves: int = 6               # kind "local": Fourier octaves of the offset from the token's place
    canvas_window: int = 16               # kind "sprite": the sprites' side
    # > 0: in training the canvas's token weights also learn the mask targets (cross-entropy,
    # this weight)
    canvas_mask_weight: float = 0.0
    # the mask targets (for canvas_mask_weight and the sprites' boxes and silhouettes):
    # "clusters" (the clustering masks M) or "instances" (where the data has instance masks,
    # each object's pixels go to the token that holds most of it; elsewhere M)
    canvas_mask_target: str = "clusters"
    # kind "sprite": the weight of the box loss (smooth L1 against the mask targets' boxes)
    canvas_place_weight: float = 1.0
    # kind "sprite", > 0: each sprite's alpha also learns its mask target cropped to its true
    # box (per-pixel BCE, this weight): the shape in the sprite's own frame
    canvas_silhouette_weight: float = 0.0
    # > 0: the canvas's first C channels (C = the image's channels) also learn the image at
    # the canvas's grid (MSE, this weight), the slot-attention autoencoder's own loss
    canvas_recon_weight: float = 0.0
    # with prediction_type "sample" and canvas_recon_weight > 0: x0 = the canvas's image
    # channels (upsampled) + the UNet's output, so the UNet learns a residual on the canvas
    canvas_skip: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "DetokenizerConfig":
        return config_from_dict(cls, d)


def _check(c: DetokenizerConfig) -> None:
    """The config's values that need nothing built, each wrong one a UserError."""
    choices = {"space": ("pixel", "latent"), "prediction_type": ("epsilon", "sample", "v_prediction"),
               "canvas_mask_target": ("clusters", "instances"), "sampler": ("ddim", "dpm", "ddpm"),
               "coord_channels": (0, 2)}
    for name, ok in choices.items():
        if getattr(c, name) not in ok:
            raise UserError(f"detokenizer.{name} must be one of {', '.join(map(repr, ok))}, "
                            f"got {getattr(c, name)!r}")
    if c.unet_pretrained and (c.coord_channels or c.canvas_channels):
        raise UserError("detokenizer.coord_channels and canvas_channels need a UNet trained from scratch: "
                        "a pretrained UNet's first convolution has no such inputs (set them to 0)")
    if c.canvas_silhouette_weight > 0 and (not c.canvas_channels or c.canvas_kind != "sprite"):
        raise UserError("detokenizer.canvas_silhouette_weight needs canvas_kind 'sprite' (and canvas_channels > 0)")
    if c.canvas_skip and (c.prediction_type != "sample" or c.canvas_recon_weight <= 0):
        raise UserError("detokenizer.canvas_skip needs prediction_type 'sample' and canvas_recon_weight > 0 "
                        "(the canvas's first channels are then an image estimate the UNet refines)")


def _close(name: str, valid) -> str:
    import difflib
    m = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.4)
    return f"; did you mean {m[0]!r}?" if m else ""


def unet_config(c: DetokenizerConfig) -> dict:
    from diffusers import UNet2DConditionModel
    if c.unet_preset is not None and c.unet_preset not in UNET_PRESETS:
        raise UserError(f"unknown unet_preset {c.unet_preset!r}{_close(c.unet_preset, UNET_PRESETS)} "
                        f"(choose from {sorted(UNET_PRESETS)})")
    valid = set(inspect.signature(UNet2DConditionModel.__init__).parameters) - {"self"}
    for k in c.unet:
        if k not in valid:
            raise UserError(f"unknown UNet2DConditionModel argument detokenizer.unet.{k}{_close(k, valid)}")
    cfg = dict(UNET_PRESETS[c.unet_preset]) if c.unet_preset else {}
    data_channels = cfg.get("in_channels", 4)
    cfg.update(c.unet)
    cfg["cross_attention_dim"] = c.mapper.output_dim
    extra = c.coord_channels + c.canvas_channels
    if extra and "in_channels" not in c.unet:  # a saved config already counts them
        cfg["in_channels"] = data_channels + extra
        cfg.setdefault("out_channels", data_channels)
    return cfg


class Detokenizer(PretrainedModel, model_type="setok-detokenizer", config_class=DetokenizerConfig,
                  part_name="detokenizer", subfolder="detokenizer"):
    """tokens (B, K, T) + token_mask (B, K) -> images (B, 3, S, S); `forward` is the training loss."""

    def __init__(self, config: DetokenizerConfig, load_weights: bool = True):
        super().__init__()
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        _check(config)
        self.config = c = config
        self.mapper = TokenMapper(c.mapper, load_weights)
        if c.unet_pretrained and load_weights:
            root, sub = _subfolder(Path(c.unet_pretrained), "unet")
            self.unet = _load_local(UNet2DConditionModel, root, sub, "detokenizer.unet_pretrained")
        else:
            self.unet = UNet2DConditionModel(**unet_config(c))
        self.canvas = make_canvas(c.canvas_kind, c.mapper.token_dim, c.canvas_channels, c.canvas_grid,
                                  c.canvas_hidden, c.canvas_octaves, c.canvas_window) if c.canvas_channels else None
        self.vae = None
        if c.space == "latent":
            if c.vae_pretrained and load_weights:
                root, sub = _subfolder(Path(c.vae_pretrained), "vae")
                self.vae = _load_local(AutoencoderKL, root, sub, "detokenizer.vae_pretrained")
            elif c.vae_preset:
                self.vae = AutoencoderKL(**VAE_PRESETS[c.vae_preset])
            else:
                raise UserError("detokenizer.space 'latent' needs vae_pretrained (a local SD-1.5 folder) "
                                "or vae_preset")
            self.vae.requires_grad_(False)
        if c.canvas_recon_weight > 0 and c.canvas_channels < self._channels():
            raise UserError(f"detokenizer.canvas_recon_weight needs canvas_channels >= {self._channels()} "
                            f"(the image's channels), got {c.canvas_channels}")
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=c.num_train_timesteps,
                                             beta_schedule=c.beta_schedule, prediction_type=c.prediction_type)

    # -- spaces --
    def _channels(self) -> int:
        return self.unet.config.in_channels - self.config.coord_channels - self.config.canvas_channels

    def _unet(self, x: Tensor, t, cond: Tensor, cond_mask: Optional[Tensor] = None,
              canvas: Optional[Tensor] = None) -> Tensor:
        """The UNet on x (B, C, s, s), with the coordinate channels appended if configured;
        cond_mask (B, L) bool marks the valid rows of cond; canvas (B, C', g, g) or None.
        -> (B, C, s, s); with canvas_skip, the canvas's first C channels plus the UNet's output."""
        up = None
        if canvas is not None:
            up = canvas.to(x.dtype)
            if up.shape[-2:] != x.shape[-2:]:
                up = F.interpolate(up, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, up], 1)
        if self.config.coord_channels:
            B, _, h, w = x.shape
            x = torch.cat([x, coord_grid(B, h, w, device=x.device, dtype=x.dtype)], 1)
        extra = {} if cond_mask is None else {"encoder_attention_mask": cond_mask}
        out = self.unet(x, t, encoder_hidden_states=cond, **extra).sample
        if self.config.canvas_skip and up is not None:
            out = out + up[:, :out.shape[1]].to(out.dtype)
        return out

    def _sample_hw(self) -> int:
        return self.config.image_size // 8 if self.config.space == "latent" else self.config.image_size

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [0, 1] -> the UNet's space (B, C, s, s)."""
        x = images
        if x.shape[-1] != self.config.image_size or x.shape[-2] != self.config.image_size:
            x = F.interpolate(x, size=(self.config.image_size,) * 2, mode="bilinear", antialias=True,
                              align_corners=False)
        x = x * 2 - 1
        if self.vae is not None:
            x = self.vae.encode(x.to(self.vae.dtype)).latent_dist.sample() * self.config.vae_scaling_factor
        return x

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        if self.vae is not None:
            z = self.vae.decode(z.to(self.vae.dtype) / self.config.vae_scaling_factor).sample
        return ((z.float() + 1) / 2).clamp(0, 1)

    # -- training (eq. 3) --
    def forward(self, images: Tensor, tokens: Tensor, token_mask: Tensor,
                generator: Optional[torch.Generator] = None, masks: Optional[Tensor] = None) -> Tensor:
        """The denoising loss (a scalar) for images (B, 3, H, W) in [0, 1]: MSE against eps
        (eq. 3), x0 or v, as `prediction_type` says; plus the canvas's own losses where set
        (masks (B, K, h, w): the clustering masks, for canvas_mask_weight)."""
        x0 = self.encode(images)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (x0.shape[0],),
                          generator=generator, device=x0.device)
        xt = self.noise_scheduler.add_noise(x0, noise, t)
        cond = self.mapper(tokens, token_mask)
        canvas = clog = box = None
        place_loss = sil_loss = None
        if self.canvas is not None:
            if isinstance(self.canvas, SpriteCanvas) and masks is not None:
                box, place_loss, sil_loss = self.canvas.box_losses(tokens, token_mask, masks,
                                                                   self.config.canvas_silhouette_weight > 0)
            # in training the sprites are drawn into the true boxes (teacher forcing)
            canvas, clog = self.canvas(tokens, token_mask, return_logits=True, box=box if self.training else None)
        if self.training and self.config.cond_dropout > 0:
            drop = torch.rand(cond.shape[0], generator=generator, device=cond.device) < self.config.cond_dropout
            cond = cond.masked_fill(drop[:, None, None], 0.0)
            canvas = None if canvas is None else canvas.masked_fill(drop[:, None, None, None], 0.0)
        pred = self._unet(xt.to(cond.dtype), t, cond, self.mapper.condition_mask(token_mask), canvas)
        kind = self.config.prediction_type
        target = noise if kind == "epsilon" else x0 if kind == "sample" else \
            self.noise_scheduler.get_velocity(x0, noise, t)
        loss = F.mse_loss(pred.float(), target.float())
        if canvas is not None and self.config.canvas_recon_weight > 0:
            C = x0.shape[1]
            small = F.adaptive_avg_pool2d(x0.float(), canvas.shape[-2:])
            loss = loss + self.config.canvas_recon_weight * F.mse_loss(canvas[:, :C].float(), small)
        if clog is not None and self.config.canvas_mask_weight > 0:
            if masks is None:
                raise UserError("detokenizer.canvas_mask_weight needs the clustering masks (masks=...)")
            loss = loss + self.config.canvas_mask_weight * canvas_mask_loss(clog, masks, self.canvas.grid)
        if place_loss is not None:
            loss = loss + self.config.canvas_place_weight * place_loss
        if sil_loss is not None:
            loss = loss + self.config.canvas_silhouette_weight * sil_loss
        return loss

    # -- sampling --
    def sampling_scheduler(self, steps: Optional[int] = None):
        from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
        cls = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler,
               "ddpm": DDPMScheduler}.get(self.config.sampler)
        if cls is None:
            raise UserError(f"detokenizer.sampler must be 'ddim', 'dpm' or 'ddpm', got {self.config.sampler!r}")
        s = cls.from_config(self.noise_scheduler.config)
        s.set_timesteps(steps or self.config.sample_steps)
        return s

    @torch.no_grad()
    def sample(self, tokens: Tensor, token_mask: Tensor, steps: Optional[int] = None,
               generator: Optional[torch.Generator] = None, guidance_scale: Optional[float] = None) -> Tensor:
        """tokens (B, K, T) -> images (B, 3, S, S) in [0, 1], S = config.image_size."""
        sched = self.sampling_scheduler(steps)
        w = self.config.guidance_scale if guidance_scale is None else guidance_scale
        cond = self.mapper(tokens, token_mask)
        cmask = self.mapper.condition_mask(token_mask)
        canvas = self.canvas(tokens, token_mask) if self.canvas is not None else None
        if w != 1.0:
            cond = torch.cat([cond, torch.zeros_like(cond)])          # (2B, Q, C): conditional, null
            cmask = None if cmask is None else torch.cat([cmask, cmask])
            canvas = None if canvas is None else torch.cat([canvas, torch.zeros_like(canvas)])
        B, s = tokens.shape[0], self._sample_hw()
        x = torch.randn((B, self._channels(), s, s), generator=generator, device=cond.device, dtype=cond.dtype)
        x = x * sched.init_noise_sigma
        # ancestral samplers draw fresh noise each step: from `generator`, so samples repeat
        stochastic = {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}
        for t in sched.timesteps:
            xin = sched.scale_model_input(x, t)
            if w != 1.0:
                e_c, e_u = self._unet(torch.cat([xin, xin]), t, cond, cmask, canvas).chunk(2)
                eps = e_u + w * (e_c - e_u)
            else:
                eps = self._unet(xin, t, cond, cmask, canvas)
            x = sched.step(eps, t, x, **stochastic).prev_sample
        return self.decode(x)

    # -- persistence (hub.PretrainedModel): config.json + model.safetensors --
    def config_to_save(self) -> dict:
        """The config with the UNet's actual shape, whatever preset or folder it came from
        (its weights are in model.safetensors), and no BERT folder to initialise from."""
        cfg = super().config_to_save()
        cfg["mapper"]["init_from"] = None
        valid = set(inspect.signature(type(self.unet).__init__).parameters)
        cfg["unet_preset"] = None
        cfg["unet"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.unet.config.items()
                       if k in valid and k != "cross_attention_dim"}
        return cfg

    def state_to_save(self) -> dict[str, Tensor]:
        """Everything but a VAE that a pretrained folder holds (config.json names that folder);
        a VAE built from its preset alone is saved like any other weights."""
        sd = self.state_dict()
        if self.vae is not None and self.config.vae_pretrained:
            sd = {k: v for k, v in sd.items() if not k.startswith("vae.")}
        return sd

    @classmethod
    def _build_for_load(cls, config: DetokenizerConfig, folder: Path) -> "Detokenizer":
        # the UNet's weights are in model.safetensors: build it from its saved shape
        unet_pretrained, config.unet_pretrained = config.unet_pretrained, None
        try:
            model = cls(config, load_weights=True)
        except UserError as e:
            raise UserError(f"{folder}: {e}") from None
        model.config.unet_pretrained = unet_pretrained
        return model


def _subfolder(path: Path, name: str) -> tuple[str, Optional[str]]:
    return (str(path), name) if (path / name / "config.json").exists() else (str(path), None)


def _load_local(cls, root: str, sub: Optional[str], what: str):
    if not Path(root).is_dir():
        raise UserError(f"{what}: {root} is not a folder. Pretrained parts load from local folders only; "
                        "download them first (e.g. `huggingface-cli download "
                        "stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir DIR`)")
    try:
        return cls.from_pretrained(root, subfolder=sub, local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise UserError(f"{what}: cannot load {cls.__name__} from {root}: {e}") from None


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
