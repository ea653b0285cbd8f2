"""Stage I of the paper (section 2.2): tokenizer pretraining.

    images -> SeTok -> tokens (B, K, T), token_mask, clustering masks M (B, K, h, w)
      detokenizer:   L_unet  = || eps - eps_theta(z_t, t, mapper(tokens)) ||^2          (eq. 3)
      mask decoder:  L_mask  = KL(M || stopgrad(pi)) + L_bce + L_dice                    (eq. 4)
      alignment:     L_align = InfoNCE(pooled tokens, caption) + token<->phrase (GroupViT)

    loss = sum_i weight_i * term_i   (weights: recipe `loss`; 0 switches a term off)

The encoder is frozen; what trains is chosen by `train.trainable` / `train.frozen` globs
over the names below (`setok.*`, `detokenizer.mapper.*`, `detokenizer.unet.*`,
`mask_decoder.*`, `alignment.*`). The KL term reaches the clustering only through
SeTok's cluster head (`setok.cluster_head.*`): the one learnable thing before the
clustering when the encoder is frozen.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import ConcatDataset

from ..errors import UserError
from ..models.alignment import ConceptAlignment
from ..models.detokenizer import Detokenizer, instance_canvas_targets
from ..models.mask_decoder import MaskDecoder, mask_consistency_kl, mask_losses
from .recipe import LossRecipe, Recipe

__all__ = ["Stage1Model", "build_stage1", "build_stage1_model", "build_tokenizer", "encoder_width", "init_from_stage1",
           "ENCODER_PRESETS", "meta_stage1_model", "parameter_report"]

# Architectures of the paper's encoders, to size a recipe without the weights on disk
# (`setok train RECIPE --dry-run`, the meta-device test). Matched by the folder's name.
ENCODER_PRESETS = {
    "siglip-so400m-patch14-384": ("siglip_vision_model", dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        patch_size=14, image_size=384)),
    "clip-vit-large-patch14-336": ("clip_vision_model", dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        patch_size=14, image_size=336, projection_dim=768)),
}


def encoder_width(setok: nn.Module) -> int:
    enc = getattr(setok, "encoder", None)
    for name in ("hidden_size", "feature_dim", "out_dim"):
        if enc is not None and isinstance(getattr(enc, name, None), int):
            return int(getattr(enc, name))
    raise UserError("cannot tell the tokenizer encoder's feature width; set mask_decoder.feature_dim explicitly")


class Stage1Model(nn.Module):
    def __init__(self, setok: nn.Module, detokenizer: Optional[Detokenizer], mask_decoder: Optional[MaskDecoder],
                 alignment: Optional[ConceptAlignment], weights: LossRecipe, tokenizer_image_size: Optional[int] = None,
                 grad_accum: int = 1, cache_features: bool = False):
        super().__init__()
        self.setok = setok
        self.detokenizer = detokenizer
        self.mask_decoder = mask_decoder
        self.alignment = alignment
        self.weights = weights
        self.tokenizer_image_size = tokenizer_image_size
        self.grad_accum = max(1, int(grad_accum))
        # `data.cache_features`: data-set index -> the frozen encoder's features (h, w, D), on
        # the CPU. The encoder is frozen and deterministic, so a cached batch tokenizes exactly
        # as a fresh one; at 448 px the builtin encoder is most of a tiny step's time.
        self.feature_cache: Optional[dict[int, Tensor]] = {} if cache_features else None
        # training forward passes so far: the optimizer step the loss schedule (`loss.kl_start`,
        # `loss.kl_ramp`) reads. A buffer, so it rides in every checkpoint and resumes exactly.
        self.register_buffer("forward_count", torch.zeros((), dtype=torch.long))
        if weights.clustering_grad not in ("all", "kl"):
            raise UserError(f"loss.clustering_grad must be 'all' or 'kl', got {weights.clustering_grad!r}")
        merger = getattr(setok, "merger", None)
        if weights.clustering_grad == "kl" and merger is not None:
            # the merger's inputs are (features, masks, ...): detach the masks there, so the
            # tokens (and every term built on them) no longer reach the clustering
            merger.register_forward_pre_hook(_detach_merger_masks)

    @property
    def optimizer_step(self) -> int:
        return int(self.forward_count.item()) // self.grad_accum

    def kl_weight(self, step: Optional[int] = None) -> float:
        """The KL weight at an optimizer step: 0 before `kl_start`, then a linear ramp over
        `kl_ramp` steps up to `loss.kl`."""
        w = self.weights
        step = self.optimizer_step if step is None else step
        if step < w.kl_start:
            return 0.0
        if w.kl_ramp > 0:
            return w.kl * min(1.0, (step - w.kl_start + 1) / w.kl_ramp)
        return w.kl

    def _resize(self, images: Tensor) -> Tensor:
        s = self.tokenizer_image_size
        if s is not None and images.shape[-2:] != (s, s):
            images = F.interpolate(images, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return images

    def tokenize(self, images: Tensor, index: Optional[Tensor] = None):
        """images (B, 3, H, W) in [0, 1]; index (B,) their training-set indices (the feature
        cache's keys, when it is on; in eval mode the cache is not used)."""
        cache = self.feature_cache
        if cache is None or index is None or not self.training:
            return self.setok(self._resize(images))
        keys = [int(i) for i in index.tolist()]
        miss = [j for j, k in enumerate(keys) if k not in cache]
        if miss:
            with torch.no_grad():
                new = self.setok.encoder(self._resize(images[miss]).to(self.setok.device))  # (M, h, w, D)
            for j, f in zip(miss, new.cpu()):
                cache[keys[j]] = f.clone()
        feats = torch.stack([cache[k] for k in keys])
        # the merger's crop encoder (if any) reads the image itself
        pixels = self._resize(images) if getattr(self.setok.merger, "crop", None) is not None else None
        return self.setok(pixels, features=feats)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """batch: pixel_values (B, 3, H, W) in [0, 1]; instances (B, H, W)?; caption [B]; phrases [B][...]."""
        w = self.weights
        kl_w = self.kl_weight()
        if self.training:
            self.forward_count += 1
        images = batch["pixel_values"]
        out = self.tokenize(images, batch.get("index"))
        tokens, tmask = out.tokens, out.token_mask                    # (B, K, T), (B, K)
        terms: dict[str, Tensor] = {}
        if self.detokenizer is not None and w.diffusion > 0:
            dc = self.detokenizer.config
            cmasks = None
            # the canvas's mask targets (and, for sprites, their true boxes and silhouettes)
            if dc.canvas_channels and (dc.canvas_mask_weight > 0 or dc.canvas_kind == "sprite"):
                cmasks = out.masks.detach()
                if dc.canvas_mask_target == "instances" and "instances" in batch:
                    cmasks = instance_canvas_targets(cmasks, batch["instances"])
            terms["diffusion"] = self.detokenizer(images, tokens, tmask, masks=cmasks)
        if self.mask_decoder is not None and (w.bce > 0 or w.dice > 0 or w.kl > 0) and \
                ("instances" in batch or w.kl > 0):
            feats = out.features if self.mask_decoder.config.feature_dim > 0 else None
            logits = self.mask_decoder(images, tokens, feats)           # (B, K, H, W)
            c = self.mask_decoder.config
            has = batch.get("has_instances")
            sel = slice(None) if has is None or bool(has.all()) else has.nonzero().squeeze(1)
            if "instances" in batch and (has is None or bool(has.any())):
                terms.update(mask_losses(logits[sel], tmask[sel], batch["instances"][sel], c.match_background,
                                         c.cost_bce, c.cost_dice, c.empty_unmatched))
            else:   # keep every rank's graph the same shape under DDP
                terms.update({"bce": logits.sum() * 0, "dice": logits.sum() * 0})
            if w.kl > 0:
                fg = None
                if w.kl_foreground and "instances" in batch:
                    # patches that overlap an object (area share > 0 on the clustering grid)
                    inst = (batch["instances"] > 0).float()[:, None]
                    fg = F.adaptive_avg_pool2d(inst, out.masks.shape[-2:])[:, 0] > 0
                    if has is not None and not bool(has.all()):
                        fg = fg | ~has.view(-1, 1, 1).bool()
                terms["kl"] = mask_consistency_kl(out.masks, logits, tmask, region=fg)
        if self.alignment is not None and (w.contrastive > 0 or w.phrase > 0):
            captions = batch.get("caption") if w.contrastive > 0 else None
            phrases = batch.get("phrases") if w.phrase > 0 else None
            if captions is not None and not all(captions):
                captions = None
            terms.update(self.alignment(tokens, tmask, captions, phrases))
        if not terms:
            raise UserError("every stage-1 loss term is off (loss weights all 0, or its module is null)")
        weight = {k: (kl_w if k == "kl" else getattr(w, k)) for k in terms}
        loss = sum(weight[k] * v for k, v in terms.items())
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()},
                "tokens_per_image": out.num_tokens.float().mean().detach()}

    def save_parts(self, folder: str | Path) -> None:
        """Each part as a `from_pretrained` folder: setok/ (what `setok tokenize --model` reads),
        detokenizer/, mask_decoder/, alignment/."""
        folder = Path(folder)
        self.setok.save_pretrained(folder / "setok")
        if self.detokenizer is not None:
            self.detokenizer.save_pretrained(folder / "detokenizer")
        if self.mask_decoder is not None:
            self.mask_decoder.save_pretrained(folder / "mask_decoder")
        if self.alignment is not None:
            self.alignment.save_pretrained(folder / "alignment")


def _detach_merger_masks(module: nn.Module, args: tuple):
    if len(args) > 1 and isinstance(args[1], Tensor):
        return (args[0], args[1].detach(), *args[2:])
    return None


def build_tokenizer(recipe: Recipe, load_weights: bool = True) -> nn.Module:
    try:
        from ..models.setok import SeTok, SeTokConfig
    except ImportError as e:  # pragma: no cover - the tokenizer ships with the package
        raise UserError(f"the SeTok tokenizer is not available: {e}") from None
    t = recipe.model.tokenizer
    if t.pretrained:
        if not Path(t.pretrained).is_dir():
            raise UserError(f"model.tokenizer.pretrained {t.pretrained} is not a folder")
        return SeTok.from_pretrained(t.pretrained)
    try:
        cfg = SeTokConfig(**t.config)
    except TypeError as e:
        raise UserError(f"model.tokenizer.config: {e}") from None
    return SeTok(cfg)


def build_stage1_model(recipe: Recipe, load_weights: bool = True, setok: Optional[nn.Module] = None) -> Stage1Model:
    """The stage-1 model of a recipe. `load_weights=False` builds every part from its
    architecture only (pretrained folders are not read): with `torch.device("meta")` this
    sizes the paper model without memory or files."""
    m = recipe.model
    if setok is None:
        setok = build_tokenizer(recipe, load_weights)
    token_dim = int(setok.config.token_dim)
    detok = mdec = align = None
    if m.detokenizer is not None:
        dc = copy.deepcopy(m.detokenizer)
        dc.mapper.token_dim = token_dim
        detok = Detokenizer(dc, load_weights=load_weights)
    if m.mask_decoder is not None:
        mc = copy.deepcopy(m.mask_decoder)
        mc.token_dim = token_dim
        if mc.feature_dim < 0:
            mc.feature_dim = encoder_width(setok)
        mdec = MaskDecoder(mc)
    if m.alignment is not None:
        ac = copy.deepcopy(m.alignment)
        ac.token_dim = token_dim
        align = ConceptAlignment(ac, load_weights=load_weights)
    return Stage1Model(setok, detok, mdec, align, recipe.loss, m.tokenizer.image_size, recipe.train.grad_accum,
                       cache_features=recipe.data.cache_features)


def build_stage1(recipe: Recipe, accelerator=None):
    """The stage builder of the trainer: -> (model, dataset)."""
    from ..data.datasets import build_dataset
    if not recipe.data.train:
        raise UserError("data.train lists no data file: give one or more SPEC-format JSON files")
    model = build_stage1_model(recipe)
    if recipe.model.stage1_from:
        init_from_stage1(model, recipe.model.stage1_from)
    sets = [build_dataset(p, recipe.data.format, recipe.data.image_size, recipe.data.cache)
            for p in recipe.data.train]
    offset = 0
    for d in sets:  # unique `index` keys across the data sets (the feature cache's keys)
        if hasattr(d, "index_offset"):
            d.index_offset = offset
        offset += len(d)
    dataset = sets[0] if len(sets) == 1 else ConcatDataset(sets)
    return model, dataset


def init_from_stage1(model: Stage1Model, path: str) -> list[str]:
    """Copy each part's weights from a stage-1 run / checkpoint (`model.stage1_from`) into the
    recipe's model; the parts must have the same architecture. -> the names of the parts copied.
    A part the recipe has but the checkpoint did not save is one UserError line."""
    from ..models.stage1 import load_stage1, stage1_folder
    folder = stage1_folder(path)
    names = [n for n in ("setok", "detokenizer", "mask_decoder", "alignment") if getattr(model, n) is not None]
    parts = load_stage1(folder, names)
    for name in names:
        src = parts[name]
        if src is None:
            raise UserError(f"model.stage1_from: {folder} saved no {name}/ (set model.{name}=null to leave it out)")
        try:
            getattr(model, name).load_state_dict(src.state_dict(), strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise UserError(f"model.stage1_from: {folder}/{name} does not fit the recipe's {name} ({first})") from None
    return names


def _encoder_architecture(spec: str) -> nn.Module:
    """An HF encoder adapter built from its config alone (random or meta weights)."""
    import json as _json
    import transformers

    from ..models.encoders import ADAPTERS
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        d = _json.loads((path / "config.json").read_text())
        model_type = d.get("model_type")
        if "vision_config" in d:          # a full CLIP / SigLIP folder: its vision tower
            d, model_type = d["vision_config"], model_type + "_vision_model"
    else:
        key = next((k for k in ENCODER_PRESETS if path.name.lower().startswith(k)), None)
        if key is None:
            raise UserError(f"encoder {spec!r} is not on disk and not a known architecture "
                            f"({', '.join(ENCODER_PRESETS)}); cannot size it")
        model_type, d = ENCODER_PRESETS[key]
    base = model_type.replace("_vision_model", "")
    adapter = ADAPTERS.get(base) or ADAPTERS.get(model_type)
    if adapter is None:
        raise UserError(f"encoder {spec!r}: model_type {model_type!r} has no adapter")
    cfg_cls = getattr(transformers, adapter.model_class.replace("Model", "Config"))
    cfg = cfg_cls(**{k: v for k, v in d.items() if k not in ("model_type", "architectures", "transformers_version")})
    with torch.device("meta"):      # the tower on meta; the adapter's small buffers stay real
        tower = getattr(transformers, adapter.model_class)(cfg)
    return adapter(tower, spec)


def meta_stage1_model(recipe: Recipe) -> Stage1Model:
    """The recipe's whole stage-1 model on the meta device: shapes and parameter counts,
    no memory, no files (pretrained folders are not read; known architectures stand in)."""
    from ..models.setok import SeTok, SeTokConfig
    cfg = SeTokConfig(**recipe.model.tokenizer.config)
    enc = None if cfg.encoder == "builtin" else _encoder_architecture(cfg.encoder)
    with torch.device("meta"):
        setok = SeTok(cfg, encoder=enc) if enc is not None else SeTok(cfg)
        return build_stage1_model(recipe, load_weights=False, setok=setok)


def parameter_report(model: Stage1Model) -> dict[str, dict[str, int]]:
    """{part: {"total": n, "trainable": n}} for the parts of a stage-1 model."""
    parts = {"setok.encoder": model.setok.encoder, "setok (merger + cluster head)": None,
             "detokenizer.mapper": getattr(model.detokenizer, "mapper", None),
             "detokenizer.unet": getattr(model.detokenizer, "unet", None),
             "detokenizer.vae": getattr(model.detokenizer, "vae", None),
             "mask_decoder": model.mask_decoder, "alignment": model.alignment}
    out = {}
    for name, mod in parts.items():
        if name.startswith("setok ("):
            ps = [p for n, p in model.setok.named_parameters() if not n.startswith("encoder.")]
        elif mod is None:
            continue
        else:
            ps = list(mod.parameters())
        out[name] = {"total": sum(p.numel() for p in ps), "trainable": sum(p.numel() for p in ps if p.requires_grad)}
    out["all"] = {"total": sum(v["total"] for v in out.values()),
                  "trainable": sum(v["trainable"] for v in out.values())}
    return out
