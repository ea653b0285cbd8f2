"""SeTok: frozen encoder -> (cluster head) -> density-peak clustering -> cluster merger.

    model = load_tokenizer()                       # builtin encoder, default settings
    out = model.tokenize(["cat.jpg", pil_image])   # TokenizerOutput, inference
    out = model(pixel_values, valid)               # training forward, differentiable

Clustering features. The encoder features f (B, N, D) go through the cluster head
(identity at initialisation), are divided by their per-image spread
s = max(sqrt(mean_n ||f_n - mean f||^2 / D), feature_floor) (feature_norm="image"), and
get the 2-D sin-cos position embedding (temperature pos_temperature) times pos_weight.
So `bandwidth` and `pos_weight` are in units of the image's own feature spread (two
random patches of an image are ~sqrt(2) apart) and work across encoders; the floor keeps
a flat image from having its noise blown up (a blank image is one token). With
pos_weight 0.3, two far-apart patches of identical appearance are ~0.3 apart, so
same-looking regions far apart in the image tend to become different tokens.

Resize / pad policy (image_policy="letterbox", the default): every image, whatever
its companions in the batch, is resized so its long side is image_size and its short side
a whole number of patches at the same aspect ratio, placed top-left on an image_size
square and padded (builtin: edge pixels repeated; HF encoders: the normalisation mean,
as LLaVA does). Padding patches are invalid: excluded from clustering and the merger,
label -1. An image therefore gets the same tokens alone or in any batch.
"squash" resizes to the square instead (all patches valid).

The scope remainder becomes a token whenever it owns a patch (see models/clustering.py),
so every valid patch belongs to exactly one token (labels) and num_tokens <= max_tokens.

Connectivity (hard mode, connectivity=4 by default; 0 turns it off): the scope loop
groups by appearance, so two same-coloured objects far apart share a token and a
token's region can be scattered. `split_connected` then cuts every token into its
connected pieces on the patch grid; pieces of at least min_region patches become tokens
(largest first, never more than max_tokens), smaller pieces and tokens join the
neighbouring token with the nearest mean clustering feature. Every token is then one
connected region; masks, labels, seeds and num_tokens stay consistent and the masks keep
their straight-through gradient (the training forward is unchanged otherwise).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..errors import UserError
from .builtin_encoder import BuiltinEncoder
from .clustering import MODES, cluster, split_connected
from .encoders import load_encoder
from .hub import CONFIG_NAME, WEIGHTS_NAME, PretrainedModel, config_from_dict  # noqa: F401 (re-exported)
from .merger import ClusterMerger
from .position import sincos_2d



@dataclass
class SeTokConfig:
    encoder: str = "builtin"  # "builtin", a local HF model folder, or a model id in the local HF cache
    encoder_layer: Optional[int] = None  # hidden_states index; None: the family default (CLIP -2, else -1)
    image_size: Optional[int] = None  # None: the encoder's own (builtin 336, CLIP-L 336, SigLIP 384)
    image_policy: str = "letterbox"  # "letterbox" | "squash"
    # builtin encoder (models/builtin_encoder.py): the patch colour statistic ("median":
    # the colour of the patch's majority side, so a patch cut by an object's border takes
    # one side's colour; "mean": the blend) and the edge gate of its 3 x 3 context
    # channels in Lab units (0: plain box average, which blends across borders)
    builtin_colour: str = "median"
    builtin_context_sigma: float = 15.0
    # clustering
    mode: str = "hard"  # "hard" | "soft" | "threshold" | "fixed"
    k: int = 8  # neighbours for the density
    bandwidth: float = 0.6  # kernel radius, in units of the image's feature spread
    max_tokens: int = 64  # tokens per image at most (the remainder included)
    min_scope: Optional[float] = None  # None: 0 (hard), 0.1 (soft)
    threshold: Optional[float] = None  # threshold mode: seed score threshold (None: 0.4); hard/soft: stop rule
    min_clusters: int = 8  # threshold mode: at least this many seeds
    feature_norm: str = "image"  # "image" | "none"
    feature_floor: Optional[float] = None  # None: 0.1 (builtin), 1e-6 (HF encoders)
    pos_weight: float = 0.3  # 2-D PE added to the clustering features (0: none)
    pos_temperature: float = 10000.0
    # hard mode: every token one connected region of the patch grid (models/clustering.py
    # split_connected): 4 or 8 (neighbourhood), 0 to turn it off
    connectivity: int = 4
    min_region: int = 3  # pieces smaller than this (patches) join the nearest neighbouring token
    cluster_head: str = "none"  # "none" | "linear" | "mlp": learnable, identity at init
    # merger
    merger_dim: int = 128  # paper-scale recipes use the encoder width
    merger_depth: int = 2  # blocks within a cluster
    merger_cross_depth: int = 2  # blocks across the cluster tokens
    merger_heads: int = 2
    # > 0: octaves of Fourier features of each patch's offset from its cluster's centroid,
    # added inside the cluster (ClusterMerger); lets tokens carry their region's shape. 0: the paper
    merger_relative_pe: int = 0
    # with merger_relative_pe: > 0 embeds the offsets by an MLP of this hidden width (joint
    # functions of x and y; pooled, a learnt shape descriptor) instead of a Linear
    merger_relative_hidden: int = 0
    # > 0: each cluster's crop (image + mask in the cluster's box, this many pixels a side)
    # through a small CNN of merger_crop_width channels, added to the pooled cluster
    # (merger.CropEncoder). 0: the paper
    merger_crop: int = 0
    merger_crop_width: int = 16
    mlp_ratio: float = 4.0
    token_dim: int = 256
    init_seed: int = 0  # the untrained merger is initialised from this seed (deterministic tokens)

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.image_policy not in ("letterbox", "squash"):
            raise UserError(f"image_policy must be 'letterbox' or 'squash', got {self.image_policy!r}")
        if self.cluster_head not in ("none", "linear", "mlp"):
            raise UserError(f"cluster_head must be 'none', 'linear' or 'mlp', got {self.cluster_head!r}")
        if self.feature_norm not in ("image", "none"):
            raise UserError(f"feature_norm must be 'image' or 'none', got {self.feature_norm!r}")
        if not (isinstance(self.k, int) and self.k >= 1):
            raise UserError(f"k must be an integer >= 1, got {self.k!r}")
        if not (self.bandwidth > 0):
            raise UserError(f"bandwidth must be > 0, got {self.bandwidth!r}")
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 2):
            raise UserError(f"max_tokens must be an integer >= 2, got {self.max_tokens!r}")
        if self.builtin_colour not in ("mean", "median"):
            raise UserError(f"builtin_colour must be 'mean' or 'median', got {self.builtin_colour!r}")
        if not (self.builtin_context_sigma >= 0):
            raise UserError(f"builtin_context_sigma must be >= 0, got {self.builtin_context_sigma!r}")
        if self.connectivity not in (0, 4, 8):
            raise UserError(f"connectivity must be 0 (off), 4 or 8, got {self.connectivity!r}")
        if not (isinstance(self.merger_relative_hidden, int) and self.merger_relative_hidden >= 0):
            raise UserError(f"merger_relative_hidden must be an integer >= 0, got {self.merger_relative_hidden!r}")
        if not (isinstance(self.merger_crop, int) and (self.merger_crop == 0 or (self.merger_crop >= 4
                                                                                  and self.merger_crop % 4 == 0))):
            raise UserError(f"merger_crop must be 0 (off) or a multiple of 4, got {self.merger_crop!r}")
        if not (isinstance(self.merger_crop_width, int) and self.merger_crop_width >= 1):
            raise UserError(f"merger_crop_width must be an integer >= 1, got {self.merger_crop_width!r}")
        if not (isinstance(self.min_region, int) and self.min_region >= 1):
            raise UserError(f"min_region must be an integer >= 1, got {self.min_region!r}")
        if self.min_scope is not None and not (0.0 <= self.min_scope < 1.0):
            raise UserError(f"min_scope must be in [0, 1), got {self.min_scope!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "SeTokConfig":
        return config_from_dict(cls, d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TokenizerOutput:
    tokens: Tensor  # (B, K, token_dim), K = max num_tokens in the batch; padded rows 0
    token_mask: Tensor  # (B, K) bool
    num_tokens: Tensor  # (B,) int64
    masks: Tensor  # (B, K, h, w) token regions on the patch grid (0/1 in hard mode)
    labels: Tensor  # (B, h, w) int64 token of each patch, -1 outside the image (padding)
    seeds: Tensor  # (B, K) int64 flat patch index (row * w + col) of each token's seed, -1 none
    grid: tuple[int, int]  # (h, w) of the padded patch grid
    features: Tensor  # (B, h, w, D) encoder features
    valid: Optional[Tensor] = None  # (B, h, w) bool patches inside the image
    image_grids: list = field(default_factory=list)  # per image (gh, gw) of its valid top-left block
    images: list = field(default_factory=list)  # tokenize(): the resized RGB images the grids cover

    def image_labels(self, i: int) -> Tensor:
        """Labels of image i on its own grid (the padding cut away). -> (gh, gw) int64"""
        if self.image_grids:
            gh, gw = self.image_grids[i]
            return self.labels[i, :gh, :gw]
        return self.labels[i]

    def light(self, i: int) -> "TokenizerOutput":
        """Image i alone (a batch of one, its padded K kept), without the token vectors, masks,
        features and images: what finding the token of an object needs (labels, seeds, token_mask,
        its grid), a few KiB to keep per image. tokens (1, K, 0), masks (1, K, 0, 0), features (1, 0, 0, 0)."""
        one = slice(i, i + 1)
        own = lambda t: t.clone()        # copies: a view would keep the whole batch's tensors alive  # noqa: E731
        return TokenizerOutput(
            tokens=own(self.tokens[one, :, :0]), token_mask=own(self.token_mask[one]),
            num_tokens=own(self.num_tokens[one]), masks=own(self.masks[one, :, :0, :0]), labels=own(self.labels[one]),
            seeds=own(self.seeds[one]), grid=self.grid, features=own(self.features[one, :0, :0, :0]),
            valid=None if self.valid is None else own(self.valid[one]), image_grids=list(self.image_grids[one]))

    def to(self, device) -> "TokenizerOutput":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device)
                                            for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), Tensor)})


class ClusterHead(nn.Module):
    """Learnable map on the frozen features before clustering, the identity at init, so
    training can move the clustering masks without changing them on day one."""

    def __init__(self, dim: int, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.proj = nn.Linear(dim, dim)
            nn.init.eye_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        elif kind == "mlp":
            self.proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
            nn.init.zeros_(self.proj[-1].weight)
            nn.init.zeros_(self.proj[-1].bias)

    def forward(self, f: Tensor) -> Tensor:
        if self.kind == "none":
            return f
        if self.kind == "linear":
            return self.proj(f)
        return f + self.proj(f)  # residual MLP


def _masked_spread(f: Tensor, valid: Tensor) -> Tensor:
    """Per-image RMS distance to the mean feature, over valid patches / sqrt(D). -> (B,)"""
    v = valid.unsqueeze(-1).to(f.dtype)
    n = v.sum(1).clamp_min(1.0)  # (B, 1)
    mean = (f * v).sum(1) / n
    var = (((f - mean.unsqueeze(1)) ** 2) * v).sum(1) / n  # (B, D)
    return var.mean(-1).sqrt()


class SeTok(PretrainedModel, model_type="setok", config_class=SeTokConfig, part_name="SeTok tokenizer",
            subfolder="setok"):
    def __init__(self, config: Optional[SeTokConfig] = None, encoder: Optional[nn.Module] = None, **overrides):
        super().__init__()
        config = config or SeTokConfig()
        if overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        enc = encoder if encoder is not None else load_encoder(config.encoder, layer=config.encoder_layer,
                                                                image_size=config.image_size)
        if encoder is None and isinstance(enc, BuiltinEncoder):
            enc.colour = config.builtin_colour
            enc.context_sigma = float(config.builtin_context_sigma)
        self.encoder = enc.requires_grad_(False)
        D = enc.hidden_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            self.cluster_head = ClusterHead(D, config.cluster_head)
            self.merger = ClusterMerger(D, config.merger_dim, config.token_dim, config.merger_depth,
                                        config.merger_cross_depth, config.merger_heads, config.mlp_ratio,
                                        config.merger_relative_pe, config.merger_relative_hidden,
                                        config.merger_crop, config.merger_crop_width)

    # ---- properties ------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    @property
    def image_size(self) -> int:
        return (self.encoder.image_size // self.patch_size) * self.patch_size

    @property
    def device(self) -> torch.device:
        return next(self.merger.parameters()).device

    def _floor(self) -> float:
        if self.config.feature_floor is not None:
            return float(self.config.feature_floor)
        return 0.1 if self.config.encoder == "builtin" else 1e-6

    def _min_scope(self) -> float:
        if self.config.min_scope is not None:
            return float(self.config.min_scope)
        return 0.1 if self.config.mode == "soft" else 0.0

    def _threshold(self) -> Optional[float]:
        if self.config.threshold is None and self.config.mode == "threshold":
            return 0.4
        return self.config.threshold

    # ---- the model -------------------------------------------------------------------
    def clustering_features(self, f: Tensor, valid: Tensor, grid: tuple[int, int]) -> Tensor:
        """f: (B, N, D) encoder features -> (B, N, D) the features the clustering sees."""
        z = self.cluster_head(f)
        if self.config.feature_norm == "image":
            s = _masked_spread(z.detach(), valid).clamp_min(self._floor())
            z = z / s.view(-1, 1, 1)
        if self.config.pos_weight:
            h, w = grid
            pe = sincos_2d(z.shape[-1], h, w, self.config.pos_temperature, device=z.device)
            z = z + self.config.pos_weight * pe.view(1, h * w, -1)
        return z

    def forward(self, pixel_values: Optional[Tensor], valid: Optional[Tensor] = None,
                features: Optional[Tensor] = None) -> TokenizerOutput:
        """pixel_values: (B, 3, H, W) RGB in [0, 1], H = W = image_size (or any multiple of
        the patch size); valid: (B, h, w) or (B, N) bool patches inside the image.
        features (B, h, w, D): the frozen encoder's output for these images, computed
        earlier (a feature cache); the encoder is then skipped and pixel_values only read by
        the merger's crop encoder (merger_crop > 0), which needs them either way."""
        if features is not None and self.merger.crop is not None and pixel_values is None:
            raise ValueError("merger_crop > 0: pass pixel_values along with cached features")
        if features is not None:
            feats = features.to(self.device)
        else:
            if pixel_values is None or pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
                shape = None if pixel_values is None else tuple(pixel_values.shape)
                raise ValueError(f"pixel_values must be (B, 3, H, W), got {shape}")
            with torch.no_grad():
                feats = self.encoder(pixel_values.to(self.device))  # (B, h, w, D), frozen
        B, h, w, D = feats.shape
        N = h * w
        if valid is None:
            valid = torch.ones(B, N, dtype=torch.bool, device=feats.device)
        valid = valid.reshape(B, N).to(device=feats.device, dtype=torch.bool)
        f = feats.reshape(B, N, D)
        c = self.config
        z = self.clustering_features(f, valid, (h, w))
        cl = cluster(z, c.mode, k=c.k, bandwidth=c.bandwidth, max_tokens=c.max_tokens, min_scope=self._min_scope(),
                     threshold=self._threshold(), min_clusters=c.min_clusters, valid=valid)
        if c.mode == "hard" and c.connectivity:
            cl = split_connected(cl, z, (h, w), valid, c.max_tokens, c.min_region, c.connectivity)
        pixels = pixel_values if self.merger.crop is not None else None
        tokens = self.merger(f, cl.masks, cl.labels, cl.num_tokens, (h, w), hard=c.mode != "soft", pixels=pixels)
        K = cl.masks.shape[1]
        token_mask = torch.arange(K, device=f.device).view(1, K) < cl.num_tokens.view(B, 1)
        return TokenizerOutput(tokens=tokens, token_mask=token_mask, num_tokens=cl.num_tokens,
                               masks=cl.masks.view(B, K, h, w), labels=cl.labels.view(B, h, w), seeds=cl.seeds,
                               grid=(h, w), features=feats, valid=valid.view(B, h, w))

    # ---- inference on images -----------------------------------------------------------
    def preprocess(self, images: Sequence, names: Optional[Sequence[str]] = None):
        """Images -> pixel_values (B, 3, S, S), valid (B, h, w), grids, resized images."""
        from ..images import as_image, letterbox

        enc = self.encoder
        pad_mode = getattr(enc, "pad_mode", "edge")
        pad_rgb = getattr(enc, "image_mean", (0.5, 0.5, 0.5))
        S, p = self.image_size, self.patch_size
        n = S // p
        px, valid, grids, resized = [], [], [], []
        for i, item in enumerate(images):
            name = names[i] if names else (str(item) if isinstance(item, (str, os.PathLike)) else f"image {i}")
            img = as_image(item)
            x, (gh, gw), r = letterbox(img, S, p, pad_mode, pad_rgb, self.config.image_policy, name=name)
            v = torch.zeros(n, n, dtype=torch.bool)
            v[:gh, :gw] = True
            px.append(x)
            valid.append(v)
            grids.append((gh, gw))
            resized.append(r)
        return torch.stack(px), torch.stack(valid), grids, resized

    @torch.no_grad()
    def tokenize(self, images: Union[Sequence, object], names: Optional[Sequence[str]] = None) -> TokenizerOutput:
        """Paths / PIL images / uint8 arrays, of any sizes -> TokenizerOutput (eval mode,
        no gradients). See the module docstring for the resize / pad policy."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise UserError("no images to tokenize")
        was_training = self.training
        self.eval()
        try:
            px, valid, grids, resized = self.preprocess(images, names)
            out = self(px, valid)
        finally:
            self.train(was_training)
        out.image_grids = grids
        out.images = resized
        return out

    # ---- persistence -------------------------------------------------------------------
    def trainable_state_dict(self) -> dict:
        """Everything but the frozen encoder (which config.encoder names)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    def state_to_save(self) -> dict:
        return self.trainable_state_dict()

    def config_to_save(self) -> dict:
        """The config, with a local encoder folder made absolute (config.encoder names the
        frozen encoder, whose weights are not saved)."""
        cfg = super().config_to_save()
        enc = cfg["encoder"]
        if enc != "builtin" and os.path.isdir(os.path.expanduser(enc)):
            cfg["encoder"] = os.path.abspath(os.path.expanduser(enc))
        return cfg


def load_tokenizer(model: Optional[str] = None, encoder: Optional[str] = None, **overrides) -> SeTok:
    """The tokenizer the CLI and `setok eval tokenizer` use.

    model: a folder saved by save_pretrained (trained merger); else a fresh tokenizer on
    `encoder` ("builtin" by default) with a deterministically initialised merger.
    overrides: SeTokConfig fields (None values are ignored), e.g. mode="soft", k=16.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if model is not None:
        if encoder is not None:
            overrides["encoder"] = encoder
        return SeTok.from_pretrained(model, **overrides)
    return SeTok(SeTokConfig(encoder=encoder or "builtin", **overrides))
