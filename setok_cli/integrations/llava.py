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

Reducers (x: (B, N, D) patch features on an h x w grid; all batched, batch order kept):

  setok      SeTok's clustering (models/clustering.py `cluster`), each cluster -> the mean
             of its features (Table 9). The clustering sees x / s (s: the image's feature
             spread, floor `feature_floor`) + 0.3 x 2-D sin-cos position embedding, as
             SeTok's `clustering_features`, so the bandwidth (0.6) is in units of the
             image's own spread and works for any tower. Without a budget: hard mode (the
             scope loop, then every token one connected region, as SeTok does), the
             image's natural count (at most max_tokens = 64). At a budget: fixed mode
             (paper Table 5), the budget's highest density-peak scores seed as many
             clusters, every patch to its nearest seed: exactly budget (fewer only when a
             seed wins no patch, e.g. an image of fewer distinct patches). With a stage-1
             SeTok (`setok=`), its own clustering and merger make the tokens instead (the
             tower width must be its encoder's).
  pool2d     2-D average pooling of the grid to r x c = budget cells (r <= c, the most
             square factorisation that fits the grid). Exactly budget.
  random     budget patches drawn without replacement (seeded), raster order kept. Exactly budget.
  tome       ToMe bipartite soft matching (Bolya et al. 2023) on cosine similarity of the
             features (ToMe uses the attention keys), size-weighted averages, repeated
             until budget tokens remain. Exactly budget.
  visionzip  VisionZip-style: the budget - c most important patches (dominant), and c =
             max(1, round(budget * 10 / 64)) contextual tokens (VisionZip's 54 + 10):
             uniformly spaced targets among the rest, every other remaining patch merged
             (averaged) into its most similar target. Exactly budget.
  prumerge   PruMerge-style: outliers of the importance by the IQR rule (> Q3 + 1.5 IQR);
             at a budget, filled up with spatially uniform samples of the other patches
             (PruMerge+), or cut to the most important; each kept token then becomes the
             importance-weighted average of its 8 nearest patches (itself included).
             Exactly budget; without one, the outlier count (at least 1).

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
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError

__all__ = ["METHODS", "NEEDS_IMPORTANCE", "IMPORTANCE_SUBSTITUTE", "reduce_features", "reduce_visual_tokens",
           "restore_visual_tokens", "splice_image_tokens", "feature_importance", "pool_shape", "BuiltinTower",
           "cluster_mean_tokens", "setok_clusters"]

METHODS = ("setok", "pool2d", "random", "tome", "visionzip", "prumerge")
NEEDS_IMPORTANCE = ("visionzip", "prumerge")
IMPORTANCE_SUBSTITUTE = "distance of each patch from the image's mean feature (no CLS attention in this tower)"
IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- arguments

def check_method(method: str, budget: Optional[int], num_patches: Optional[int] = None,
                 grid: Optional[tuple[int, int]] = None) -> None:
    """One UserError line for an unknown method or a budget that cannot be met."""
    if method not in METHODS:
        raise UserError(f"unknown reducer {method!r}; choose one of {', '.join(METHODS)}")
    if budget is None:
        if method not in ("setok", "prumerge"):
            raise UserError(f"reducer {method!r} needs a budget (tokens per image); only setok and prumerge "
                            f"have a natural count")
        return
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise UserError(f"budget must be a positive whole number of tokens per image, got {budget!r}")
    if method == "setok" and budget < 2:
        raise UserError("setok needs a budget of at least 2 tokens per image")
    if num_patches is not None and budget > num_patches:
        raise UserError(f"budget {budget} is larger than the {num_patches} visual tokens per image")
    if method == "pool2d" and grid is not None:
        pool_shape(budget, grid)


def pool_shape(budget: int, grid: tuple[int, int]) -> tuple[int, int]:
    """The most square r x c = budget with r <= h and c <= w (either orientation)."""
    h, w = grid
    best = None
    for r in range(1, budget + 1):
        if budget % r:
            continue
        c = budget // r
        if r <= h and c <= w:
            score = abs(math.log(r / c))
            if best is None or score < best[0]:
                best = (score, (r, c))
    if best is None:
        raise UserError(f"pool2d cannot make {budget} cells on a {h} x {w} grid (budget must be r x c "
                        f"with r <= {h}, c <= {w})")
    return best[1]


# ----------------------------------------------------------------------------- helpers

def feature_importance(x: Tensor) -> Tensor:
    """The substitute for the CLS attention: each patch's distance from the image's mean
    feature, normalised to sum 1 per image. x: (B, N, D) -> (B, N)."""
    d = (x.float() - x.float().mean(1, keepdim=True)).norm(dim=-1)
    return d / d.sum(1, keepdim=True).clamp_min(1e-12)


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """(B, M, D), (B, P, D) -> (B, M, P) cosine similarities."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).transpose(1, 2)


def _rows(t: Tensor, counts: Optional[Tensor] = None) -> list[Tensor]:
    """(B, K, D) -> [(K_b, D)] (the first counts[b] rows of each image)."""
    if counts is None:
        return list(t.unbind(0))
    return [t[b, : int(n)] for b, n in enumerate(counts.tolist())]


def cluster_mean_tokens(x: Tensor, labels: Tensor, num_tokens: Tensor) -> list[Tensor]:
    """The mean feature of every cluster. x (B, N, D), labels (B, N) in [0, K) (-1: no
    token), num_tokens (B,) -> [(K_b, D)]."""
    B, N, D = x.shape
    K = max(int(num_tokens.max().item()) if B else 0, 1)
    member = (labels >= 0).to(x.dtype)
    lab = labels.clamp(min=0)
    tot = x.new_zeros(B, K, D).scatter_add(1, lab.unsqueeze(-1).expand(B, N, D), x * member.unsqueeze(-1))
    cnt = x.new_zeros(B, K).scatter_add(1, lab, member)
    return _rows(tot / cnt.clamp(min=1).unsqueeze(-1), num_tokens)


def setok_clusters(x: Tensor, grid: tuple[int, int], max_tokens: int, *, mode: str = "hard", k: int = 8,
                   bandwidth: float = 0.6, pos_weight: float = 0.3, feature_floor: float = 1e-6,
                   connectivity: int = 4, min_region: int = 3):
    """SeTok's clustering of arbitrary tower features (the normalisation of
    `SeTok.clustering_features`; hard: the scope loop then connected tokens, at most
    max_tokens; fixed: the max_tokens best density-peak seeds). -> Clusters."""
    from ..models.clustering import cluster, split_connected
    from ..models.position import sincos_2d
    from ..models.setok import _masked_spread

    B, N, D = x.shape
    h, w = grid
    valid = torch.ones(B, N, dtype=torch.bool, device=x.device)
    z = x.float()
    z = z / _masked_spread(z, valid).clamp_min(feature_floor).view(B, 1, 1)
    if pos_weight:
        z = z + pos_weight * sincos_2d(D, h, w, device=x.device).view(1, N, D)
    c = cluster(z, mode, k=k, bandwidth=bandwidth, max_tokens=max_tokens, valid=valid)
    if connectivity and mode == "hard":
        c = split_connected(c, z, grid, valid, max_tokens, min_region, connectivity)
    return c


# ----------------------------------------------------------------------------- reducers

def _pool2d(x: Tensor, budget: int, grid: tuple[int, int]) -> list[Tensor]:
    B, N, D = x.shape
    h, w = grid
    r, c = pool_shape(budget, grid)
    g = x.reshape(B, h, w, D).permute(0, 3, 1, 2)
    return _rows(F.adaptive_avg_pool2d(g, (r, c)).flatten(2).transpose(1, 2))


def _random(x: Tensor, budget: int, seed: int) -> list[Tensor]:
    B, N, D = x.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    keys = torch.rand(B, N, generator=gen).to(x.device)
    idx = keys.topk(budget, dim=1).indices.sort(1).values  # raster order kept
    return _rows(x.gather(1, idx.unsqueeze(-1).expand(B, budget, D)))


def _tome(x: Tensor, budget: int) -> list[Tensor]:
    B, N, D = x.shape
    xs = x.float()
    size = xs.new_ones(B, N, 1)
    while xs.shape[1] > budget:
        n = xs.shape[1]
        a, b = xs[:, ::2], xs[:, 1::2]  # alternate partition (ToMe)
        sa, sb = size[:, ::2], size[:, 1::2]
        r = min(n - budget, a.shape[1])
        best, dst = _cosine(a, b).max(-1)  # (B, Na) each A token's most similar B token
        order = best.argsort(-1, descending=True)
        src, keep = order[:, :r], order[:, r:]
        dst = dst.gather(1, src)
        # size-weighted averages: sums of x * size and of size, then one division
        wa, wb = a * sa, b * sb
        wb = wb.scatter_add(1, dst.unsqueeze(-1).expand(B, r, D), wa.gather(1, src.unsqueeze(-1).expand(B, r, D)))
        sb = sb.scatter_add(1, dst.unsqueeze(-1), sa.gather(1, src.unsqueeze(-1)))
        keep_x = wa.gather(1, keep.unsqueeze(-1).expand(B, keep.shape[1], D))
        keep_s = sa.gather(1, keep.unsqueeze(-1))
        size = torch.cat([keep_s, sb], 1)
        xs = torch.cat([keep_x, wb], 1) / size
    return _rows(xs.to(x.dtype))


def _visionzip(x: Tensor, budget: int, importance: Tensor) -> list[Tensor]:
    B, N, D = x.shape
    c = max(1, round(budget * 10 / 64))
    d = budget - c
    order = torch.argsort(importance, dim=1, descending=True, stable=True)
    dom_idx = order[:, :d].sort(1).values
    rest = order[:, d:].sort(1).values  # (B, R) raster order
    R = N - d
    dominant = x.gather(1, dom_idx.unsqueeze(-1).expand(B, d, D))
    xr = x.gather(1, rest.unsqueeze(-1).expand(B, R, D))
    tpos = torch.linspace(0, R - 1, c, device=x.device).round().long()  # uniformly spaced targets
    targets = xr[:, tpos]  # (B, c, D)
    near = _cosine(xr, targets).argmax(-1)  # (B, R)
    near[:, tpos] = torch.arange(c, device=x.device)  # a target belongs to itself
    tot = x.new_zeros(B, c, D).scatter_add(1, near.unsqueeze(-1).expand(B, R, D), xr)
    cnt = x.new_zeros(B, c).scatter_add(1, near, torch.ones_like(near, dtype=x.dtype))
    ctx = tot / cnt.clamp(min=1).unsqueeze(-1)
    return _rows(torch.cat([dominant, ctx], 1))


def _prumerge(x: Tensor, budget: Optional[int], importance: Tensor, knn: int = 8) -> list[Tensor]:
    B, N, D = x.shape
    imp = importance.float()
    q1, q3 = torch.quantile(imp, 0.25, dim=1, keepdim=True), torch.quantile(imp, 0.75, dim=1, keepdim=True)
    outlier = imp > q3 + 1.5 * (q3 - q1)
    n_out = outlier.sum(1)
    if budget is None:
        counts = n_out.clamp(min=1)
    else:
        counts = torch.full_like(n_out, budget)
    # priority: outliers by importance, then (PruMerge+) evenly spread samples of the others
    # in raster order, then the rest by importance
    other = ~outlier
    M = other.sum(1, keepdim=True).clamp(min=1)
    fill = (counts.view(B, 1) - n_out.view(B, 1)).clamp(min=0)
    rank = other.long().cumsum(1) - 1  # raster rank among the others
    even = other & ((rank + 1) * fill // M > rank * fill // M)
    pri = imp / imp.amax(1, keepdim=True).clamp_min(1e-12)  # in [0, 1]
    pri = pri + 2.0 * even.float() + 4.0 * outlier.float()
    K = int(counts.max().item())
    # natural counts: image b keeps its first counts[b] picks, so those (its outliers, or its most
    # important patch) must come first; at a budget every image keeps K, in raster order
    idx = pri.topk(K, dim=1).indices
    if budget is not None:
        idx = idx.sort(1).values
    kept = x.gather(1, idx.unsqueeze(-1).expand(B, K, D))
    k = min(knn, N)
    nb = _cosine(kept, x).topk(k, dim=-1).indices  # (B, K, k) nearest patches, itself included
    w = imp.unsqueeze(1).expand(B, K, N).gather(2, nb).clamp_min(1e-12)  # importance weights (flat image: equal)
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    nbx = x.unsqueeze(1).expand(B, K, N, D).gather(2, nb.unsqueeze(-1).expand(B, K, k, D))
    merged = (w.unsqueeze(-1).to(x.dtype) * nbx).sum(2)
    return _rows(merged, counts if budget is None else None)


def reduce_features(x: Tensor, method: str, budget: Optional[int] = None, *, grid: Optional[tuple[int, int]] = None,
                    importance: Optional[Tensor] = None, seed: int = 0, setok: Optional[nn.Module] = None,
                    max_tokens: int = 64) -> list[Tensor]:
    """Patch features of a batch -> each image's visual tokens.

    x: (B, N, D); grid (h, w) with h * w = N (default: square); importance (B, N): the CLS
    attention to each patch (default: `feature_importance`, the stated substitute).
    budget: tokens per image (None: setok / prumerge natural counts; setok caps at
    max_tokens then). -> [(K_b, D)], one per image in batch order (setok with a stage-1
    model: (K_b, token_dim))."""
    if x.dim() != 3:
        raise UserError(f"features must be (B, N, D), got {tuple(x.shape)}")
    B, N, D = x.shape
    if grid is None:
        s = int(round(math.sqrt(N)))
        if s * s != N:
            raise UserError(f"{N} patches are not a square grid; pass grid=(h, w)")
        grid = (s, s)
    if grid[0] * grid[1] != N:
        raise UserError(f"grid {grid} does not hold the {N} patches")
    check_method(method, budget, N, grid)
    if method in NEEDS_IMPORTANCE and importance is None:
        importance = feature_importance(x)
    if method == "pool2d":
        return _pool2d(x, budget, grid)
    if method == "random":
        return _random(x, budget, seed)
    if method == "tome":
        return _tome(x, budget)
    if method == "visionzip":
        return _visionzip(x, budget, importance)
    if method == "prumerge":
        return _prumerge(x, budget, importance)
    # setok
    cap = budget if budget is not None else max_tokens
    if setok is not None:
        enc_dim = getattr(getattr(setok, "encoder", None), "hidden_size", D)
        if enc_dim != D:
            raise UserError(f"the stage-1 SeTok reads {enc_dim}-wide features, the tower gives {D}")
        with torch.no_grad():
            return _setok_merger(setok, x, grid, cap, "hard" if budget is None else "fixed")
    c = setok_clusters(x, grid, max(cap, 2), mode="hard" if budget is None else "fixed")
    return cluster_mean_tokens(x, c.labels, c.num_tokens)


def _setok_merger(setok: nn.Module, x: Tensor, grid: tuple[int, int], cap: int, mode: str) -> list[Tensor]:
    """A stage-1 SeTok's own clustering (in `mode`) and merger on the tower features."""
    import dataclasses

    B, N, D = x.shape
    old = setok.config
    cap = max(cap, 2) if mode == "fixed" else min(old.max_tokens, max(cap, 2))
    setok.config = dataclasses.replace(old, max_tokens=cap, mode=mode)
    try:
        out = setok(None, features=x.reshape(B, grid[0], grid[1], D))
    finally:
        setok.config = old
    return _rows(out.tokens, out.num_tokens)


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
    `method`'s tokens (see the module docstring), in place; returns the model.

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
