"""Setokim: the LM, the projector, the visual and stop heads, and the stage-1 parts."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import UserError
from ..hub import CONFIG_NAME, PretrainedModel
from .config import SetokimConfig
from .heads import CopyHead, Projector, make_visual_head, order_seeds, order_tokens, zca
from .place import PlaceHead, drop_places, flat_seeds, pack_seeds
from .loading import STAGE1_PARTS, lm_config, load_lm, load_stage1, load_text_tokenizer, quiet, stage1_folder
from .lora import _base_state_dict, is_adapter_param, is_peft, load_adapters, wrap_lora  # noqa: F401 (is_peft: API)
from .splice import Spliced, after_prefix, length_groups, row_sums, splice, token_rank, with_copy  # noqa: F401 (API)
from .text import IMG_END, IMG_START

__all__ = ["Setokim", "SetokimOutput", "is_peft", "length_groups", "ADAPTER_DIR"]

ADAPTER_DIR = "adapter"


@dataclass
class SetokimOutput:
    loss: Tensor            # text (rows weighed by text_weight) + visual_loss_weight * visual + stop_loss_weight * stop
    text_loss: Tensor       # the plain mean over the counted text targets
    visual_loss: Tensor
    stop_loss: Tensor
    num_text: int           # counted text targets
    num_visual: int         # counted visual targets
    place_loss: Optional[Tensor] = None     # with a place head (in `loss`, weighted by place_loss_weight)
    text_rows: Optional[Tensor] = None      # (B, 2): each row's summed text cross-entropy (detached), its targets


class Setokim(PretrainedModel, model_type="setokim", config_class=SetokimConfig, part_name="Setokim model",
              subfolder="setokim"):
    """See the package docstring. Build with `Setokim.from_config(config)` (loads the LM,
    the text tokenizer and the stage-1 parts the config names), `Setokim.from_pretrained(folder)`
    or `Setokim.on_meta(config)`; the constructor takes parts already built."""

    # saved by their own save_pretrained in subfolders, not in model.safetensors
    _unsaved_prefixes = ("lm.", "setok.", "detokenizer.", "mask_decoder.")

    def __init__(self, config: SetokimConfig, *, lm: Optional[nn.Module] = None, text_tokenizer: Any = None,
                 setok: Optional[nn.Module] = None, detokenizer: Optional[nn.Module] = None,
                 mask_decoder: Optional[nn.Module] = None):
        super().__init__()
        if lm is None:
            raise UserError("Setokim needs a language model: build it with Setokim.from_config(config)")
        self.config = c = config
        self.lm = lm
        self.text_tokenizer = text_tokenizer
        self.setok, self.detokenizer, self.mask_decoder = setok, detokenizer, mask_decoder
        if setok is not None:
            T = int(setok.config.token_dim)
            if c.token_dim is not None and c.token_dim != T:
                raise UserError(f"token_dim {c.token_dim} does not match the SeTok's token_dim {T}")
            c.token_dim = T
        if c.token_dim is None:
            raise UserError("token_dim is unknown: give a stage-1 checkpoint (stage1) or token_dim")
        self._add_image_tokens()
        if c.lora is not None and not is_peft(self.lm):
            spec, c.lora = c.lora, None
            self.add_lora(spec)
        elif c.lora is None and is_peft(self.lm):
            raise UserError("the LM carries LoRA adapters but the config has no `lora`")
        H = int(lm.config.hidden_size)
        dev = lm.get_input_embeddings().weight.device
        with torch.random.fork_rng(devices=[]), torch.device(dev):
            torch.manual_seed(c.init_seed)
            self.projector = Projector(c.token_dim, H)
            self.visual_head = make_visual_head(H, c)
            self.stop_head = nn.Linear(H, 1)
            self.copy_head = CopyHead(H, c.token_dim, c.max_visual_tokens, c.copy_head) if c.copy_head else None
            self.place_head = PlaceHead(H, c.place_head, c.place_input) if c.place_head else None
        # tokens are standardised per channel before the projector and the heads (the
        # diffusion schedule assumes unit scale); `fit_token_stats` sets these from data
        self.register_buffer("token_mean", torch.zeros(c.token_dim, device=dev))
        self.register_buffer("token_std", torch.ones(c.token_dim, device=dev))
        if c.projector_whiten:
            self.register_buffer("token_whiten", torch.eye(c.token_dim, device=dev))
        for part in (self.detokenizer, self.mask_decoder):
            if part is not None:
                part.requires_grad_(False)
        if self.setok is not None and c.freeze_tokenizer:
            self.setok.requires_grad_(False)
        self.train(self.training)

    def _add_image_tokens(self) -> None:
        """[Img] and [/Img] into the text tokenizer (if missing) and the LM's embeddings.
        Without a tokenizer (sizing on meta) they are the two ids after the LM's vocabulary."""
        tok, emb = self.text_tokenizer, self.lm.get_input_embeddings()
        if tok is None:
            self.img_start_id, self.img_end_id = emb.num_embeddings, emb.num_embeddings + 1
            self.pad_id = self.eos_id = 0
            self.lm.resize_token_embeddings(emb.num_embeddings + 2, mean_resizing=False)
            return
        missing = [t for t in (IMG_START, IMG_END) if t not in tok.get_vocab()]
        if missing:
            tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        if tok.pad_token_id is None:          # Llama / Vicuna ship no pad token: LLaVA pads with unk
            tok.pad_token = tok.unk_token
        self.img_start_id, self.img_end_id = tok.convert_tokens_to_ids([IMG_START, IMG_END])
        self.pad_id, self.eos_id = tok.pad_token_id, tok.eos_token_id
        if emb.num_embeddings < len(tok):
            meta = emb.weight.device.type == "meta"
            self.lm.resize_token_embeddings(len(tok), mean_resizing=not meta)
        elif emb.num_embeddings > len(tok) and max(self.img_start_id, self.img_end_id) >= emb.num_embeddings:
            raise UserError(f"the text tokenizer ({len(tok)} tokens) does not fit the LM ({emb.num_embeddings})")

    # ---- building ----------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: SetokimConfig) -> "Setokim":
        """A fresh Setokim for training: the LM from its folder (or from scratch), the text
        tokenizer, the stage-1 parts of `config.stage1`."""
        if config.stage1 is None:
            raise UserError("stage1: give the stage-1 checkpoint (or run folder) Setokim reads and writes with")
        parts = load_stage1(stage1_folder(config.stage1))
        tok_path = config.text_tokenizer or (config.lm if isinstance(config.lm, str) else None)
        if tok_path is None:
            raise UserError("text_tokenizer: an LM built from a config needs a text tokenizer folder")
        tok = load_text_tokenizer(tok_path)
        vocab = len(tok) + sum(t not in tok.get_vocab() for t in (IMG_START, IMG_END))
        lm = load_lm(config.lm, config.lm_dtype, vocab, config.init_seed)
        return cls(config, lm=lm, text_tokenizer=tok, **parts)

    @classmethod
    def on_meta(cls, config: SetokimConfig, **parts) -> "Setokim":
        """The architecture on the meta device, for sizing (`setok train --dry-run`): no
        weights are read; an LM folder that is not on disk may be a known architecture
        (LM_PRESETS). `parts`: stage-1 modules already built (e.g. on meta)."""
        from transformers import AutoModelForCausalLM
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(lm_config(config.lm, None, True))
            return cls(config, lm=lm, **parts)

    @classmethod
    def _build_for_load(cls, config: SetokimConfig, folder: Path) -> "Setokim":
        if (folder / "setok" / CONFIG_NAME).is_file():
            parts = load_stage1(folder)
        elif config.stage1 is not None:          # saved with save_stage1=False: the reference
            parts = load_stage1(stage1_folder(config.stage1))
        else:
            parts = {}
        tok = load_text_tokenizer(folder / "tokenizer")
        lm = load_lm(str(folder / "lm"), config.lm_dtype, None, config.init_seed)
        if config.lora is not None:
            lm = load_adapters(lm, folder / ADAPTER_DIR)
        return cls(config, lm=lm, text_tokenizer=tok, **parts)

    # ---- LoRA (stage III) -------------------------------------------------------------
    @property
    def has_lora(self) -> bool:
        return is_peft(self.lm)

    def add_lora(self, spec) -> "Setokim":
        """Wrap the LM in fresh LoRA adapters (`peft`; B = 0, so the outputs are unchanged
        until they train). spec: a LoraSpec or its dict."""
        from .config import LoraSpec
        if self.has_lora:
            raise UserError("this Setokim already has LoRA adapters (merge them first: `setok export`)")
        spec = LoraSpec(**spec) if isinstance(spec, dict) else spec
        self.lm = wrap_lora(self.lm, spec, self.config.init_seed)
        self.config.lora = spec
        return self

    def merge_lora(self) -> "Setokim":
        """Fold the adapters into the LM's weights (`merge_and_unload`): a plain LM again,
        whose outputs equal the adapted model's up to rounding."""
        if not self.has_lora:
            raise UserError("this Setokim has no LoRA adapters to merge")
        self.lm = self.lm.merge_and_unload()
        self.config.lora = None
        return self

    def adapter_size(self) -> dict:
        """{"parameters": n, "bytes": n * itemsize} of what adapter/ holds: the LoRA factors and
        the trained copies of `modules_to_save` (0 without adapters)."""
        ps = [p for n, p in self.lm.named_parameters() if is_adapter_param(n)]
        return {"parameters": sum(p.numel() for p in ps), "bytes": sum(p.numel() * p.element_size() for p in ps)}

    # ---- saving ------------------------------------------------------------------------
    def config_to_save(self) -> dict:
        d = super().config_to_save()
        if isinstance(d["lm"], dict):
            d["lm"]["vocab_size"] = int(self.lm.config.vocab_size)
        return d

    def _save_pretrained(self, save_directory: Path) -> None:
        super()._save_pretrained(save_directory)
        d = Path(save_directory)
        import warnings
        with quiet(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)     # peft's own call of a renamed transformers API
            if self.has_lora:
                # lm/ holds the base LM as a plain folder (unchanged by stage III), adapter/
                # the adapters and trained module copies (peft's own format)
                base = self.lm.get_base_model()
                base.save_pretrained(d / "lm", state_dict=_base_state_dict(base))
                self.lm.save_pretrained(d / ADAPTER_DIR)
            else:
                self.lm.save_pretrained(d / "lm")
        if self.text_tokenizer is not None:
            self.text_tokenizer.save_pretrained(d / "tokenizer")
        for name in STAGE1_PARTS if self._save_stage1 else ():
            part = getattr(self, name)
            if part is not None:
                part.save_pretrained(d / name)

    _save_stage1 = True

    def save_pretrained(self, save_directory: Union[str, os.PathLike], save_stage1: bool = True,
                        **kwargs: Any) -> None:
        """The whole folder (config.json, model.safetensors, lm/, tokenizer/, setok/,
        detokenizer/, mask_decoder/) is written beside `save_directory` and renamed into
        place, so a crash leaves the old folder or the new one, never a mix.
        save_stage1=False leaves the (frozen, at paper scale multi-GB) stage-1 parts out:
        loading then reads them from config.stage1, the reference."""
        from huggingface_hub import PyTorchModelHubMixin

        from ...files import atomic_folder

        def write(tmp: Path) -> None:
            self._save_stage1 = save_stage1
            try:
                PyTorchModelHubMixin.save_pretrained(self, tmp, **kwargs)
            finally:
                del self._save_stage1
        atomic_folder(save_directory, write)

    # ---- modes ------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "Setokim":
        """The stage-1 parts stay in eval mode while frozen."""
        super().train(mode)
        for name in STAGE1_PARTS:
            part = getattr(self, name, None)
            if part is not None and not any(p.requires_grad for p in part.parameters()):
                part.eval()
        return self

    # ---- tokens -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.projector.net[0].weight.device

    @property
    def head_dtype(self) -> torch.dtype:
        """The projector's and heads' dtype (they stay float32 under an LM loaded in bf16)."""
        return self.projector.net[0].weight.dtype

    def normalize(self, tokens: Tensor) -> Tensor:
        return (tokens - self.token_mean) / self.token_std

    def denormalize(self, x: Tensor) -> Tensor:
        return x * self.token_std + self.token_mean

    def project(self, x: Tensor) -> Tensor:
        """Standardised tokens (..., T) -> LM embeddings (..., H); with `projector_whiten` the
        projector reads them whitened (x @ token_whiten)."""
        if self.config.projector_whiten:
            x = x @ self.token_whiten.to(x.dtype)
        return self.projector(x)

    @torch.no_grad()
    def fit_token_stats(self, tokens: Tensor, token_mask: Tensor, floor: float = 1e-3) -> None:
        """Per-channel mean and std of the valid tokens: tokens (N, K, T), token_mask (N, K);
        with `projector_whiten` also the ZCA map of the standardised tokens (norm.zca)."""
        v = tokens[token_mask].float()
        self.token_mean.copy_(v.mean(0))
        self.token_std.copy_(v.std(0, unbiased=False).clamp_min(floor))
        if self.config.projector_whiten:
            self.token_whiten.copy_(zca(self.normalize(v)))

    def encode_images(self, pixel_values: Tensor, valid: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Images through the SeTok, in generation order: pixel_values (N, 3, S, S) ->
        tokens (N, K, T), token_mask (N, K)."""
        if self.setok is None:
            raise UserError("this Setokim has no SeTok (its stage-1 parts were not saved with it)")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_tokenizer):
            out = self.setok(pixel_values, valid)
        return self.order(out.tokens, out.token_mask, out.seeds)

    @torch.no_grad()
    def image_token_sets(self, images, seeds: bool = False):
        """Paths / PIL images / arrays -> [tokens (K_i, T)] in generation order (SeTok.tokenize's
        resize and padding), what `prompt_batch` takes; `seeds`: also [seeds (K_i,)] beside them."""
        if self.setok is None:
            raise UserError("this Setokim has no SeTok (its stage-1 parts were not saved with it)")
        return self.token_sets_of(self.setok.tokenize(images), seeds)

    def token_sets_of(self, out, seeds: bool = False):
        """A SeTok output (tokens, token_mask, seeds) -> [tokens (K_i, T)] in generation order,
        and with `seeds` [seeds (K_i,)] beside them (flat patch indices, NO_SEED for none)."""
        tokens, mask = self.order(out.tokens, out.token_mask, out.seeds)
        sets = [t[m] for t, m in zip(tokens, mask)]
        if not seeds:
            return sets
        s = order_seeds(out.token_mask, out.seeds) if self.config.token_order == "raster" else out.seeds.long()
        return sets, [x[m] for x, m in zip(s, mask)]

    @property
    def reads_places(self) -> bool:
        return self.place_head is not None and self.place_head.inputs is not None

    def readable(self, sets: list, seeds: Optional[list]) -> list:
        """Token sets [(K_i, T)] and their seeds [(K_i,)] -> what `prompt_batch` takes as images:
        the sets, or (tokens, seeds) pairs when the model reads places (`config.place_input`)."""
        return list(zip(sets, seeds)) if self.reads_places and seeds is not None else list(sets)

    def read_sets(self, images) -> list:
        """Paths / PIL images / arrays -> their token sets as prompts take them (`readable`)."""
        return self.readable(*self.image_token_sets(images, seeds=True))

    def order(self, tokens: Tensor, token_mask: Tensor, seeds: Tensor) -> tuple[Tensor, Tensor]:
        if self.config.token_order == "given":
            return tokens, token_mask
        return order_tokens(tokens, token_mask, seeds)

    def collate(self, samples) -> dict:
        """Training samples -> `forward`'s keyword arguments. A sample is
        {"conversations": LLaVA turns, "images": [tokens (K_i, T)] in reading order (ordered
        as `encode_images` / `image_token_sets` give them), "seeds"?: [seeds (K_i,) or None]
        beside them (a place head's targets; None or missing: unknown), "id"?: for messages}."""
        from .text import IMAGE_TOKEN, collate_conversations, pack_token_sets, render_conversation
        rendered, sets, seeds = [], [], []
        for i, s in enumerate(samples):
            where, c = f"sample {s.get('id', i)}", self.config
            rendered.append(render_conversation(s["conversations"], self.text_tokenizer, where=where,
                                                image_placement=c.image_placement, system=c.system_prompt))
            imgs = list(s.get("images") or [])
            need = sum(str(t.get("value", "")).count(IMAGE_TOKEN) for t in s["conversations"])
            if need != len(imgs):
                raise UserError(f"{where}: {need} <image> mark(s) but {len(imgs)} image(s)")
            sets += imgs
            seeds += list(s.get("seeds") or [None] * len(imgs))
        input_ids, labels, attention_mask = collate_conversations(rendered, self.pad_id)
        tokens, mask = pack_token_sets(sets, self.config.token_dim)
        out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
               "image_tokens": tokens, "image_token_mask": mask}
        if self.place_head is not None:
            out["image_token_seeds"] = pack_seeds(seeds, sets, mask)
        return out

    # ---- forward ----------------------------------------------------------------------
    def splice(self, input_ids: Tensor, labels: Optional[Tensor], attention_mask: Optional[Tensor],
               image_token_mask: Optional[Tensor], padding_side: str = "right") -> Spliced:
        return splice(input_ids, labels, attention_mask, image_token_mask, img_start_id=self.img_start_id,
                      img_end_id=self.img_end_id, pad_id=self.pad_id, max_length=self.config.max_length,
                      padding_side=padding_side)

    def embed(self, sp: Spliced, image_tokens: Optional[Tensor], image_token_mask: Optional[Tensor],
              image_token_seeds: Optional[Tensor] = None) -> Tensor:
        """The spliced sequence's input embeddings (B, L, H): text ids through the LM's
        table, visual tokens through the projector (plus their places' embeddings when the
        model reads places; image_token_seeds (N, K), None: unknown)."""
        emb = self.lm.get_input_embeddings()(sp.ids.clamp(min=0))
        if sp.vis_dst.numel():
            src = image_tokens[image_token_mask][sp.vis_src]
        else:   # no image: the projector still runs, on nothing (LLaVA's [0:0]), so DDP sees its grads
            src = emb.new_zeros(0, int(self.config.token_dim))
        vis = self.project(self.normalize(src).to(self.head_dtype))
        if self.reads_places:
            vis = vis + self.place_head.read(flat_seeds(image_token_seeds, image_token_mask, sp.vis_src, vis))
        B, L, H = emb.shape
        return emb.reshape(B * L, H).index_copy(0, sp.vis_dst, vis.to(emb.dtype)).view(B, L, H)

    def with_copy(self, *args, **kwargs) -> Tensor:
        """See `splice.with_copy` (the copy head's pointer mixed into the visual head's tokens)."""
        return with_copy(self, *args, **kwargs)

    @property
    def cache_kwarg(self) -> str:
        """The decoder's name for the KV cache argument (`cache` from transformers 5.x on)."""
        import inspect
        return "cache" if "cache" in inspect.signature(self.lm.get_decoder().forward).parameters else "past_key_values"

    def hidden(self, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor, **kw):
        """The LM's last hidden states (after its final norm: what its LM head reads)."""
        return self.lm.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                     position_ids=position_ids, **kw)

    def hidden_in_groups(self, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor,
                         groups: int = 1, prefix: bool = False) -> Tensor:
        """The last hidden states (B, L, H) of a right-padded batch (`splice.in_groups`, `splice.after_prefix`)."""
        return after_prefix(self.hidden, inputs_embeds, attention_mask, position_ids, groups, self.cache_kwarg,
                            min_prefix=2 if prefix else None)

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                image_tokens: Optional[Tensor] = None, image_token_mask: Optional[Tensor] = None,
                row_groups: int = 1, visual_weight: Optional[Tensor] = None,
                image_token_seeds: Optional[Tensor] = None, text_weight: Optional[Tensor] = None,
                prefix: bool = False) -> SetokimOutput:
        """input_ids, labels, attention_mask (B, L0) from `collate_conversations`; image_tokens (N, K, T),
        image_token_mask (N, K): the images of the batch in reading order, in generation order within each
        (`encode_images` / `order`); visual_weight (N, K): each written token's weight in the MSE head's loss;
        text_weight (B,): each row's on its text cross-entropy in `loss` (None: alike; `text_loss` stays the plain
        mean); image_token_seeds (N, K): the tokens' seeds. row_groups: run the LM over rows of similar length in up
        to this many groups; prefix: the prefix all rows share (BOS and the system prompt) run once (both
        `hidden_in_groups`: the same loss, less computed). In training, `place_dropout` of the images are given
        (read and conditioned on) at the unknown place (`drop_places`)."""
        sp = self.splice(input_ids, labels, attention_mask, image_token_mask)
        given = drop_places(image_token_seeds, self.config.place_dropout if self.training else 0.0)
        h = self.hidden_in_groups(self.embed(sp, image_tokens, image_token_mask, given),
                                  sp.attention_mask, sp.position_ids, row_groups, prefix)       # (B, L, H)
        lab = sp.labels[:, 1:]
        sel = lab != -100
        logits = self.lm.get_output_embeddings()(h[:, :-1][sel]).float()    # (n, V): only where counted
        ce, n_text = F.cross_entropy(logits, lab[sel], reduction="none"), int(sel.sum())     # (n,), n
        text_loss, text_rows = ce.sum() / max(n_text, 1), row_sums(ce.detach(), sel)     # (), (B, 2)
        w = 1.0 if text_weight is None else text_weight.to(ce)[sel.nonzero()[:, 0]]   # each counted token's row's
        hf = h.reshape(-1, h.shape[-1])
        if image_tokens is not None and image_token_mask is not None and image_token_mask.shape[0]:
            target = self.normalize(image_tokens[image_token_mask][sp.pred_src].float())
        else:
            target = hf.new_zeros(0, int(self.config.token_dim), dtype=torch.float32)
        hf = hf.to(self.head_dtype)                         # an LM loaded in bf16 under fp32 heads
        hp = hf[sp.pred_pos]
        place_loss = None
        if self.place_head is not None:         # where first, then the token there (PlaceHead)
            place_loss = self.place_head.loss(hp, flat_seeds(image_token_seeds, image_token_mask, sp.pred_src, hp))
            hp = self.place_head.condition(hp, flat_seeds(given, image_token_mask, sp.pred_src, hp))
        if visual_weight is not None:          # only the MSE head takes weights (`loss.edit_changed`)
            visual_loss = self.visual_head.loss(hp, target, visual_weight.to(hp.device)[image_token_mask][sp.pred_src])
        elif self.copy_head is None:
            visual_loss = self.visual_head.loss(hp, target)
        else:   # pointer-generator: gate * copy + (1 - gate) * head; the head's own MSE beside, weighted
            own = self.visual_head(hp).float()
            d = self.with_copy(own, sp, image_tokens, image_token_mask, hp, sp.pred_pos,
                               token_rank(image_token_mask)[sp.pred_src]) - target
            e = own - target
            visual_loss = ((d * d).sum() + self.config.copy_head_own_loss * (e * e).sum()) / max(d.numel(), 1)
        stop_logits = self.stop_head(hf[sp.stop_pos]).squeeze(-1).float()
        stop_loss = F.binary_cross_entropy_with_logits(stop_logits, sp.stop_target, reduction="sum") \
            / max(sp.stop_pos.numel(), 1)
        loss = (ce * w).sum() / max(n_text, 1) + self.config.visual_loss_weight * visual_loss \
            + self.config.stop_loss_weight * stop_loss                          # the text term row-weighted
        if place_loss is not None:
            loss = loss + self.config.place_loss_weight * place_loss
        return SetokimOutput(loss, text_loss, visual_loss, stop_loss, n_text, int(sp.pred_pos.numel()), place_loss,
                             text_rows)

    def generate(self, *args, **kwargs):
        """See `setokim.generate.generate`."""
        from .generate import generate
        return generate(self, *args, **kwargs)
