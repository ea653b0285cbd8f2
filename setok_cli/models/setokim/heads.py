"""Setokim's small parts: the input projector, the visual heads, the token order.

Shapes: tokens (N, T) or (B, K, T), hidden states (M, H), T the SeTok token width,
H the LM's hidden size.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import UserError
from .config import CodebookHeadConfig, DiffusionHeadConfig, SetokimConfig
from .place import NO_SEED, UNKNOWN_SEED, PlaceHead, flat_seeds, pack_seeds, place_features  # noqa: F401 (API)

__all__ = ["Projector", "MSEHead", "DiffusionHead", "CodebookHead", "CopyHead", "PlaceHead", "make_visual_head",
           "order_tokens", "order_seeds", "pack_seeds", "flat_seeds", "place_features", "zca", "NO_SEED",
           "UNKNOWN_SEED"]



class Projector(nn.Module):
    """LLaVA-1.5's `mlp2x_gelu`: tokens (..., T) -> embeddings (..., H)."""

    def __init__(self, token_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(token_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MSEHead(nn.Module):
    """The paper's regression head: hidden (M, H) -> token (M, T), trained with MSE."""

    def __init__(self, hidden: int, token_dim: int, width: Optional[int] = None):
        super().__init__()
        w = width or hidden
        self.net = nn.Sequential(nn.Linear(hidden, w), nn.GELU(), nn.Linear(w, token_dim))

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)

    def loss(self, h: Tensor, target: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        """Mean squared error over every element; 0 (with gradients) when M = 0. weight (M,):
        each token's share in a weighted mean (None: all alike)."""
        d = self(h).float() - target.float()
        if weight is None:
            return (d * d).sum() / max(d.numel(), 1)
        return (weight.float() * (d * d).sum(-1)).sum() / (weight.float().sum() * d.shape[-1]).clamp_min(1)

    def sample(self, h: Tensor, uncond: Optional[Tensor] = None, guidance: float = 1.0, **_) -> Tensor:
        """h (M, H) -> tokens (M, T); guided by `uncond` (M, H): x_u + g (x_c - x_u)."""
        x = self(h)
        if uncond is not None and guidance != 1:
            xu = self(uncond)
            x = xu + guidance * (x - xu)
        return x


class CopyHead(nn.Module):
    """A pointer from each visual token being written to the visual tokens its row has read
    (an edit's source image), so that what an edit leaves alone can be copied instead of
    regressed (pointer-generator networks, See et al. 2017, over SeTok tokens):

        copy_m = sum_j softmax_j(q_m . k_j / sqrt(d)) x_j      over the allowed j
        q_m = W_q h_m + E_out[rank_m],   k_j = W_k x_j + E_src[rank_j],   gate_m = sigmoid(w . h_m + b)
        token_m = gate_m * copy_m + (1 - gate_m) * visual_head(h_m)

    h (M, H) the hidden states that predict a token, rank (M,) that token's index in the
    image being written; x (S, T) the standardised source tokens, src_rank (S,) their index
    in their image; allowed (M, S) bool. -> copy (M, T), gate (M, 1), the gate 0 where a
    row has no allowed source (a generation from text: the visual head alone, as without
    the pointer). The rank embeddings let "the i-th written token copies the i-th read one"
    be learnt directly; W_q h and W_k x let the LM point elsewhere (after a removed object,
    the tokens shift by one)."""

    def __init__(self, hidden: int, token_dim: int, max_tokens: int, width: int = 64):
        super().__init__()
        self.width, self.max_tokens = width, max_tokens
        self.q = nn.Linear(hidden, width)
        self.k = nn.Linear(token_dim, width)
        self.out_rank = nn.Embedding(max_tokens, width)
        self.src_rank = nn.Embedding(max_tokens, width)
        self.gate = nn.Linear(hidden, 1)

    def forward(self, h: Tensor, rank: Tensor, x: Tensor, src_rank: Tensor, allowed: Tensor,
                hard: bool = False) -> Tensor:
        """hard: copy the one source the pointer weighs most (inference: an exact token
        instead of a blend; training uses the soft pointer)."""
        top = self.max_tokens - 1
        q = (self.q(h) + self.out_rank(rank.clamp(0, top))).float()                 # (M, d)
        k = (self.k(x) + self.src_rank(src_rank.clamp(0, top))).float()             # (S, d)
        s = (q @ k.t()) / self.width ** 0.5                                          # (M, S)
        s = s.masked_fill(~allowed, -1e9)           # a row with no source: uniform, then gated to 0
        a = torch.softmax(s, -1)                                                     # (M, S)
        if hard:
            a = F.one_hot(a.argmax(-1), a.shape[-1]).to(a.dtype)
        copy = a @ x.float()                                                         # (M, T)
        gate = torch.sigmoid(self.gate(h).float()) * allowed.any(1, keepdim=True)    # (M, 1)
        return copy, gate


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class _AdaLNBlock(nn.Module):
    """MAR's ResBlock: x + gate * MLP(modulate(LN(x), shift, scale)), all three from the condition."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.ada(y).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.norm(x), shift, scale))


class DiffusionHead(nn.Module):
    """MAR's per-token diffusion loss: a denoiser f(x_t, t | h) over one token (predicting
    v, x0 or eps: config.prediction_type), with diffusers' DDPM schedule for training and
    DDIM for few-step sampling.

    The AdaLN modulations and the output layer start at zero (MAR's init), so the
    untrained denoiser predicts 0 and the blocks start as the identity."""

    def __init__(self, hidden: int, token_dim: int, config: DiffusionHeadConfig):
        super().__init__()
        from diffusers import DDPMScheduler
        self.config = c = config
        self.token_dim = token_dim
        self.input_proj = nn.Linear(token_dim, c.width)
        self.time_mlp = nn.Sequential(nn.Linear(c.width, c.width), nn.SiLU(), nn.Linear(c.width, c.width))
        self.cond_proj = nn.Linear(hidden, c.width)
        self.blocks = nn.ModuleList(_AdaLNBlock(c.width) for _ in range(c.depth))
        self.final_norm = nn.LayerNorm(c.width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(c.width, 2 * c.width))
        self.out = nn.Linear(c.width, token_dim)
        for m in [b.ada[-1] for b in self.blocks] + [self.final_ada[-1], self.out]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        self.train_scheduler = DDPMScheduler(num_train_timesteps=c.num_train_timesteps, beta_schedule=c.beta_schedule,
                                             prediction_type=c.prediction_type, clip_sample=False)

    def denoise(self, x_t: Tensor, t: Tensor, h: Tensor) -> Tensor:
        """x_t (M, T), t (M,) integer timesteps, h (M, H) -> the prediction (M, T)."""
        from diffusers.models.embeddings import get_timestep_embedding
        temb = get_timestep_embedding(t, self.config.width, flip_sin_to_cos=True, downscale_freq_shift=0)
        y = self.time_mlp(temb.to(h.dtype)) + self.cond_proj(h)
        x = self.input_proj(x_t.to(h.dtype))
        for b in self.blocks:
            x = b(x, y)
        shift, scale = self.final_ada(y).chunk(2, dim=-1)
        return self.out(_modulate(self.final_norm(x), shift, scale))

    def loss(self, h: Tensor, target: Tensor, noise: Optional[Tensor] = None, timesteps: Optional[Tensor] = None,
             generator: Optional[torch.Generator] = None) -> Tensor:
        """h (M, H), target (M, T) -> the diffusion loss (mean over M * batch_mul * T).
        Each target is noised `batch_mul` times; `noise` (M * batch_mul, T) and
        `timesteps` (M * batch_mul,) may be given (tests), else drawn."""
        r = self.config.batch_mul
        x0 = target.float().repeat_interleave(r, 0)
        hh = h.repeat_interleave(r, 0)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        if timesteps is None:
            timesteps = torch.randint(0, self.config.num_train_timesteps, (x0.shape[0],), generator=generator,
                                      device=x0.device)
        sched = self.train_scheduler
        x_t = sched.add_noise(x0, noise, timesteps)
        if self.config.prediction_type == "epsilon":
            want = noise
        elif self.config.prediction_type == "sample":
            want = x0
        else:
            want = sched.get_velocity(x0, noise, timesteps)
        d = self.denoise(x_t, timesteps, hh).float() - want
        return (d * d).sum() / max(d.numel(), 1)

    def sampling_scheduler(self, steps: int):
        from diffusers import DDIMScheduler
        c = self.config
        spacing = c.timestep_spacing or ("leading" if c.prediction_type == "epsilon" else "trailing")
        s = DDIMScheduler.from_config(self.train_scheduler.config, timestep_spacing=spacing, set_alpha_to_one=True,
                                      clip_sample=False)
        s.set_timesteps(steps)
        return s

    @torch.no_grad()
    def sample(self, h: Tensor, steps: Optional[int] = None, temperature: Optional[float] = None,
               generator: Optional[torch.Generator] = None) -> Tensor:
        """h (M, H) -> tokens (M, T): DDIM (eta 0) from noise scaled by `temperature`."""
        temp = self.config.temperature if temperature is None else temperature
        sched = self.sampling_scheduler(steps or self.config.sample_steps)
        x = torch.randn((h.shape[0], self.token_dim), generator=generator, device=h.device) * temp
        for t in sched.timesteps:
            tt = torch.full((h.shape[0],), int(t), device=h.device, dtype=torch.long)
            x = sched.step(self.denoise(x, tt, h).float(), t, x).prev_sample
        return x


class CodebookHead(nn.Module):
    """A classifier over a codebook of real tokens: hidden (M, H) -> logits (M, C) over the
    codes (C, T), standardised k-means centres of the training images' tokens (`fit`).
    Trained with cross-entropy against each target token's nearest code; sampling draws a
    code (temperature 0: the most likely) and returns its centre, plus with `refine` an
    offset r(h, code) (M, T) regressed (MSE) to the target within its code. Where the MSE
    head writes the mean of every token a caption allows, this writes one of them.

    `keyed`: logits <q(h), k(code)> / sqrt(w) with k an MLP of the code itself (a retrieval
    head over real tokens; `codes: 0` makes every distinct fitted token a code).

    Classifier-free guidance: given the hidden states of the same rows without the condition
    (`uncond`), the logits are l_u + g (l_c - l_u) (LlamaGen, over codes)."""

    def __init__(self, hidden: int, token_dim: int, config: CodebookHeadConfig):
        super().__init__()
        self.config = c = config
        self.width = w = c.width or hidden
        C = max(c.codes, 1)
        self.net = nn.Sequential(nn.Linear(hidden, w), nn.GELU(), nn.Linear(w, w if c.keyed else C))
        self.key = nn.Sequential(nn.Linear(token_dim, w), nn.GELU(), nn.Linear(w, w)) if c.keyed else None
        self.code_emb = nn.Embedding(C, w) if c.refine and not c.keyed else None
        self.refine = (nn.Sequential(nn.Linear(hidden + w, w), nn.GELU(), nn.Linear(w, token_dim))
                       if c.refine else None)
        # random until fitted (a model built without data still samples something distinct)
        self.register_buffer("codes", torch.randn(C, token_dim))

    @torch.no_grad()
    def fit(self, x: Tensor) -> int:
        """k-means (scipy's kmeans2, k-means++ seeding) of standardised tokens x (N, T) into
        the codes; fewer distinct tokens than codes repeat some. Returns the number of codes."""
        import warnings

        from scipy.cluster.vq import kmeans2
        C = self.config.codes
        if x.shape[0] == 0:
            raise UserError("the codebook head needs tokens to fit its codes: the data has no images")
        uniq = torch.unique(x.detach().double().cpu(), dim=0)
        if C == 0:                                       # every distinct token is a code
            self.codes = uniq.to(self.codes)
            self.config.codes = uniq.shape[0]            # so that a saved model rebuilds this size
            return uniq.shape[0]
        if uniq.shape[0] <= C:                           # every distinct token is a code
            self.codes.copy_(uniq[torch.arange(C) % uniq.shape[0]].to(self.codes))
            return C
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")             # an emptied cluster keeps its centre
            centres, _ = kmeans2(x.detach().double().cpu().numpy(), C, iter=30, minit="++",
                                 seed=self.config.fit_seed)
        self.codes.copy_(torch.from_numpy(centres).to(self.codes))
        return C

    def assign(self, x: Tensor) -> Tensor:
        """x (M, T) standardised -> the index of each row's nearest code (M,)."""
        return torch.cdist(x.float(), self.codes.float()).argmin(-1)

    def forward(self, h: Tensor) -> Tensor:
        """h (M, H) -> logits (M, C)."""
        if self.key is None:
            return self.net(h)
        k = self.key(self.codes.to(h.dtype))                                     # (C, w)
        return self.net(h) @ k.t() / self.width ** 0.5

    def token(self, h: Tensor, idx: Tensor) -> Tensor:
        """h (M, H), code indices (M,) -> tokens (M, T): the centre, plus the refined offset."""
        out = self.codes.float()[idx]
        if self.refine is not None:
            e = self.code_emb(idx) if self.code_emb is not None else self.key(self.codes[idx].to(h.dtype))
            out = out + self.refine(torch.cat([h, e.to(h.dtype)], -1)).float()
        return out

    def loss(self, h: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy of the target's nearest code (mean over M), plus with `refine`
        refine_weight x the MSE of the refined token (teacher forced on the true code, mean
        over M x T); 0 (with gradients) when M = 0."""
        logits = self(h).float()
        idx = self.assign(target)
        loss = F.cross_entropy(logits, idx, reduction="sum") / max(h.shape[0], 1)
        if self.refine is not None:
            d = self.token(h, idx) - target.float()
            loss = loss + self.config.refine_weight * (d * d).sum() / max(d.numel(), 1)
        return loss

    @torch.no_grad()
    def sample(self, h: Tensor, temperature: Optional[float] = None, generator: Optional[torch.Generator] = None,
               uncond: Optional[Tensor] = None, guidance: float = 1.0, **_) -> Tensor:
        """h (M, H) -> tokens (M, T): a code drawn at `temperature` (guided by `uncond` (M, H)
        when guidance != 1), its centre plus the refined offset."""
        temp = self.config.temperature if temperature is None else temperature
        if uncond is not None and guidance != 1:        # one pass over both (keyed: the codes' keys once)
            logits, lu = self(torch.cat([h, uncond])).float().split(h.shape[0])
            logits = lu + guidance * (logits - lu)
        else:
            logits = self(h).float()
        if temp == 0 or h.shape[0] == 0:
            idx = logits.argmax(-1)
        else:
            idx = torch.multinomial(torch.softmax(logits / temp, -1), 1, generator=generator).squeeze(-1)
        return self.token(h, idx)


def make_visual_head(hidden: int, config: SetokimConfig) -> nn.Module:
    """The head `config.visual_head` names, over tokens of width config.token_dim."""
    c, T = config, int(config.token_dim)
    if c.visual_head == "mse":
        return MSEHead(hidden, T, c.mse_hidden)
    if c.visual_head == "diffusion":
        return DiffusionHead(hidden, T, c.diffusion)
    return CodebookHead(hidden, T, c.codebook)


def zca(z: Tensor, eps: float = 1e-2) -> Tensor:
    """ZCA whitening map of standardised tokens z (N, T): W (T, T) = U diag((l + eps)^-1/2) U^T
    from the eigen-decomposition U diag(l) U^T of their covariance, so z @ W has (about) unit
    variance in every direction, not only along each channel; eps keeps the directions of
    almost no variance from being blown up."""
    c = z - z.mean(0)
    cov = (c.t() @ c).double() / max(z.shape[0], 1)
    lam, U = torch.linalg.eigh(cov)
    return (U * (lam.clamp_min(0) + eps).rsqrt()) @ U.t()


def order_seeds(token_mask: Tensor, seeds: Tensor) -> Tensor:
    """The seeds (B, K) in the order `order_tokens` puts their tokens (NO_SEED where none)."""
    s, _ = order_tokens(seeds.unsqueeze(-1).float(), token_mask, seeds)
    return s.squeeze(-1).round().long()


def order_tokens(tokens: Tensor, token_mask: Tensor, seeds: Tensor) -> tuple[Tensor, Tensor]:
    """The generation order of an image's token set: by seed position in raster order
    (seeds are flat patch indices row * w + col), tokens without a seed (the scope
    remainder, seed -1) after them, padding last; ties keep the tokenizer's order.
    tokens (B, K, T), token_mask (B, K), seeds (B, K) -> tokens, token_mask reordered."""
    K = tokens.shape[1]
    big = torch.iinfo(torch.int64).max // 4
    key = torch.where(seeds >= 0, seeds.long(), torch.full_like(seeds, big, dtype=torch.long))
    key = torch.where(token_mask, key, torch.full_like(key, 2 * big))
    idx = key.argsort(dim=1, stable=True)                                   # (B, K)
    out = tokens.gather(1, idx.unsqueeze(-1).expand(-1, K, tokens.shape[-1]))
    return out, token_mask.gather(1, idx)
