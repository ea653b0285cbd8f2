"""Loads the compiled extension and registers what the dispatcher needs from Python:
fake (meta) kernels for torch.compile and autograd for the differentiable ops.

Schemas live in csrc/torch/registration.cpp; CPU and CUDA kernels in their own files.
"""
from __future__ import annotations

import warnings

import torch

try:
    from .. import _C  # noqa: F401  (registers torch.ops.setok.*)

    HAS_EXT = True
    IMPORT_ERROR = None
    _BUILD = dict(_C.build_info())
except ImportError as e:  # pragma: no cover - exercised only without a build
    _C = None
    HAS_EXT = False
    IMPORT_ERROR = e
    _BUILD = {}
    warnings.warn(
        f"setok: compiled ops unavailable ({e}); using the pure-PyTorch reference backend. "
        "Build them with `pip install --no-build-isolation -e .`",
        RuntimeWarning,
        stacklevel=2,
    )


def build_info() -> dict:
    """What the extension was built with (empty without the extension)."""
    return dict(_BUILD)


def has_backend(name: str) -> bool:
    if name == "reference":
        return True
    if not HAS_EXT:
        return False
    if name == "cpu":
        return True
    if name == "cuda":
        return bool(_BUILD.get("with_cuda")) and torch.cuda.is_available()
    return False


if HAS_EXT:
    lib = "setok::"

    def _bn(x):
        return x.shape[0], x.shape[1]

    @torch.library.register_fake(lib + "knn_density")
    def _(x, k, valid):
        B, N = _bn(x)
        return x.new_empty((B, N))

    @torch.library.register_fake(lib + "delta_distance")
    def _(x, density, valid):
        B, N = _bn(x)
        return x.new_empty((B, N)), x.new_empty((B, N), dtype=torch.int64)

    @torch.library.register_fake(lib + "dpc_scores")
    def _(x, k, valid):
        B, N = _bn(x)
        return (x.new_empty((B, N)), x.new_empty((B, N)), x.new_empty((B, N), dtype=torch.int64),
                x.new_empty((B, N)))

    def _fake_scope(x, T):
        B, N = _bn(x)
        return (x.new_empty((B, T + 1, N)), x.new_empty((B, T), dtype=torch.int64),
                x.new_empty((B,), dtype=torch.int64), x.new_empty((B, T, N)))

    @torch.library.register_fake(lib + "scope_cluster")
    def _(x, score, bandwidth, max_clusters, hard, min_scope, score_threshold, valid):
        return _fake_scope(x, max_clusters)

    @torch.library.register_fake(lib + "dpc_cluster")
    def _(x, k, bandwidth, max_clusters, hard, min_scope, score_threshold, valid):
        B, N = _bn(x)
        f = x.new_empty((B, N))
        return (f, x.new_empty((B, N)), x.new_empty((B, N), dtype=torch.int64), x.new_empty((B, N)),
                *_fake_scope(x, max_clusters))

    @torch.library.register_fake(lib + "scope_cluster_backward")
    def _(grad_masks, x, seeds, seed_d2, valid, num_clusters, bandwidth, hard):
        return torch.empty_like(x)

    # --- autograd: masks -> x (straight-through in hard mode; SPEC 2.3) -------------
    def _setup_scope(ctx, inputs, output):
        x, bandwidth, hard, valid = inputs[0], inputs[2], inputs[4], inputs[7]
        masks, seeds, num, seed_d2 = output[-4:]
        ctx.save_for_backward(x, seeds, seed_d2, valid, num)
        ctx.bandwidth, ctx.hard = bandwidth, hard

    def _backward_scope(ctx, grad_masks):
        x, seeds, seed_d2, valid, num = ctx.saved_tensors
        if grad_masks is None:
            return None
        gx = torch.ops.setok.scope_cluster_backward(grad_masks.contiguous(), x, seeds, seed_d2, valid, num,
                                                    ctx.bandwidth, ctx.hard)
        return gx

    def _scope_bw(ctx, grad_masks, grad_seeds, grad_num, grad_sd2):
        return (_backward_scope(ctx, grad_masks),) + (None,) * 7

    def _cluster_bw(ctx, g_den, g_del, g_par, g_score, grad_masks, grad_seeds, grad_num, grad_sd2):
        return (_backward_scope(ctx, grad_masks),) + (None,) * 7

    torch.library.register_autograd(lib + "scope_cluster", _scope_bw, setup_context=_setup_scope)
    torch.library.register_autograd(lib + "dpc_cluster", _cluster_bw, setup_context=_setup_scope)
