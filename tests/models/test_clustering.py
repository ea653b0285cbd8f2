"""Clustering modes (SPEC section 3) on top of the ops."""
import pytest
import torch

from setok_cli.models.clustering import cluster
from setok_cli.models.position import sincos_2d


def blobs(B=2, per=(12, 9, 15), D=6, sep=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(per), D, generator=g) * sep
    x = torch.cat([centres[i] + 0.05 * torch.randn(n, D, generator=g) for i, n in enumerate(per)])
    return x.unsqueeze(0).repeat(B, 1, 1), torch.cat([torch.full((n,), i) for i, n in enumerate(per)])


@pytest.mark.parametrize("mode", ["hard", "soft", "threshold", "fixed"])
def test_modes_shapes_and_cover(mode):
    x, _ = blobs()
    valid = torch.ones(2, x.shape[1], dtype=torch.bool)
    valid[1, 30:] = False
    c = cluster(x, mode, k=4, bandwidth=0.5, max_tokens=6, min_scope=0.1 if mode == "soft" else 0.0,
                threshold=0.1, min_clusters=3, valid=valid)
    B, K, N = c.masks.shape
    assert K == int(c.num_tokens.max()) and (c.num_tokens <= 6).all()
    assert (c.labels[~valid] == -1).all() and (c.labels[valid] >= 0).all()
    assert (c.labels < c.num_tokens.view(B, 1)).all()
    assert (c.masks[:, :, ~valid[1]][1] == 0).all()
    if mode != "soft":  # hard assignments: one-hot columns that sum to valid
        assert torch.allclose(c.masks.sum(1), valid.float(), atol=1e-6)
        assert torch.equal(c.masks.argmax(1)[valid], c.labels[valid])
    seeds_ok = c.seeds >= 0
    # a seed lies in its own token's region
    b, t = seeds_ok.nonzero(as_tuple=True)
    assert torch.equal(c.labels[b, c.seeds[b, t]], t)


@pytest.mark.parametrize("mode", ["hard", "threshold", "fixed"])
def test_separated_blobs_are_found(mode):
    x, truth = blobs(B=1)
    c = cluster(x, mode, k=4, bandwidth=0.5, max_tokens=3 if mode == "fixed" else 8, threshold=0.5,
                min_clusters=3)
    assert int(c.num_tokens[0]) == 3
    lab = c.labels[0]
    for i in range(3):  # each true blob is exactly one token
        assert lab[truth == i].unique().numel() == 1
    assert lab.unique().numel() == 3


def test_remainder_becomes_a_token_and_max_tokens_holds():
    x, _ = blobs(B=1, per=(5, 5, 5, 5, 5), sep=5.0)
    c = cluster(x, "hard", k=2, bandwidth=0.3, max_tokens=3)
    assert int(c.num_tokens[0]) == 3  # 2 clusters + the remainder (3 blobs)
    assert int(c.seeds[0, 2]) == -1 and (c.labels[0] == 2).sum() == 15
    c = cluster(x, "hard", k=2, bandwidth=0.3, max_tokens=8)
    assert int(c.num_tokens[0]) == 5 and (c.seeds[0] >= 0).all()  # no remainder: no extra token


def test_gradients_reach_features():
    x, _ = blobs(B=1)
    x = x.clone().requires_grad_(True)
    for mode in ("hard", "soft", "fixed"):
        c = cluster(x, mode, k=4, bandwidth=2.0, max_tokens=4, min_scope=0.1)
        (c.masks * torch.randn_like(c.masks)).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        x.grad = None


def test_sincos_2d():
    pe = sincos_2d(16, 3, 5)
    assert pe.shape == (3, 5, 16) and pe.abs().max() <= 1
    assert torch.allclose(pe[0, 0, :8], torch.tensor([0.0] * 4 + [1.0] * 4))
    assert sincos_2d(18, 2, 2)[..., 16:].abs().sum() == 0  # channels past 4 * (dim // 4) are zero
