"""The cluster merger: the packed varlen pass equals a plain per-cluster loop."""
import math

import pytest
import torch

from setok_cli.models.clustering import cluster
from setok_cli.models.merger import ClusterMerger, relative_fourier, varlen_attention


def loop_oracle(m: ClusterMerger, x, labels, num_tokens, grid):
    """The paper's merger written plainly: one cluster at a time, one image at a time
    (with relative_pe: plus each patch's offset from its cluster's mean position)."""
    e = m.embed(x, grid)
    B = x.shape[0]
    h, w = grid
    K = int(num_tokens.max())
    out = torch.zeros(B, K, m.out.out_features)
    for b in range(B):
        us = []
        for i in range(int(num_tokens[b])):
            idx = (labels[b] == i).nonzero().flatten()
            z = e[b, idx].unsqueeze(0)
            if m.relative_pe:
                xy = torch.stack([idx % w, idx // w], -1).float() + 0.5  # patch centres, in patches
                off = (xy - xy.mean(0)) / max(h, w)
                z = z + m.rel_proj(relative_fourier(off, m.relative_pe))
            for blk in m.blocks:
                z = blk.dense(z)
            us.append(z[0].mean(0))
        u = torch.stack(us).unsqueeze(0)
        for blk in m.cross:
            u = blk.dense(u)
        out[b, :len(us)] = m.out(m.norm(u))[0]
    return out


def make_batch(B=3, h=7, w=9, D=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, h * w, D, generator=g)
    valid = torch.ones(B, h * w, dtype=torch.bool)
    valid[-1, 40:] = False  # a padded image
    c = cluster(x, "hard", k=4, bandwidth=1.1, max_tokens=14, valid=valid)
    return x, c, (h, w)


def test_relative_fourier_known_values():
    off = torch.tensor([[0.25, -0.5]])
    f = relative_fourier(off, 2)  # [sin x (pi, 2pi), cos x, sin y, cos y]
    ref = torch.tensor([[math.sin(math.pi / 4), math.sin(math.pi / 2), math.cos(math.pi / 4), math.cos(math.pi / 2),
                         math.sin(-math.pi / 2), math.sin(-math.pi), math.cos(-math.pi / 2), math.cos(-math.pi)]])
    assert torch.allclose(f, ref, atol=1e-6)


@pytest.mark.parametrize("relative_pe", [0, 3])
def test_packed_equals_loop_oracle(relative_pe):
    torch.manual_seed(0)
    x, c, grid = make_batch()
    assert (c.num_tokens > 4).all()
    m = ClusterMerger(12, dim=32, token_dim=16, depth=2, cross_depth=2, heads=2, relative_pe=relative_pe).eval()
    with torch.no_grad():
        packed = m(x, c.masks, c.labels, c.num_tokens, grid, hard=True)
        ref = loop_oracle(m, x, c.labels, c.num_tokens, grid)
    assert torch.allclose(packed, ref, atol=1e-5)
    pad = torch.arange(packed.shape[1]).view(1, -1) >= c.num_tokens.view(-1, 1)
    assert (packed[pad] == 0).all()


@pytest.mark.parametrize("relative_pe", [0, 3])
def test_soft_path_with_one_hot_masks_equals_packed(relative_pe):
    torch.manual_seed(1)
    x, c, grid = make_batch(seed=1)
    m = ClusterMerger(12, dim=32, token_dim=16, relative_pe=relative_pe).eval()
    with torch.no_grad():
        a = m(x, c.masks, c.labels, c.num_tokens, grid, hard=True)
        b = m(x, c.masks, c.labels, c.num_tokens, grid, hard=False)
    assert torch.allclose(a, b, atol=1e-5)


def test_varlen_attention_matches_per_sequence():
    torch.manual_seed(0)
    lens = torch.tensor([1, 0, 5, 9, 17, 3, 40])
    cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0))
    P = int(lens.sum())
    q, k, v = (torch.randn(P, 2, 8) for _ in range(3))
    out = varlen_attention(q, k, v, cu)
    for s in range(len(lens)):
        a, b = int(cu[s]), int(cu[s + 1])
        if a == b:
            continue
        ref = torch.nn.functional.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)))
        assert torch.allclose(out[a:b], ref.transpose(0, 1), atol=1e-5)


def test_gradients_reach_merger_and_masks():
    x, c, grid = make_batch()
    xg = x.clone().requires_grad_(True)
    c = cluster(xg, "hard", k=4, bandwidth=1.1, max_tokens=14)
    m = ClusterMerger(12, dim=32, token_dim=16)
    t = m(xg, c.masks, c.labels, c.num_tokens, grid, hard=True)
    t.square().sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_packed_gradients_equal_loop_oracle():
    torch.manual_seed(2)
    x, c, grid = make_batch(B=2, seed=2)
    m = ClusterMerger(12, dim=16, token_dim=8, depth=1, cross_depth=1)
    w = torch.randn(2, int(c.num_tokens.max()), 8)
    (m(x, c.masks, c.labels, c.num_tokens, grid) * w).sum().backward()
    packed = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    (loop_oracle(m, x, c.labels, c.num_tokens, grid) * w).sum().backward()
    for n, p in m.named_parameters():
        assert torch.allclose(packed[n], p.grad, atol=1e-5), n


def test_relative_pe_sees_the_shape_not_the_place():
    """With the absolute PE removed and equal features, two clusters pool (within the
    cluster) to the same vector when they have the same shape at different places, and to
    different vectors when their shapes differ: the relative PE sees shape, not place."""
    torch.manual_seed(2)
    h = w = 8
    m = ClusterMerger(4, dim=16, token_dim=8, depth=1, cross_depth=0, heads=2, relative_pe=3).eval()
    m.embed = lambda x, grid: m.in_proj(x)  # no absolute PE
    x = torch.zeros(1, h * w, 4)
    lab = torch.full((1, h * w), 2)
    grid_lab = lab.view(h, w)
    grid_lab[0:2, 0:3] = 0  # a 2 x 3 bar at the top left
    grid_lab[5:7, 4:7] = 1  # the same bar lower right
    grid_lab[3, 0] = 0  # ... the first one with one more patch: a different shape
    masks = torch.nn.functional.one_hot(lab, 3).transpose(1, 2).float()
    with torch.no_grad():
        u = m.pool_packed(m.embed(x, (h, w)), masks, lab, (h, w))[0]
    assert not torch.allclose(u[0], u[1], atol=1e-4)
    grid_lab[3, 0] = 2  # now the same shape
    masks = torch.nn.functional.one_hot(lab, 3).transpose(1, 2).float()
    with torch.no_grad():
        u = m.pool_packed(m.embed(x, (h, w)), masks, lab, (h, w))[0]
    assert torch.allclose(u[0], u[1], atol=1e-5)
