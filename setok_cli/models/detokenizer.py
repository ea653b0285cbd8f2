"""The detokenizer of SeTok's stage-1 training (paper eq. 3): tokens -> image.

    tokens (B, K, T) + token_mask (B, K)
      -> TokenMapper: Q learnable queries cross-attend to the tokens (a BERT-shaped
         Q-Former, `transformers`' Blip2QFormerModel), padding tokens masked out
      -> encoder_hidden_states (B, Q, C)
      -> diffusers UNet2DConditionModel, trained by DDPM eps-prediction:
         L_unet = E || eps - eps_theta(z_t, t, U) ||^2
      -> sampling with a few-step DDIM scheduler.

Two spaces: "latent" (the paper: a Stable Diffusion 1.5 AutoencoderKL, frozen, scaling
factor 0.18215) and "pixel" (the tiny recipe: the UNet denoises RGB in [-1, 1] directly).

Pretrained parts load from local folders only (`local_files_only=True`); a missing
folder is one clear `UserError`. With `load_weights=False` (or under the meta device)
every part is built from its architecture alone: the presets below hold the SD-1.5 and
BERT-base shapes, so the paper model can be sized without any file on disk.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from .position import mask_boxes

__all__ = ["MapperConfig", "DetokenizerConfig", "TokenMapper", "Detokenizer", "UNET_PRESETS", "VAE_PRESETS",
           "MAPPER_PRESETS", "bert_to_qformer_state_dict"]

# SD-1.5's UNet: diffusers' defaults plus these (859,520,964 parameters).
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "sd15": dict(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    # ~1.7M parameters; 32-px RGB: about 0.5 s per batch-16 training step on one CPU core.
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
# BERT-base shapes for the mapper (paper appendix D: "initialize the backbone with BERT-base").
MAPPER_PRESETS: dict[str, dict[str, Any]] = {
    "bert-base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
}


@dataclass
class MapperConfig:
    """The Q-Former-style feature mapper. `cross_attention_frequency` f puts cross-attention
    in layers 0, f, 2f, ...: the paper's four cross-attention layers in BERT-base's 12
    layers is f = 3."""
    preset: Optional[str] = None          # "bert-base": fills hidden/layers/heads/intermediate
    token_dim: int = 64                   # T, the tokenizer's token width (cross-attention keys/values)
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 128
    num_queries: int = 8                  # Q
    cross_attention_frequency: int = 1
    output_dim: int = 64                  # the UNet's cross_attention_dim
    dropout: float = 0.0
    init_from: Optional[str] = None       # a local BERT-architecture folder
    # also hand the UNet the tokens themselves (projected to output_dim) after the Q
    # queries: encoder_hidden_states (B, Q + K, C), padding rows masked. For a UNet trained
    # from scratch (shapes world, 700 steps: objects right 0.8% -> 1.1%, colours visibly
    # better); the paper's mapper is Q only.
    append_tokens: bool = False


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
    # what the UNet predicts and the loss compares: "epsilon" (eq. 3, DDPM; SD-1.5),
    # "sample" (x0: weights the high-noise steps, where only the tokens tell the image,
    # far more than eps-MSE does) or "v_prediction"
    prediction_type: str = "epsilon"
    sample_steps: int = 25                # DDIM steps when sampling
    sampler: str = "ddim"                 # "ddim" | "dpm" (DPMSolverMultistep) | "ddpm" (ancestral, slow)
    # classifier-free guidance: during training the condition of a row is replaced by the
    # null condition (zeros) with probability cond_dropout; sampling mixes
    # eps = eps_null + guidance_scale * (eps_cond - eps_null). 0 / 1.0: off.
    cond_dropout: float = 0.0
    guidance_scale: float = 1.0
    # CoordConv: append this many coordinate channels (0 or 2: x and y in [-1, 1]) to the
    # UNet's input, so every pixel knows where it is and its cross-attention can ask the
    # tokens "whose region covers me?" (a from-scratch UNet otherwise learns position
    # only from its padding). Not for a pretrained UNet, whose first conv is fixed.
    coord_channels: int = 0
    # Token canvas (0: off): every token is broadcast over a canvas_grid x canvas_grid grid
    # with the grid's position embedding, an MLP gives each (token, cell) a weight logit and
    # canvas_channels features, the weights are a softmax over the image's tokens, and the
    # weighted features (upsampled) join the UNet's input. The slot-attention "spatial
    # broadcast" decoder: tokens only, no clustering masks, so a generator that makes
    # tokens can decode them. A second road into the UNet beside the cross-attention, for
    # UNets trained from scratch (tiny recipe); not for a pretrained UNet.
    canvas_channels: int = 0
    canvas_grid: int = 16
    canvas_hidden: int = 64
    # "mlp": (a_ip, f_ip) = MLP(W_t t_i + W_p PE(p)); "bilinear": a_ip = <W_a t_i, E(p)> / sqrt(hidden)
    # with E(p) = MLP(PE(p)) a learned embedding of the cell (the mask decoder's dot product,
    # with positions in place of pixels) and f_i = W_f t_i one feature vector per token
    # "local": each token places itself, c_i = tanh(W_c t_i) in [-1, 1]^2, and draws its shape
    # around that place, (a_ip, f_ip) = MLP(W_z t_i + W_u phi(p - c_i)) with phi the Fourier
    # features of the offset (canvas_octaves, finest = two cells): an object-centric implicit
    # decoder, the same shape wherever the token sits (translation-equivariant)
    canvas_kind: str = "mlp"
    canvas_octaves: int = 6
    # > 0: the canvas's token weights w_ip also learn the clustering masks M (cross-entropy
    # of softmax_i a_ip against M resized to the canvas, this weight), during training only:
    # where each token lies and how far it reaches, learnt directly instead of through colour
    canvas_mask_weight: float = 0.0
    # what that loss's masks are: "clusters" (the clustering masks M: blocky, one patch
    # wide at their borders) or "instances" (where the data has instance masks, each
    # object's pixels go to the token that holds most of it: sharp outlines; the rest,
    # and images without instances, keep M)
    canvas_mask_target: str = "clusters"
    # kind "sprite": each token draws a canvas_window x canvas_window sprite (alpha logit and
    # features, a linear read-out of an MLP of the token) into a square box it places itself,
    # centre c_i = tanh(.) and half-side s_i = 2 sigmoid(.) from the token; the box is learnt
    # from the bounding boxes of the mask targets (smooth L1, canvas_place_weight) and, during
    # training, the sprites are drawn into those true boxes (teacher forcing), so the sprite
    # learns each shape in its own normalised frame whatever its place and size
    canvas_window: int = 16
    canvas_place_weight: float = 1.0
    # False: training draws the canvas the UNet sees (and the canvas's image loss) in the
    # boxes the tokens predict, as sampling does; the silhouettes still learn in the true boxes
    canvas_true_boxes: bool = True
    # kind "sprite", > 0: each token's sprite alpha (its S x S weight logits) also learns its
    # own mask target, sampled in its true box (per-pixel BCE, this weight): the shape in the
    # sprite's normalised frame, learnt from the mask directly. Through the composed image
    # alone an outline is a few pixels of MSE and the sprites stay generic blobs (measured in
    # a canvas-only trial, 700 steps: objects right 27.9% without it, 46.4% with it).
    canvas_silhouette_weight: float = 0.0
    # > 0: the canvas's first C channels (C = the UNet's data channels, so canvas_channels
    # >= C) also learn the clean image at the canvas's grid (MSE, this weight): the
    # slot-attention autoencoder's own loss, a direct signal for where and what each token is
    canvas_recon_weight: float = 0.0
    # prediction_type "sample" with canvas_recon_weight > 0: the UNet's x0 is the canvas's
    # image estimate (its first C channels, upsampled) plus the UNet's output, a residual the
    # UNet learns on top of the canvas (as DiffuseVAE refines a VAE's output): the decoder
    # starts out as good as the canvas and spends its steps on what the canvas gets wrong
    canvas_skip: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "DetokenizerConfig":
        d = dict(d)
        for c, keys in ((cls, d), (MapperConfig, d.get("mapper") if isinstance(d.get("mapper"), dict) else {})):
            unknown = sorted(set(keys) - {f.name for f in dataclasses.fields(c)})
            if unknown:
                raise UserError(f"unknown {c.__name__} key(s): {', '.join(unknown)} (a checkpoint from another "
                                f"setok version?)")
        if isinstance(d.get("mapper"), dict):
            d["mapper"] = MapperConfig(**d["mapper"])
        return cls(**d)


def _resolved_mapper(c: MapperConfig) -> MapperConfig:
    if c.preset is None:
        return c
    if c.preset not in MAPPER_PRESETS:
        raise UserError(f"unknown mapper preset {c.preset!r}; choose from {sorted(MAPPER_PRESETS)}")
    d = asdict(c)
    d.update(MAPPER_PRESETS[c.preset])
    d["preset"] = None
    return MapperConfig(**d)


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


# ---- the mapper --------------------------------------------------------------------------

def bert_to_qformer_state_dict(bert_sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a BertModel state dict to Blip2QFormerModel names, as BLIP-2 initialises its
    Q-Former: self-attention and feed-forward from BERT (the query feed-forward too),
    cross-attention left fresh."""
    out = {}
    for k, v in bert_sd.items():
        k = k.removeprefix("bert.")
        if k.startswith("embeddings.LayerNorm."):
            out["layernorm." + k.split(".")[-1]] = v
            continue
        m = re.match(r"encoder\.layer\.(\d+)\.(.*)", k)
        if not m:
            continue
        i, rest = m.groups()
        rest = (rest.replace("attention.self.", "attention.attention.")
                .replace("intermediate.dense", "intermediate_query.dense"))
        if rest.startswith("output."):
            rest = "output_query." + rest[len("output."):]
        out[f"encoder.layer.{i}.{rest}"] = v
    return out


def _nonempty(token_mask: Tensor) -> Tensor:
    """(B, K) bool -> a copy where a row with no valid token keeps token 0 (no NaN softmax)."""
    mask = token_mask.clone()
    mask[:, 0] |= ~token_mask.any(dim=1)
    return mask


class TokenMapper(nn.Module):
    """Learnable queries cross-attend to a variable set of tokens: (B, K, T) -> (B, Q, C),
    or (B, Q + K, C) with `append_tokens`."""

    def __init__(self, config: MapperConfig, load_weights: bool = True):
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel
        self.config = c = _resolved_mapper(config)
        qcfg = Blip2QFormerConfig(hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                                  num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
                                  encoder_hidden_size=c.token_dim,
                                  cross_attention_frequency=c.cross_attention_frequency,
                                  hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=c.dropout)
        self.qformer = Blip2QFormerModel(qcfg)
        self.queries = nn.Parameter(torch.randn(1, c.num_queries, c.hidden_size) * 0.02)
        self.proj = nn.Linear(c.hidden_size, c.output_dim)
        self.token_proj = nn.Linear(c.token_dim, c.output_dim) if c.append_tokens else None
        if c.init_from and load_weights:
            self.load_bert(c.init_from)

    def load_bert(self, path: str) -> int:
        """Initialise from a local BERT checkpoint; returns how many tensors were copied."""
        from transformers import BertModel
        if not Path(path).is_dir():
            raise UserError(f"mapper.init_from {path} is not a folder: give a local BERT-architecture "
                            "checkpoint (e.g. bert-base-uncased saved with save_pretrained)")
        try:
            bert = BertModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the BERT checkpoint at {path}: {e}") from None
        own = self.qformer.state_dict()
        src = bert_to_qformer_state_dict(bert.state_dict())
        take = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
        self.qformer.load_state_dict(take, strict=False)
        return len(take)

    def forward(self, tokens: Tensor, token_mask: Tensor) -> Tensor:
        B = tokens.shape[0]
        q = self.queries.expand(B, -1, -1).to(tokens.dtype)
        mask = _nonempty(token_mask)  # a row with no valid token would attend to nothing (NaN)
        h = self.qformer(query_embeds=q, encoder_hidden_states=tokens,
                         encoder_attention_mask=mask.long()).last_hidden_state   # (B, Q, hidden)
        out = self.proj(h)  # (B, Q, C)
        if self.token_proj is not None:
            t = self.token_proj(tokens) * token_mask.unsqueeze(-1).to(tokens.dtype)  # (B, K, C)
            out = torch.cat([out, t.to(out.dtype)], 1)
        return out

    def condition_mask(self, token_mask: Tensor) -> Optional[Tensor]:
        """(B, K) -> the UNet's encoder_attention_mask (B, Q + K) with `append_tokens`, else None."""
        if self.token_proj is None:
            return None
        mask = _nonempty(token_mask)
        return torch.cat([mask.new_ones(mask.shape[0], self.config.num_queries), mask], 1)


def fourier_2d(dim: int, grid: int) -> Tensor:
    """Fourier features of a grid x grid grid's cells -> (grid * grid, dim): sin and cos of x and
    y times dim // 4 frequencies, geometric from pi (one period per two cells, the Nyquist
    rate) to 2 pi / grid (one period per grid), so an MLP on them can draw sharp edges (an MLP
    on low frequencies only learns smooth functions: Tancik et al., 2020). Trailing channels
    that do not fill a group are zero."""
    q = dim // 4
    out = torch.zeros(grid, grid, dim)
    if q == 0:
        return out.view(grid * grid, dim)
    hi, lo = math.pi, 2 * math.pi / max(grid, 2)
    omega = hi * (lo / hi) ** (torch.arange(q, dtype=torch.float64) / max(q - 1, 1))  # (q,)
    a = torch.arange(grid, dtype=torch.float64)[:, None] * omega[None]  # (grid, q)
    out[..., 0 * q:1 * q] = torch.sin(a).float()[:, None, :]
    out[..., 1 * q:2 * q] = torch.cos(a).float()[:, None, :]
    out[..., 2 * q:3 * q] = torch.sin(a).float()[None, :, :]
    out[..., 3 * q:4 * q] = torch.cos(a).float()[None, :, :]
    return out.view(grid * grid, dim)


KINDS = ("mlp", "bilinear", "local", "sprite")


class TokenCanvas(nn.Module):
    """Spatial broadcast of a token set: tokens (B, K, T) + token_mask (B, K) -> (B, C, g, g).

    kind "mlp":      h_ip = W_t t_i + W_p PE(p);  (a_ip, f_ip) = MLP(h_ip)    (B, K, g*g, 1 + C)
    kind "bilinear": a_ip = <W_a t_i, E(p)> / sqrt(hidden), E(p) = MLP(fourier_2d(p));  f_ip = W_f t_i
    kind "sprite":   (a_i, f_i) = MLP(t_i) an S x S sprite drawn into the box (c_i, s_i) (see
                     DetokenizerConfig.canvas_window); a_ip - 20 (|u|_inf - 1)_+ outside it
    kind "local":    c_i = tanh(W_c t_i);  (a_ip, f_ip) = MLP(W_z t_i + W_u phi(q_p - c_i)), q_p the
                     cell centre in [-1, 1]^2, phi = relative_fourier at pi 2^j / 2, j < octaves
    then         w_ip = softmax_i(a_ip) over the valid tokens;  out_p = sum_i w_ip f_ip
    """

    def __init__(self, token_dim: int, channels: int, grid: int = 16, hidden: int = 64, kind: str = "mlp",
                 octaves: int = 6, window: int = 16):
        super().__init__()
        from .position import sincos_2d
        if kind not in KINDS:
            raise UserError(f"detokenizer.canvas_kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
        self.window, self.channels = int(window), int(channels)
        self.grid, self.kind, self.hidden, self.octaves = int(grid), kind, int(hidden), int(octaves)
        if kind == "mlp":  # the merger's sin-cos position embedding
            pe = sincos_2d(hidden, grid, grid).view(grid * grid, hidden)
        elif kind == "bilinear":  # Fourier features from the grid's Nyquist frequency down to one period per grid
            pe = fourier_2d(hidden, grid)
        else:  # local, sprite: cell centres (x, y) in [-1, 1]
            c = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid * 2 - 1
            pe = torch.stack(torch.meshgrid(c, c, indexing="xy"), -1).view(grid * grid, 2)
        self.register_buffer("pe", pe, persistent=False)
        if kind == "mlp":
            self.tok = nn.Linear(token_dim, hidden)
            self.pos = nn.Linear(hidden, hidden)
            self.mlp = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1 + channels))
        elif kind == "bilinear":
            self.key = nn.Linear(token_dim, hidden)
            self.feat = nn.Linear(token_dim, channels)
            self.cell = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        elif kind == "sprite":
            if self.window < 2:
                raise UserError(f"detokenizer.canvas_window must be >= 2, got {window!r}")
            self.place = nn.Linear(token_dim, 3)
            self.sprite = nn.Sequential(nn.Linear(token_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                        nn.Linear(hidden, (1 + channels) * self.window ** 2))
        else:
            if self.octaves < 1:
                raise UserError(f"detokenizer.canvas_octaves must be >= 1, got {octaves!r}")
            self.place = nn.Linear(token_dim, 2)
            self.tok = nn.Linear(token_dim, hidden)
            self.off = nn.Linear(4 * self.octaves, hidden)
            self.mlp = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                     nn.GELU(), nn.Linear(hidden, 1 + channels))

    def centres(self, tokens: Tensor) -> Tensor:
        """kind "local": where each token draws itself, (B, K, 2) (x, y) in [-1, 1]."""
        return torch.tanh(self.place(tokens))

    def boxes(self, tokens: Tensor) -> Tensor:
        """kind "sprite": each token's box (..., 3): centre (x, y) in [-1, 1], half-side in (0, 2)."""
        p = self.place(tokens)
        return torch.cat([torch.tanh(p[..., :2]), 2 * torch.sigmoid(p[..., 2:])], -1)

    def sprites(self, tokens: Tensor) -> Tensor:
        """kind "sprite": tokens (V, T) -> sprites (V, 1 + C, S, S): alpha logit, then features;
        row = y, column = x of the box's [-1, 1] frame."""
        S = self.window
        return self.sprite(tokens).view(-1, 1 + self.channels, S, S)

    def _sprite(self, tokens: Tensor, valid: Tensor, box: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """kind "sprite", on the valid tokens only -> logits (B, K, P), feats (B, K, P, C).
        box (B, K, 3): boxes to draw into instead of the predicted ones where finite."""
        B, K, _ = tokens.shape
        P, S, C = self.pe.shape[0], self.window, self.channels
        t = tokens[valid]  # (V, T)
        b = self.boxes(t)
        if box is not None:
            bt = box[valid].to(b.dtype)
            b = torch.where(torch.isfinite(bt), bt, b)
        u = (self.pe.to(t.dtype).unsqueeze(0) - b[:, None, :2]) / b[:, None, 2:]  # (V, P, 2) box coords
        spr = self.sprites(t)
        o = F.grid_sample(spr, u.unsqueeze(1), mode="bilinear", padding_mode="border", align_corners=False)
        o = o[:, :, 0].transpose(1, 2)  # (V, P, 1 + C)
        outside = (u.abs().amax(-1) - 1).clamp_min(0)  # 0 inside the box
        logit = o.new_full((B, K, P), float("-inf"))
        feats = o.new_zeros(B, K, P, C)
        logit[valid] = o[..., 0] - 20.0 * outside
        feats[valid] = o[..., 1:]
        return logit, feats

    def _local(self, tokens: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """kind "local", on the valid tokens only -> logits (B, K, P), feats (B, K, P, C)."""
        from .merger import relative_fourier
        B, K, _ = tokens.shape
        P = self.pe.shape[0]
        t = tokens[valid]  # (V, T)
        off = self.pe.to(t.dtype).unsqueeze(0) - self.centres(t).unsqueeze(1)  # (V, P, 2) in [-2, 2]
        o = self.mlp(self.tok(t).unsqueeze(1) + self.off(relative_fourier(off / 2, self.octaves)))  # (V, P, 1 + C)
        logit = o.new_full((B, K, P), float("-inf"))
        feats = o.new_zeros(B, K, P, o.shape[-1] - 1)
        logit[valid] = o[..., 0]
        feats[valid] = o[..., 1:]
        return logit, feats

    def forward(self, tokens: Tensor, token_mask: Tensor, return_logits: bool = False,
                box: Optional[Tensor] = None):
        """-> canvas (B, C, g, g); with return_logits also the token logits (B, K, g*g), -inf
        on padded tokens. box (B, K, 3): kind "sprite", the boxes to draw into (teacher
        forcing; NaN rows use the predicted box)."""
        B, K, _ = tokens.shape
        g = self.grid
        pe = self.pe.to(tokens.dtype)
        valid = _nonempty(token_mask)
        if self.kind == "mlp":
            o = self.mlp(self.tok(tokens).unsqueeze(2) + self.pos(pe).view(1, 1, g * g, -1))  # (B, K, g*g, 1 + C)
            logit, feats = o[..., 0], o[..., 1:]
        elif self.kind == "bilinear":
            logit = torch.einsum("bkh,ph->bkp", self.key(tokens), self.cell(pe)) / self.hidden ** 0.5  # (B, K, g*g)
            feats = self.feat(tokens).unsqueeze(2)  # (B, K, 1, C)
        elif self.kind == "sprite":
            logit, feats = self._sprite(tokens, valid, box)
        else:
            logit, feats = self._local(tokens, valid)
        logit = logit.masked_fill(~valid.unsqueeze(-1), float("-inf"))
        w = torch.softmax(logit, dim=1)  # over tokens
        out = (w.unsqueeze(-1) * feats).sum(1)  # (B, g*g, C)
        out = out.transpose(1, 2).reshape(B, -1, g, g)
        return (out, logit) if return_logits else out


def instance_canvas_targets(masks: Tensor, instances: Tensor) -> Tensor:
    """Sharpen the clustering masks with instance masks, for canvas_mask_target "instances".

    masks (B, K, h, w) clustering masks; instances (B, H, W) ids (0 background, 1.. objects,
    -1 everywhere for an image without instances) -> (B, K, H, W): M upsampled (nearest),
    then every object's pixels given wholly to the token with the largest share of it."""
    B, K = masks.shape[:2]
    H, W = instances.shape[-2:]
    m = F.interpolate(masks.float(), size=(H, W), mode="nearest")  # (B, K, H, W)
    ids = instances.long().clamp_min(0)
    J = int(ids.max()) + 1
    oh = F.one_hot(ids, J).permute(0, 3, 1, 2).float()  # (B, J, H, W)
    share = torch.einsum("bjhw,bkhw->bjk", oh, m)  # each object's overlap with each token
    best = share.argmax(-1)  # (B, J)
    own = F.one_hot(best.gather(1, ids.flatten(1)), K).transpose(1, 2).view(B, K, H, W).float()
    obj = (instances > 0).unsqueeze(1)
    return torch.where(obj, own, m)


def box_crops(masks: Tensor, box: Tensor, size: int) -> Tensor:
    """masks (V, H, W) and square boxes (V, 3) (centre x, y and half-side, in the image's
    [-1, 1] frame) -> (V, size, size): each mask resampled (bilinear, 0 outside the image)
    on the size x size cell centres of its box, row = y."""
    c = (torch.arange(size, device=masks.device, dtype=torch.float32) + 0.5) / size * 2 - 1
    uv = torch.stack(torch.meshgrid(c, c, indexing="xy"), -1)  # (S, S, 2): (x, y) in the box frame
    b = box.float()
    pts = b[:, None, None, :2] + uv.unsqueeze(0) * b[:, None, None, 2:]  # (V, S, S, 2) image frame
    return F.grid_sample(masks.float().unsqueeze(1), pts, mode="bilinear", padding_mode="zeros",
                         align_corners=False)[:, 0]


def sprite_silhouette_loss(canvas: "TokenCanvas", tokens: Tensor, known: Tensor, box: Tensor,
                           masks: Tensor) -> Tensor:
    """Per-pixel BCE of each token's sprite alpha logits against its mask target cropped to
    its true box (canvas_silhouette_weight). tokens (B, K, T); known (B, K) bool: the tokens
    with a box; box (B, K, 3); masks (B, K', H, W), K' <= K, soft or 0/1."""
    if not bool(known.any()):
        return tokens.sum() * 0
    K = tokens.shape[1]
    m = F.pad(masks.float(), (0, 0, 0, 0, 0, K - masks.shape[1]))
    target = box_crops(m[known], box[known], canvas.window)  # (V, S, S)
    logits = canvas.sprites(tokens[known])[:, 0]
    return F.binary_cross_entropy_with_logits(logits.float(), target)


def canvas_mask_loss(logits: Tensor, masks: Tensor, grid: int) -> Tensor:
    """Cross-entropy of the canvas's token weights against the clustering masks.

    logits (B, K, g*g) (-inf on padded tokens); masks (B, K', h, w) with K' <= K (soft or
    0/1, resized to g x g by area or bilinear) -> mean over the cells that some token owns
    of -sum_i m_ip log softmax_i(a_ip), m normalised over tokens."""
    B, K, P = logits.shape
    m = masks.float()
    if m.shape[-2:] != (grid, grid):
        mode = "area" if m.shape[-1] > grid else "bilinear"
        m = F.interpolate(m, size=(grid, grid), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    m = m.flatten(2)  # (B, K', P)
    m = F.pad(m, (0, 0, 0, K - m.shape[1]))  # (B, K, P)
    tot = m.sum(1)  # (B, P)
    owned = tot > 1e-6
    logp = torch.log_softmax(logits.float(), dim=1).masked_fill(m <= 0, 0.0)  # -inf * 0 -> 0
    ce = -(m * logp).sum(1) / tot.clamp_min(1e-6)  # (B, P)
    return ce[owned].mean() if bool(owned.any()) else logits.sum() * 0


# ---- the detokenizer -----------------------------------------------------------------------

def _subfolder(path: Path, name: str) -> tuple[str, Optional[str]]:
    return (str(path), name) if (path / name / "config.json").exists() else (str(path), None)


class Detokenizer(nn.Module):
    def __init__(self, config: DetokenizerConfig, load_weights: bool = True):
        super().__init__()
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        if config.space not in ("pixel", "latent"):
            raise UserError(f"detokenizer.space must be 'pixel' or 'latent', got {config.space!r}")
        self.config = c = config
        self.mapper = TokenMapper(c.mapper, load_weights)
        if c.unet_pretrained and load_weights:
            root, sub = _subfolder(Path(c.unet_pretrained), "unet")
            self.unet = _load_local(UNet2DConditionModel, root, sub, "detokenizer.unet_pretrained")
            if c.coord_channels or c.canvas_channels:
                raise UserError("detokenizer.coord_channels and canvas_channels need a UNet trained from scratch: "
                                "a pretrained UNet's first convolution has no such inputs (set them to 0)")
        else:
            self.unet = UNet2DConditionModel(**unet_config(c))
        self.canvas = TokenCanvas(c.mapper.token_dim, c.canvas_channels, c.canvas_grid, c.canvas_hidden,
                                  c.canvas_kind, c.canvas_octaves, c.canvas_window) \
            if c.canvas_channels else None
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
        if c.coord_channels not in (0, 2):
            raise UserError(f"detokenizer.coord_channels must be 0 or 2, got {c.coord_channels!r}")
        if c.prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise UserError(f"detokenizer.prediction_type must be 'epsilon', 'sample' or 'v_prediction', "
                            f"got {c.prediction_type!r}")
        if c.canvas_mask_target not in ("clusters", "instances"):
            raise UserError(f"detokenizer.canvas_mask_target must be 'clusters' or 'instances', "
                            f"got {c.canvas_mask_target!r}")
        if c.canvas_silhouette_weight > 0 and (not c.canvas_channels or c.canvas_kind != "sprite"):
            raise UserError("detokenizer.canvas_silhouette_weight needs canvas_kind 'sprite' (and canvas_channels > 0)")
        if c.canvas_recon_weight > 0 and c.canvas_channels < self._channels():
            raise UserError(f"detokenizer.canvas_recon_weight needs canvas_channels >= {self._channels()} "
                            f"(the image's channels), got {c.canvas_channels}")
        if c.canvas_skip and (c.prediction_type != "sample" or c.canvas_recon_weight <= 0):
            raise UserError("detokenizer.canvas_skip needs prediction_type 'sample' and canvas_recon_weight > 0 "
                            "(the canvas's first channels are then an image estimate the UNet refines)")
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
            ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(B, 1, h, w)
            xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(B, 1, h, w)
            x = torch.cat([x, xs, ys], 1)
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
            if self.canvas.kind == "sprite" and masks is not None:
                box = mask_boxes(masks)  # (B, K', 3), NaN where a token has no pixel
                box = F.pad(box, (0, 0, 0, tokens.shape[1] - box.shape[1]), value=float("nan"))
                known = torch.isfinite(box).all(-1) & token_mask
                place_loss = F.smooth_l1_loss(self.canvas.boxes(tokens[known]).float(), box[known], beta=0.05) \
                    if bool(known.any()) else tokens.sum() * 0
                if self.config.canvas_silhouette_weight > 0:
                    sil_loss = sprite_silhouette_loss(self.canvas, tokens, known, box, masks)
            draw = box if self.training and self.config.canvas_true_boxes else None
            canvas, clog = self.canvas(tokens, token_mask, return_logits=True, box=draw)
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

    # -- persistence: config.json + model.safetensors (the VAE stays where its folder is) --
    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_file
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = asdict(self.config)
        cfg["mapper"]["init_from"] = None
        # the UNet's actual shape, whatever preset or folder it came from
        valid = set(inspect.signature(type(self.unet).__init__).parameters)
        cfg["unet_preset"] = None
        cfg["unet"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.unet.config.items()
                       if k in valid and k != "cross_attention_dim"}
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if not k.startswith("vae.")}
        save_file(sd, str(path / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Detokenizer":
        from safetensors.torch import load_file
        path = Path(path)
        cfg = DetokenizerConfig.from_dict(json.loads((path / "config.json").read_text()))
        # the UNet's weights are in model.safetensors: build it from its shape, load the VAE
        unet_pre = cfg.unet_pretrained
        cfg.unet_pretrained = None
        model = cls(cfg, load_weights=True)
        model.config.unet_pretrained = unet_pre
        missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
        missing = [k for k in missing if not k.startswith("vae.")]
        if missing or unexpected:
            raise UserError(f"detokenizer checkpoint {path} does not match its config "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model


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
