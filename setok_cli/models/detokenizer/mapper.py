"""The detokenizer's feature mapper: Q learnable queries cross-attend to a variable set of
tokens (a BERT-shaped Q-Former, `transformers`' Blip2QFormerModel), padding masked out.

    tokens (B, K, T) + token_mask (B, K) -> (B, Q, C), or (B, Q + K, C) with `append_tokens`
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ...errors import UserError

__all__ = ["MAPPER_PRESETS", "MapperConfig", "TokenMapper", "bert_to_qformer_state_dict", "nonempty"]

# BERT-base shapes (paper appendix D: "initialize the backbone with BERT-base").
MAPPER_PRESETS: dict[str, dict[str, Any]] = {
    "bert-base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
}


@dataclass
class MapperConfig:
    """`cross_attention_frequency` f puts cross-attention in layers 0, f, 2f, ...: the
    paper's four cross-attention layers in BERT-base's 12 layers is f = 3."""
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
    # also hand the UNet the tokens themselves (projected to output_dim) after the Q queries:
    # encoder_hidden_states (B, Q + K, C), padding rows masked. For a UNet trained from
    # scratch; the paper's mapper is Q only.
    append_tokens: bool = False


def resolved_mapper(c: MapperConfig) -> MapperConfig:
    """The config with its preset's shapes filled in."""
    if c.preset is None:
        return c
    if c.preset not in MAPPER_PRESETS:
        raise UserError(f"unknown mapper preset {c.preset!r}; choose from {sorted(MAPPER_PRESETS)}")
    d = asdict(c)
    d.update(MAPPER_PRESETS[c.preset])
    d["preset"] = None
    return MapperConfig(**d)


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


def nonempty(token_mask: Tensor) -> Tensor:
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
        self.config = c = resolved_mapper(config)
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
        mask = nonempty(token_mask)  # a row with no valid token would attend to nothing (NaN)
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
        mask = nonempty(token_mask)
        return torch.cat([mask.new_ones(mask.shape[0], self.config.num_queries), mask], 1)

