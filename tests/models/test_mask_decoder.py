import pytest
import torch

from setok_cli.models.mask_decoder import (MaskDecoder, MaskDecoderConfig, dice_loss, hungarian_match,
                                           instance_targets, mask_consistency_kl, mask_losses, segment_miou)


def _square_instances():
    ids = torch.zeros(1, 8, 8, dtype=torch.long)
    ids[0, :4, :4] = 1
    ids[0, 4:, 4:] = 2
    return ids


def test_hungarian_known_case():
    ids = _square_instances()
    targets, valid = instance_targets(ids, match_background=False)   # rows: object 1, object 2
    # token 0 predicts object 2, token 1 predicts nothing, token 2 predicts object 1
    logits = torch.full((1, 3, 8, 8), -10.0)
    logits[0, 0][ids[0] == 2] = 10.0
    logits[0, 2][ids[0] == 1] = 10.0
    (rows, cols), = hungarian_match(logits, torch.ones(1, 3, dtype=torch.bool), targets, valid)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 2: 0}


def test_hungarian_respects_token_mask():
    ids = _square_instances()
    targets, valid = instance_targets(ids, match_background=False)
    logits = torch.full((1, 3, 8, 8), -10.0)
    logits[0, 0][ids[0] == 2] = 10.0
    logits[0, 2][ids[0] == 1] = 10.0
    mask = torch.tensor([[True, True, False]])     # the perfect token 2 is padding
    (rows, cols), = hungarian_match(logits, mask, targets, valid)
    assert set(rows.tolist()) <= {0, 1} and dict(zip(rows.tolist(), cols.tolist()))[0] == 1


def test_dice_known_masks():
    a = torch.tensor([[1., 1., 0., 0.]])
    b = torch.tensor([[1., 0., 1., 0.]])
    # 2 * 1 / (2 + 2) = 0.5 plus smoothing eps=0: exactly 0.5
    assert dice_loss(a, b, eps=0.0).item() == pytest.approx(0.5)
    assert dice_loss(a, a, eps=0.0).item() == pytest.approx(0.0)
    assert dice_loss(a, 1 - a, eps=0.0).item() == pytest.approx(1.0)


def test_mask_losses_perfect_below_wrong():
    ids = _square_instances()
    good = torch.full((1, 3, 8, 8), -8.0)
    for k in range(3):
        good[0, k][ids[0] == k] = 8.0
    bad = torch.randn(1, 3, 8, 8)
    tm = torch.ones(1, 3, dtype=torch.bool)
    lg, lb = mask_losses(good, tm, ids), mask_losses(bad, tm, ids)
    assert lg["dice"] < 0.01 and lg["bce"] < 0.01
    assert lb["dice"] > lg["dice"] and lb["bce"] > lg["bce"]


def test_kl_zero_when_consistent_and_grad_flows():
    ids = _square_instances()
    M = torch.nn.functional.one_hot(ids, 3).permute(0, 3, 1, 2).float()   # (1, 3, 8, 8) on an 8x8 grid
    M = M.clone().requires_grad_(True)
    logits = (M.detach() * 30 - 15).repeat_interleave(2, -1).repeat_interleave(2, -2)  # 16x16 decoder
    kl = mask_consistency_kl(M, logits, torch.ones(1, 3, dtype=torch.bool))
    assert kl.item() < 1e-3
    shuffled = logits[:, [1, 2, 0]]
    kl2 = mask_consistency_kl(M, shuffled, torch.ones(1, 3, dtype=torch.bool))
    assert kl2.item() > 5
    kl2.backward()
    assert M.grad is not None and M.grad.abs().sum() > 0


def test_decoder_shapes_miou_and_roundtrip(tmp_path):
    cfg = MaskDecoderConfig(token_dim=16, feature_dim=4, embed_dim=8, pixel_channels=8)
    dec = MaskDecoder(cfg)
    imgs, toks, feats = torch.rand(2, 3, 16, 16), torch.randn(2, 5, 16), torch.randn(2, 4, 4, 4)
    logits = dec(imgs, toks, feats)
    assert logits.shape == (2, 5, 16, 16)
    dec.save_pretrained(tmp_path)
    dec2 = MaskDecoder.from_pretrained(tmp_path)
    assert torch.equal(dec2(imgs, toks, feats), logits)
    ids = _square_instances()
    perfect = torch.nn.functional.one_hot(ids, 3).permute(0, 3, 1, 2).float() * 10
    miou, per = segment_miou(perfect, torch.ones(1, 3, dtype=torch.bool), ids)
    assert miou == pytest.approx(1.0) and len(per) == 2
    half = perfect.clone()
    half[0, 1, :2, :4] = -10       # object 1 loses half its pixels to the background token
    half[0, 0, :2, :4] = 10
    miou, per = segment_miou(half, torch.ones(1, 3, dtype=torch.bool), ids)
    assert sorted(per) == pytest.approx([0.5, 1.0])


def test_stem_sees_y_then_x_coordinates():
    """With coord_channels the stem's input is RGB, then y, then x, each from -1 at the first
    pixel to 1 at the last (the order its convolution was trained with)."""
    from setok_cli.models.position import coord_grid
    dec = MaskDecoder(MaskDecoderConfig(num_convs=1))
    seen = []
    dec.stem.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    dec.pixel_embeddings(torch.zeros(2, 3, 3, 5))
    x = seen[0]
    assert x.shape == (2, 5, 3, 5)
    assert torch.equal(x[0, 3, :, 0], torch.tensor([-1.0, 0.0, 1.0]))          # y down the rows
    assert torch.equal(x[1, 4, 0], torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]))  # x along the columns
    assert torch.equal(coord_grid(1, 3, 5)[0], x[0, [4, 3]])                   # coord_grid is (x, y)


def test_kl_region_averages_only_there():
    ids = _square_instances()
    M = torch.nn.functional.one_hot(ids, 3).permute(0, 3, 1, 2).float().requires_grad_(True)
    logits = (M.detach() * 30 - 15)
    logits[0, :, :4, :4] = logits[0, [1, 0, 2], :4, :4]      # wrong only on object 1 (top-left)
    tm = torch.ones(1, 3, dtype=torch.bool)
    region = torch.zeros(1, 8, 8, dtype=torch.bool)
    region[0, 4:, 4:] = True                                  # object 2 only: consistent there
    assert mask_consistency_kl(M, logits, tm, region=region).item() < 1e-3
    region[0, :4, :4] = True
    whole = mask_consistency_kl(M, logits, tm)
    part = mask_consistency_kl(M, logits, tm, region=region)
    assert part.item() > whole.item() > 1                     # same error, fewer patches
    part.backward()
    assert M.grad[0, :, 4:, :4].abs().sum() == 0              # nothing outside the region


def test_empty_unmatched_supervises_the_spare_token():
    ids = _square_instances()
    good = torch.full((1, 3, 8, 8), -10.0)
    good[0, 0][ids[0] == 1] = 10
    good[0, 1][ids[0] == 2] = 10
    tm = torch.ones(1, 3, dtype=torch.bool)
    spare_on = good.clone()
    spare_on[0, 2] = 10                                       # the unmatched token claims every pixel
    plain = mask_losses(spare_on, tm, ids, match_background=False)
    assert plain["bce"] < 1e-3                                # unsupervised without the option
    on = mask_losses(spare_on, tm, ids, match_background=False, empty_unmatched=True)
    off = mask_losses(good, tm, ids, match_background=False, empty_unmatched=True)
    assert on["bce"] > 3 and off["bce"] < 1e-3
    assert torch.allclose(on["dice"], plain["dice"])          # dice stays on the matched pairs
