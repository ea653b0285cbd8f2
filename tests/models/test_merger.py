"""The cluster merger: the packed varlen pass equals a plain per-cluster loop."""
import math

import pytest
import torch

from setok_cli.models.clustering import cluster
from setok_cli.models.merger import ClusterMerger, CropEncoder, relative_fourier, varlen_attention


def loop_oracle(m: ClusterMerger, x, labels, num_tokens, grid, pixels=None):
    """The paper's merger written plainly: one cluster at a time, one image at a time
    (with relative_pe: plus each patch's offset from its cluster's mean position; with a
    crop encoder: plus its CNN of the cluster's crop, one cluster at a time)."""
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
            u = z[0].mean(0)
            if pixels is not None:
                mask = (labels[b] == i).float().view(1, 1, h, w)
                u = u + m.crop(pixels[b:b + 1], mask)[0, 0]
            us.append(u)
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


@pytest.mark.parametrize("relative_pe,hidden", [(3, 16), (2, 8)])
def test_relative_mlp_packed_equals_loop_oracle(relative_pe, hidden):
    """relative_hidden (an MLP over the offsets' Fourier features): packed == per-cluster
    loop == soft path with one-hot masks."""
    torch.manual_seed(4)
    x, c, grid = make_batch(seed=4)
    m = ClusterMerger(12, dim=32, token_dim=16, relative_pe=relative_pe, relative_hidden=hidden).eval()
    assert isinstance(m.rel_proj, torch.nn.Sequential)
    with torch.no_grad():
        packed = m(x, c.masks, c.labels, c.num_tokens, grid, hard=True)
        soft = m(x, c.masks, c.labels, c.num_tokens, grid, hard=False)
        ref = loop_oracle(m, x, c.labels, c.num_tokens, grid)
    assert torch.allclose(packed, ref, atol=1e-5)
    assert torch.allclose(soft, ref, atol=1e-5)


@pytest.mark.parametrize("relative_pe", [0, 3])
def test_crop_encoder_packed_equals_loop_oracle(relative_pe):
    torch.manual_seed(3)
    x, c, grid = make_batch()
    m = ClusterMerger(12, dim=32, token_dim=16, relative_pe=relative_pe, crop=8, crop_width=4).eval()
    pixels = torch.rand(x.shape[0], 3, grid[0] * 4, grid[1] * 4)
    with torch.no_grad():
        packed = m(x, c.masks, c.labels, c.num_tokens, grid, hard=True, pixels=pixels)
        ref = loop_oracle(m, x, c.labels, c.num_tokens, grid, pixels=pixels)
        soft = m(x, c.masks, c.labels, c.num_tokens, grid, hard=False, pixels=pixels)
    assert torch.allclose(packed, ref, atol=1e-5)
    assert torch.allclose(soft, ref, atol=1e-5)
    with pytest.raises(ValueError, match="pass it as `pixels`"):
        m(x, c.masks, c.labels, c.num_tokens, grid)
    with pytest.raises(ValueError, match="multiple of 4"):
        CropEncoder(6, 4, 8)


def test_crop_encoder_boxes_and_crops_known_values():
    """The crop box is the square around the cluster's cells, widened by `margin` patches;
    the crop samples the image (in [-1, 1]) and the mask inside it; an empty mask gets
    the whole image."""
    h = w = 8
    enc = CropEncoder(4, 4, 8, margin=0.0)
    masks = torch.zeros(1, 2, h, w)
    masks[0, 0, 2:4, 4:6] = 1  # cells x 4..5, y 2..3
    box = enc.boxes(masks)[0]
    assert torch.allclose(box[0], torch.tensor([0.25, -0.25, 0.25]))  # x 4..6 / 8, y 2..4 / 8 of the side
    assert torch.allclose(box[1], torch.tensor([0.0, 0.0, 1.0]))  # empty: the whole image
    assert torch.allclose(CropEncoder(4, 4, 8, margin=1.0).boxes(masks)[0, 0],
                          torch.tensor([0.25, -0.25, 0.5]))
    # an image whose pixel value is its column index: the crop of token 0 covers columns 32..47 of 64
    px = torch.arange(64.0).view(1, 1, 1, 64).expand(1, 3, 64, 64) / 63
    crops = enc.crops(px, masks)  # (1, 2, 4, 4, 4)
    cols = (crops[0, 0, 0, 0] + 1) / 2 * 63  # first row of the red channel
    assert torch.allclose(cols, torch.tensor([33.5, 37.5, 41.5, 45.5]), atol=1e-4)
    # the mask, bilinear: 1 inside, blended with the outside a quarter cell from the box's edge
    edge = torch.tensor([0.75, 1.0, 1.0, 0.75])
    assert torch.allclose(crops[0, 0, 3], edge.view(4, 1) * edge.view(1, 4))


def test_crop_encoder_margin_on_a_non_square_grid():
    """On a tall 16 x 8 grid a patch spans 2/8 of the frame across and 2/16 down: a margin of
    one patch must widen the half-side by 2/8 (the wider patches), so that the box still
    holds one patch beside the cluster on both axes (2/16 left it half a patch short across)."""
    masks = torch.zeros(1, 1, 16, 8)
    masks[0, 0, 7:9, 3:5] = 1  # rows 7..8 of 16, columns 3..4 of 8: centred, 2 x 2 patches
    box = CropEncoder(4, 4, 8, margin=1.0).boxes(masks)[0, 0]
    # the mask's half-side is 2 columns of 8 = 0.25 of the frame's half-width 1 -> 0.5 with the margin
    assert torch.allclose(box, torch.tensor([0.0, 0.0, 0.5]))
    wide = CropEncoder(4, 4, 8, margin=1.0).boxes(masks.transpose(-1, -2))[0, 0]  # 8 x 16: the same box
    assert torch.allclose(wide, torch.tensor([0.0, 0.0, 0.5]))


def test_crop_encoder_sees_sub_patch_shape():
    """Two clusters with the same cells and features but different outlines inside those
    cells (a disc vs a square drawn in the pixels) give different tokens with a crop
    encoder, identical ones without."""
    h = w = 4
    lab = torch.zeros(1, h * w, dtype=torch.long)
    lab.view(h, w)[1:3, 1:3] = 1
    masks = torch.nn.functional.one_hot(lab, 2).transpose(1, 2).float()
    nt = torch.tensor([2])
    x = torch.zeros(1, h * w, 4)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disc = (((xx - 15.5) ** 2 + (yy - 15.5) ** 2) < 64).float()
    square = ((xx - 15.5).abs() < 8).float() * ((yy - 15.5).abs() < 8).float()
    a, b = (img.expand(1, 3, 32, 32) for img in (disc.view(1, 1, 32, 32), square.view(1, 1, 32, 32)))
    for crop in (0, 8):
        torch.manual_seed(0)
        m = ClusterMerger(4, dim=16, token_dim=8, depth=1, cross_depth=1, heads=2, crop=crop).eval()
        with torch.no_grad():
            ta = m(x, masks, lab, nt, (h, w), pixels=a if crop else None)
            tb = m(x, masks, lab, nt, (h, w), pixels=b if crop else None)
        assert torch.allclose(ta, tb) != bool(crop)


def test_crop_merger_runs_under_bf16_autocast():
    """train.mixed_precision bf16 on CPU: the packed merger with the crop encoder (which
    writes the valid rows into a zero tensor) runs forward and backward under autocast and
    stays close to float32."""
    torch.manual_seed(3)
    x, c, grid = make_batch()
    m = ClusterMerger(12, dim=32, token_dim=16, relative_pe=3, crop=8, crop_width=4)
    pixels = torch.rand(x.shape[0], 3, grid[0] * 4, grid[1] * 4)
    ref = m(x, c.masks, c.labels, c.num_tokens, grid, hard=True, pixels=pixels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, c.masks, c.labels, c.num_tokens, grid, hard=True, pixels=pixels)
    out.float().square().sum().backward()
    assert all(p.grad is not None for p in m.crop.parameters())
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()
