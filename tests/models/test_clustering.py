"""Clustering modes (SPEC section 3) on top of the ops."""
import math

import pytest
import torch

from setok_cli.models.clustering import cluster, connected_components, split_connected
from setok_cli.models.position import sincos_2d


def blobs(B=2, per=(12, 9, 15), D=6, sep=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(per), D, generator=g) * sep
    x = torch.cat([centres[i] + 0.05 * torch.randn(n, D, generator=g) for i, n in enumerate(per)])
    return x.unsqueeze(0).repeat(B, 1, 1), torch.cat([torch.full((n,), i) for i, n in enumerate(per)])


@pytest.mark.parametrize("mode", ["hard", "soft", "threshold", "fixed"])
def test_modes_shapes_and_cover(mode):
    x, truth = blobs()
    valid = torch.ones(2, x.shape[1], dtype=torch.bool)
    valid[1, 30:] = False  # image 1 keeps blobs 0 and 1 and 9 of blob 2's 15 patches
    c = cluster(x, mode, k=4, bandwidth=0.5, max_tokens=6, min_scope=0.1 if mode == "soft" else 0.0,
                threshold=0.1, min_clusters=3, valid=valid)
    B, K, N = c.masks.shape
    # three far-apart blobs: one token each; fixed mode takes max_tokens seeds (two blobs split)
    assert c.num_tokens.tolist() == ([6, 6] if mode == "fixed" else [3, 3]) and K == int(c.num_tokens.max())
    if mode != "fixed":
        for b in range(2):
            owners = [c.labels[b][(truth == i) & valid[b]].unique().tolist() for i in range(3)]
            assert sorted(o[0] for o in owners) == [0, 1, 2] and all(len(o) == 1 for o in owners)
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


@pytest.mark.parametrize("mode", ["hard", "soft", "threshold", "fixed"])
def test_image_without_valid_patch_has_no_token_and_finite_masks(mode):
    """An all-padding image in a batch: no token, zero masks (threshold / fixed gave NaN)."""
    x, _ = blobs()
    x = x.clone().requires_grad_(True)
    valid = torch.ones(2, x.shape[1], dtype=torch.bool)
    valid[1] = False
    c = cluster(x, mode, k=4, bandwidth=0.5, max_tokens=4, threshold=0.1, min_clusters=3, valid=valid)
    assert int(c.num_tokens[1]) == 0 and (c.labels[1] == -1).all() and (c.seeds[1] == -1).all()
    assert torch.isfinite(c.masks).all() and (c.masks[1] == 0).all()
    (c.masks * torch.randn_like(c.masks)).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[1] == 0).all()


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
    assert pe.shape == (3, 5, 16)
    # q = 4 frequencies per axis, omega_j = 10000^(-j/4): row 2, column 3
    assert pe[2, 3, 0].item() == pytest.approx(math.sin(2.0)) and pe[2, 3, 5].item() == pytest.approx(math.cos(0.2))
    assert pe[2, 3, 9].item() == pytest.approx(math.sin(0.3)) and pe[2, 3, 15].item() == pytest.approx(math.cos(3e-3))
    assert torch.allclose(pe[0, 0, :8], torch.tensor([0.0] * 4 + [1.0] * 4))
    assert sincos_2d(18, 2, 2)[..., 16:].abs().sum() == 0  # channels past 4 * (dim // 4) are zero


# ---------------------------------------------------------------- connectivity (hard)

def _cc_oracle(lab, h, w, connectivity):
    """scipy.ndimage.label per label value -> the smallest flat index of each piece."""
    import numpy as np
    from scipy import ndimage

    L = lab.view(h, w).numpy()
    ref = np.full(h * w, -1)
    st = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    for v in np.unique(L[L >= 0]):
        cc, n = ndimage.label(L == v, structure=st)
        cc = cc.ravel()
        for i in range(1, n + 1):
            ref[cc == i] = np.nonzero(cc == i)[0].min()
    return torch.from_numpy(ref)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_connected_components_match_scipy(connectivity):
    g = torch.Generator().manual_seed(connectivity)
    for trial in range(30):
        h, w = (int(v) for v in torch.randint(1, 13, (2,), generator=g))
        lab = torch.randint(-1, 1 + trial % 5, (3, h * w), generator=g)  # few labels: big snaky pieces
        comp = connected_components(lab, (h, w), connectivity)
        for b in range(3):
            assert torch.equal(comp[b], _cc_oracle(lab[b], h, w, connectivity)), (trial, b)


def test_split_connected_keeps_everything_consistent():
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        h, w = (int(v) for v in torch.randint(1, 11, (2,), generator=g))
        N, B = h * w, 3
        x = 2 * torch.randn(B, N, 4, generator=g)
        valid = torch.ones(B, N, dtype=torch.bool)
        if trial % 3 == 0:
            valid = torch.rand(B, N, generator=g) > 0.3  # may be disconnected
        if trial % 4 == 0:
            valid[2] = False
        mt, mp, conn = 2 + trial % 9, 1 + trial % 4, (4, 8)[trial % 2]
        xr = x.clone().requires_grad_(True)
        c = cluster(xr, "hard", k=3, bandwidth=0.4 + 0.1 * (trial % 10), max_tokens=mt, valid=valid)
        s = split_connected(c, xr, (h, w), valid, mt, mp, conn)
        assert (s.num_tokens <= mt).all() and s.masks.shape[1] == max(int(s.num_tokens.max()), 1)
        assert torch.equal(s.masks.sum(1), valid.float())  # one-hot columns
        assert torch.equal(s.masks.argmax(1)[valid], s.labels[valid]) and (s.labels[~valid] == -1).all()
        comp = connected_components(s.labels, (h, w), conn)
        vcomp = connected_components(torch.where(valid, 0, -1), (h, w), conn)
        for b in range(B):
            n = int(s.num_tokens[b])
            assert set(s.labels[b][valid[b]].tolist()) == set(range(n))
            assert (s.masks[b, n:] == 0).all() and (s.seeds[b, n:] == -1).all()
            one_part = vcomp[b][valid[b]].unique().numel() <= 1
            for t in range(n):
                sel = s.labels[b] == t
                if one_part:  # connected tokens, none below min_patches unless alone
                    assert comp[b][sel].unique().numel() == 1
                    assert sel.sum() >= mp or n == 1
                sd = int(s.seeds[b, t])
                assert sd == -1 or int(s.labels[b, sd]) == t
        (s.masks * torch.randn(s.masks.shape, generator=g)).sum().backward()
        assert xr.grad is not None and (B * N == 0 or torch.isfinite(xr.grad).all())


def test_split_connected_separates_far_apart_twins():
    # two identical blobs far apart on an 8 x 8 grid (same features: one token) -> two tokens
    h = w = 8
    x = torch.zeros(1, h * w, 3)
    lab = torch.zeros(h, w, dtype=torch.long)
    lab[1:3, 1:3] = 1
    lab[5:7, 5:7] = 1
    x[0, lab.flatten() == 1] = 5.0
    c = cluster(x, "hard", k=2, bandwidth=0.5, max_tokens=8)
    assert int(c.num_tokens[0]) == 2
    s = split_connected(c, x, (h, w), torch.ones(1, h * w, dtype=torch.bool), 8, 3, 4)
    assert int(s.num_tokens[0]) == 3
    L = s.labels[0].view(h, w)
    assert L[1, 1] != L[5, 5] and L[1:3, 1:3].unique().numel() == 1 and L[5:7, 5:7].unique().numel() == 1
    # max_tokens 2: no room for the second piece, it joins the nearest neighbouring token
    s = split_connected(c, x, (h, w), torch.ones(1, h * w, dtype=torch.bool), 2, 3, 4)
    assert int(s.num_tokens[0]) == 2


def test_fixed_mode_nearest_seed_equals_the_difference_formula():
    """The matmul distances of `nearest_seed_clusters` assign every patch as the plain
    (x - s)^2 sum does, far from the origin too, and duplicate features still give exactly
    the budget's number of tokens (each seed keeps its own patch)."""
    from setok_cli.models.clustering import nearest_seed_clusters, seed_scores
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 64, 16, generator=g) + torch.tensor([0.0, 500.0]).view(2, 1, 1)
    valid = torch.ones(2, 64, dtype=torch.bool)
    score = seed_scores(x, 8, valid)
    c = nearest_seed_clusters(x, score, torch.tensor([12, 12]), 0.6, valid)
    seeds = x.gather(1, c.seeds.clamp(min=0).unsqueeze(-1).expand(-1, -1, 16))
    ref = (x.unsqueeze(2) - seeds.unsqueeze(1)).square().sum(-1).argmin(-1)       # (B, N)
    assert torch.equal(c.labels, ref) and c.num_tokens.tolist() == [12, 12]
    dup = torch.zeros(1, 36, 4)
    dup[0, 18:] = 1.0                                    # two flat halves: many equal features
    full = nearest_seed_clusters(dup, seed_scores(dup, 4, valid[:1, :36]), torch.tensor([36]), 0.6,
                                 valid[:1, :36])
    assert full.num_tokens.tolist() == [36] and sorted(full.seeds[0].tolist()) == list(range(36))
