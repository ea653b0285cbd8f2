"""The cluster merger: the packed varlen pass equals a plain per-cluster loop."""
import torch

from setok_cli.models.clustering import cluster
from setok_cli.models.merger import ClusterMerger, varlen_attention


def loop_oracle(m: ClusterMerger, x, labels, num_tokens, grid):
    """The paper's merger written plainly: one cluster at a time, one image at a time."""
    e = m.embed(x, grid)
    B = x.shape[0]
    K = int(num_tokens.max())
    out = torch.zeros(B, K, m.out.out_features)
    for b in range(B):
        us = []
        for i in range(int(num_tokens[b])):
            idx = (labels[b] == i).nonzero().flatten()
            z = e[b, idx].unsqueeze(0)
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


def test_packed_equals_loop_oracle():
    torch.manual_seed(0)
    x, c, grid = make_batch()
    assert (c.num_tokens > 4).all()
    m = ClusterMerger(12, dim=32, token_dim=16, depth=2, cross_depth=2, heads=2).eval()
    with torch.no_grad():
        packed = m(x, c.masks, c.labels, c.num_tokens, grid, hard=True)
        ref = loop_oracle(m, x, c.labels, c.num_tokens, grid)
    assert torch.allclose(packed, ref, atol=1e-5)
    pad = torch.arange(packed.shape[1]).view(1, -1) >= c.num_tokens.view(-1, 1)
    assert (packed[pad] == 0).all()


def test_soft_path_with_one_hot_masks_equals_packed():
    torch.manual_seed(1)
    x, c, grid = make_batch(seed=1)
    m = ClusterMerger(12, dim=32, token_dim=16).eval()
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
