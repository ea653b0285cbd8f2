import pytest
import torch

from setok_cli.errors import UserError
from setok_cli.models.detokenizer import (Detokenizer, DetokenizerConfig, MapperConfig, TokenMapper,
                                          bert_to_qformer_state_dict)

TINY_UNET = dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], sample_size=16)


def _crops(masks, box, size):
    """masks (V, H, W), boxes (V, 3) -> (V, size, size): each mask sampled in its own box."""
    from setok_cli.models.position import box_crops
    return box_crops(masks[:, None], box[:, None], size)[:, 0, 0]


def _silhouette(canvas, tokens, masks):
    """The sprite canvas's silhouette loss, every token valid."""
    return canvas.box_losses(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool), masks, True)[2]


def _tiny(**kw):
    kw = {"image_size": 16, "unet": TINY_UNET, "sample_steps": 2, **kw}
    return DetokenizerConfig(mapper=MapperConfig(token_dim=8, hidden_size=16, num_queries=4, intermediate_size=32,
                                                 output_dim=16), **kw)


def test_mapper_honours_token_mask():
    m = TokenMapper(MapperConfig(token_dim=8, hidden_size=16, intermediate_size=32, num_queries=3, output_dim=12))
    tok = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]).bool()
    a = m(tok, mask)
    tok2 = tok.clone()
    tok2[0, 2:] = 1e3
    assert a.shape == (2, 3, 12)
    assert torch.allclose(a, m(tok2, mask), atol=1e-6)
    assert torch.isfinite(m(tok, torch.zeros(2, 5, dtype=torch.bool))).all()   # no token at all: no NaN


def test_cross_attention_frequency():
    m = TokenMapper(MapperConfig(num_layers=6, cross_attention_frequency=3, token_dim=8, hidden_size=16,
                                 intermediate_size=32))
    n = {k.split(".")[2] for k in m.qformer.state_dict() if "crossattention" in k}
    assert n == {"0", "3"}


def test_bert_init_mapping(tmp_path):
    from transformers import BertConfig, BertModel
    BertModel(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                         vocab_size=50)).save_pretrained(tmp_path)
    m = TokenMapper(MapperConfig(token_dim=8, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                                 init_from=str(tmp_path)))
    bert = BertModel.from_pretrained(tmp_path)
    assert torch.equal(m.qformer.encoder.layer[1].attention.attention.query.weight,
                       bert.encoder.layer[1].attention.self.query.weight)
    assert torch.equal(m.qformer.encoder.layer[0].output_query.dense.weight,
                       bert.encoder.layer[0].output.dense.weight)
    assert len(bert_to_qformer_state_dict(bert.state_dict())) == 2 + 2 * 16
    with pytest.raises(UserError, match="not a folder"):
        TokenMapper(MapperConfig(init_from=str(tmp_path / "nope")))


def test_loss_sample_roundtrip(tmp_path):
    """eq. 3 on a known case: a UNet that predicts zero noise scores mean(eps^2), eps the
    first draw from the generator; the loss reaches the mapper; a sample survives save/load
    bit for bit."""
    torch.manual_seed(0)
    d = Detokenizer(_tiny())
    tok, mask = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    img = torch.rand(2, 3, 32, 32)
    loss = d(img, tok, mask, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert d.mapper.queries.grad.abs().sum() > 0
    with torch.no_grad():
        d.unet.conv_out.weight.zero_()
        d.unet.conv_out.bias.zero_()
    eps = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(d(img, tok, mask, generator=torch.Generator().manual_seed(0)), eps.square().mean())
    torch.manual_seed(0)
    d = Detokenizer(_tiny()).eval()
    g = torch.Generator().manual_seed(1)
    out = d.sample(tok, mask, generator=g)
    assert out.shape == (2, 3, 16, 16)
    d.save_pretrained(tmp_path)
    d2 = Detokenizer.from_pretrained(tmp_path)
    assert torch.equal(d2.sample(tok, mask, generator=torch.Generator().manual_seed(1)), out)


def test_unet_keys_are_strict():
    with pytest.raises(UserError, match="did you mean 'layers_per_block'"):
        Detokenizer(DetokenizerConfig(unet={"layers_per_blok": 1}))


def test_missing_pretrained_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="local folders only"):
        Detokenizer(_tiny(unet_pretrained=str(tmp_path / "sd15")))


def test_classifier_free_guidance():
    torch.manual_seed(0)
    d = Detokenizer(_tiny(cond_dropout=1.0))
    tok, mask = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    d.train()
    img = torch.rand(2, 3, 16, 16)
    torch.manual_seed(1)
    dropped = d(img, tok, mask)
    torch.manual_seed(1)
    other = d(img, tok * 5, mask)            # every row dropped: the tokens are ignored
    assert torch.allclose(dropped, other)
    d.eval()
    g = lambda: torch.Generator().manual_seed(0)
    plain = d.sample(tok, mask, generator=g(), guidance_scale=1.0)
    guided = d.sample(tok, mask, generator=g(), guidance_scale=3.0)
    assert guided.shape == plain.shape and not torch.equal(guided, plain)


@pytest.mark.parametrize("kind", ["sample", "v_prediction"])
def test_prediction_types_train_and_sample(kind, tmp_path):
    torch.manual_seed(0)
    d = Detokenizer(_tiny(prediction_type=kind))
    assert d.noise_scheduler.config.prediction_type == kind
    tok, mask = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    img = torch.rand(2, 3, 16, 16)
    loss = d(img, tok, mask)
    loss.backward()
    assert d.mapper.queries.grad.abs().sum() > 0
    if kind == "sample":   # the target is the clean image: predicting it exactly is a zero loss
        x0 = d.encode(img)
        d.unet.forward = lambda x, t, encoder_hidden_states: type("O", (), {"sample": x0})()
        assert d(img, tok, mask).item() < 1e-10
        del d.unet.forward
    out = d.sample(tok, mask, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 16, 16)
    d.save_pretrained(tmp_path)
    assert Detokenizer.from_pretrained(tmp_path).config.prediction_type == kind


def test_unknown_prediction_type_is_a_user_error():
    with pytest.raises(UserError, match="prediction_type"):
        Detokenizer(_tiny(prediction_type="x0"))


def test_append_tokens_and_canvas_ignore_padding(tmp_path):
    """Both extra conditioning roads see only the valid tokens: changing padded rows
    changes nothing, and a save/load round trip keeps the UNet's widened input."""
    torch.manual_seed(0)
    cfg = _tiny(coord_channels=2, canvas_channels=3, canvas_grid=4, canvas_hidden=16)
    cfg.mapper.append_tokens = True
    d = Detokenizer(cfg).eval()
    assert d.unet.config.in_channels == 3 + 2 + 3 and d.unet.config.out_channels == 3
    tok = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]).bool()
    cond = d.mapper(tok, mask)
    assert cond.shape == (2, 4 + 5, 16)
    assert d.mapper.condition_mask(mask).tolist()[0] == [True] * 4 + [True, True, False, False, False]
    canvas = d.canvas(tok, mask)
    assert canvas.shape == (2, 3, 4, 4)
    tok2 = tok.clone()
    tok2[0, 2:] = 1e3
    assert torch.allclose(canvas, d.canvas(tok2, mask), atol=1e-6)
    assert torch.isfinite(d.canvas(tok, torch.zeros(2, 5, dtype=torch.bool))).all()
    img = torch.rand(2, 3, 16, 16)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.allclose(d(img, tok, mask, generator=g()), d(img, tok2, mask, generator=g()), atol=1e-5)
    a = d.sample(tok, mask, generator=g())
    assert torch.allclose(a, d.sample(tok2, mask, generator=g()), atol=1e-4)
    # the canvas really reaches the UNet: other tokens, other loss
    assert not torch.allclose(d(img, tok, mask, generator=g()), d(img, torch.randn(2, 5, 8), mask, generator=g()))
    d.save_pretrained(tmp_path)
    e = Detokenizer.from_pretrained(tmp_path).eval()
    assert e.unet.config.in_channels == 8
    assert torch.allclose(a, e.sample(tok, mask, generator=g()), atol=1e-5)


def test_canvas_softmax_weights_pick_a_token():
    """A token whose logit dominates everywhere paints the whole canvas with its features."""
    from setok_cli.models.detokenizer import make_canvas
    c = make_canvas("mlp", token_dim=2, channels=1, grid=3, hidden=4)
    with torch.no_grad():
        for p in c.parameters():
            p.zero_()
        c.tok.weight[0, 0] = 1.0      # hidden[0] = token[0]
        last = c.mlp[3]
        last.weight[0, 0] = 10.0      # logit ~ 10 * gelu(gelu(token[0]))... monotone in token[0]
        c.mlp[1].weight[0, 0] = 1.0
        last.weight[1, 0] = 1.0       # feature ~ the same hidden unit
    tok = torch.tensor([[[5.0, 0.0], [0.0, 0.0]]])
    out = c(tok, torch.ones(1, 2, dtype=torch.bool))
    expect = torch.nn.functional.gelu(torch.nn.functional.gelu(torch.tensor(5.0)))
    assert torch.allclose(out, expect.expand(1, 1, 3, 3), atol=1e-3)
    with pytest.raises(UserError, match="coord_channels"):
        Detokenizer(_tiny(coord_channels=3))


def test_canvas_recon_weight_adds_the_canvas_mse():
    torch.manual_seed(0)
    tok, mask, img = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool), torch.rand(2, 3, 16, 16)
    a = Detokenizer(_tiny(canvas_channels=4, canvas_grid=4, canvas_hidden=16))
    b = Detokenizer(_tiny(canvas_channels=4, canvas_grid=4, canvas_hidden=16, canvas_recon_weight=2.0))
    b.load_state_dict(a.state_dict())
    la = a(img, tok, mask, generator=torch.Generator().manual_seed(0))
    lb = b(img, tok, mask, generator=torch.Generator().manual_seed(0))
    small = torch.nn.functional.adaptive_avg_pool2d(img * 2 - 1, 4)
    expect = la + 2.0 * torch.nn.functional.mse_loss(b.canvas(tok, mask)[:, :3], small)
    assert torch.allclose(lb, expect, atol=1e-6)
    with pytest.raises(UserError, match="canvas_channels >= 3"):
        Detokenizer(_tiny(canvas_channels=2, canvas_recon_weight=1.0))


def test_bilinear_canvas_is_a_dot_product_over_cells():
    """kind 'bilinear': a_ip = <W_a t_i, E(p)> / sqrt(h), one feature vector per token; padded
    tokens are ignored; a token alone paints every cell with its own features."""
    from setok_cli.models.detokenizer import make_canvas
    torch.manual_seed(0)
    c = make_canvas("bilinear", token_dim=6, channels=3, grid=5, hidden=8)
    tok = torch.randn(2, 4, 6)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]).bool()
    out = c(tok, mask)
    logit = torch.einsum("bkh,ph->bkp", c.key(tok), c.cell(c.pe)) / 8 ** 0.5
    w = torch.softmax(logit[0, :2], dim=0)  # image 0: its two valid tokens
    expect = (w.unsqueeze(-1) * c.feat(tok[0, :2]).unsqueeze(1)).sum(0).T.reshape(3, 5, 5)
    assert torch.allclose(out[0], expect, atol=1e-5)
    one = c(tok, torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0]]).bool())
    assert torch.allclose(one, c.feat(tok[:, 0]).view(2, 3, 1, 1).expand(2, 3, 5, 5), atol=1e-5)
    with pytest.raises(UserError, match="canvas_kind"):
        make_canvas("conv", 6, 3)


def test_fourier_2d_spans_nyquist_to_one_period():
    import math

    from setok_cli.models.detokenizer import fourier_2d
    g, q = 8, 4
    pe = fourier_2d(4 * q + 2, g).view(g, g, 4 * q + 2)   # (y, x, dim)
    # highest frequency pi: cos alternates +1 / -1 from cell to cell along y, constant along x
    assert torch.allclose(pe[:, 0, q], torch.tensor([(-1.0) ** y for y in range(g)]), atol=1e-6)
    assert torch.allclose(pe[3, :, q], torch.full((g,), -1.0), atol=1e-6)
    # lowest frequency 2 pi / g: one period over the grid, along x in the last group
    expect = torch.sin(2 * math.pi * torch.arange(g) / g)
    assert torch.allclose(pe[0, :, 3 * q - 1], expect, atol=1e-6)
    assert torch.all(pe[..., 4 * q:] == 0)   # the channels left over are zero


def test_local_canvas_moves_with_its_token():
    """kind 'local': the token's logit map is drawn around its centre c = tanh(W_c t), so
    moving the centre by two cells moves the map by two cells (translation-equivariant);
    padded tokens are ignored; a token alone owns every cell."""
    from setok_cli.models.detokenizer import make_canvas
    from setok_cli.models.merger import relative_fourier
    torch.manual_seed(0)
    g = 16
    c = make_canvas("local", token_dim=6, channels=3, grid=g, hidden=16, octaves=4)
    tok = torch.randn(1, 2, 6)
    mask = torch.tensor([[True, False]])
    cell = 2.0 / g
    with torch.no_grad():
        c.place.weight.zero_()
        c.place.bias.copy_(torch.atanh(torch.tensor([-4 * cell, -2 * cell])))  # centre at a cell corner
        _, a = c(tok, mask, return_logits=True)
        c.place.bias.copy_(torch.atanh(torch.tensor([-2 * cell, -2 * cell])))  # two cells to the right
        _, b = c(tok, mask, return_logits=True)
    a, b = a[0, 0].view(g, g), b[0, 0].view(g, g)
    assert torch.allclose(b[:, 2:], a[:, :-2], atol=1e-4)
    assert not torch.allclose(b, a, atol=1e-3)
    assert torch.isinf(c(tok, mask, return_logits=True)[1][0, 1]).all()  # the padded token
    tok2 = tok.clone()
    tok2[0, 1] = 1e3
    assert torch.allclose(c(tok, mask), c(tok2, mask), atol=1e-6)
    out, logit = c(tok, mask, return_logits=True)
    feats = c.mlp(c.tok(tok[0, :1]).unsqueeze(1) + c.off(relative_fourier((c.pe - c.centres(tok[0, :1])) / 2, 4)))
    assert torch.allclose(out[0], feats[0, :, 1:].T.reshape(3, g, g), atol=1e-5)
    with pytest.raises(UserError, match="canvas_octaves"):
        make_canvas("local", 6, 3, octaves=0)


def test_canvas_mask_loss_known_values():
    """Cross-entropy of the canvas weights against the clustering masks: uniform logits over
    K valid tokens give log K; logits that agree with the masks give ~0; padding cells (no
    token's mask) do not count; the detokenizer adds it with its weight."""
    import math
    from setok_cli.models.detokenizer import canvas_mask_loss
    B, K, g = 2, 3, 4
    lab = torch.randint(0, K, (B, g, g), generator=torch.Generator().manual_seed(0))
    masks = torch.nn.functional.one_hot(lab, K).permute(0, 3, 1, 2).float()  # (B, K, g, g)
    masks[1, :, 0, :] = 0  # a padded row
    flat = torch.zeros(B, K, g * g)
    assert math.isclose(canvas_mask_loss(flat, masks, g).item(), math.log(K), rel_tol=1e-6)
    good = masks.flatten(2) * 30.0
    assert canvas_mask_loss(good, masks, g).item() < 1e-10
    bad = (1 - masks.flatten(2)) * 30.0
    assert canvas_mask_loss(bad, masks, g).item() > 25
    # a padded token (logit -inf) with no mask is harmless; masks at a coarser grid are resized
    padded = torch.cat([good, torch.full((B, 1, g * g), float("-inf"))], 1)
    assert torch.isfinite(canvas_mask_loss(padded, masks, g))
    coarse = torch.nn.functional.one_hot(torch.zeros(B, 2, 2, dtype=torch.long), K).permute(0, 3, 1, 2).float()
    assert math.isclose(canvas_mask_loss(flat, coarse, g).item(), math.log(K), rel_tol=1e-6)
    # in the detokenizer, with its weight
    torch.manual_seed(0)
    tok, tm, img = torch.randn(B, K, 8), torch.ones(B, K, dtype=torch.bool), torch.rand(B, 3, 16, 16)
    kw = dict(canvas_channels=4, canvas_grid=g, canvas_hidden=16, canvas_kind="local", canvas_octaves=3)
    a = Detokenizer(_tiny(**kw))
    b = Detokenizer(_tiny(canvas_mask_weight=0.5, **kw))
    b.load_state_dict(a.state_dict())
    la = a(img, tok, tm, generator=torch.Generator().manual_seed(0))
    lb = b(img, tok, tm, generator=torch.Generator().manual_seed(0), masks=masks)
    _, logit = b.canvas(tok, tm, return_logits=True)
    assert torch.allclose(lb, la + 0.5 * canvas_mask_loss(logit, masks, g), atol=1e-6)
    with pytest.raises(UserError, match="clustering masks"):
        b(img, tok, tm)


def test_instance_canvas_targets_give_each_object_to_its_majority_token():
    """Clustering masks on a 2 x 2 grid, instances at 4 x 4: the object's pixels all go to
    the token holding most of it, background pixels keep the clustering mask, an image
    without instances (-1) keeps the upsampled clustering masks."""
    from setok_cli.models.detokenizer import instance_canvas_targets
    lab = torch.tensor([[[0, 1], [0, 2]], [[0, 1], [0, 2]]])  # (2, 2, 2) token per patch
    masks = torch.nn.functional.one_hot(lab, 3).permute(0, 3, 1, 2).float()  # (2, 3, 2, 2)
    inst = torch.zeros(2, 4, 4, dtype=torch.long)
    inst[0, 0:3, 2:4] = 1  # object 1: 4 pixels in token 1's patch, 2 in token 2's -> token 1
    inst[1] = -1
    out = instance_canvas_targets(masks, inst)
    assert out.shape == (2, 3, 4, 4)
    assert (out[0, 1][inst[0] == 1] == 1).all() and (out[0, 2][inst[0] == 1] == 0).all()
    assert out[0, 2, 3, 2:].tolist() == [1, 1]  # background pixels of token 2 stay token 2
    up = torch.nn.functional.interpolate(masks, size=(4, 4), mode="nearest")
    assert torch.equal(out[1], up[1])
    assert torch.equal(out[0][:, inst[0] == 0], up[0][:, inst[0] == 0])
    with pytest.raises(UserError, match="canvas_mask_target"):
        Detokenizer(_tiny(canvas_channels=4, canvas_mask_target="objects"))


def test_mask_boxes_known_values():
    from setok_cli.models.position import mask_boxes
    m = torch.zeros(1, 3, 8, 8)
    m[0, 0, 2:4, 4:8] = 1  # rows 2-3, columns 4-7: x in [0, 1], y in [-0.5, 0]
    m[0, 1] = 1  # the whole image
    b = mask_boxes(m)[0]
    assert torch.allclose(b[0], torch.tensor([0.5, -0.25, 0.5]))
    assert torch.allclose(b[1], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.isnan(b[2]).all()


def test_sprite_canvas_draws_into_its_box():
    """kind 'sprite': the sprite is resampled into the token's box (given, or predicted);
    moving the box moves the drawing; outside the box the logit falls off; a token alone
    paints every cell with its own sprite's features; padded tokens are ignored."""
    import torch.nn.functional as F
    from setok_cli.models.detokenizer import make_canvas
    torch.manual_seed(0)
    g, S = 16, 4
    c = make_canvas("sprite", token_dim=6, channels=2, grid=g, hidden=16, window=S)
    tok = torch.randn(1, 2, 6)
    mask = torch.tensor([[True, False]])
    cell = 2.0 / g
    box = torch.tensor([[[-4 * cell, 0.0, 4 * cell], [float("nan")] * 3]])
    _, a = c(tok, mask, return_logits=True, box=box)
    box2 = box.clone()
    box2[0, 0, 0] += 2 * cell
    _, b = c(tok, mask, return_logits=True, box=box2)
    a, b = a[0, 0].view(g, g), b[0, 0].view(g, g)
    assert torch.allclose(b[:, 2:], a[:, :-2], atol=1e-5) and not torch.allclose(a, b)
    # the box spans cells 0..7 in x and 4..11 in y, 2 x 2 cells per sprite pixel (S = 4):
    # inside, the sprite bilinearly resampled (align_corners=False: the cells at the sprite
    # pixels' centres interpolate between two neighbours with weights 3/4, 1/4)
    spr = c.sprite(tok[0, 0]).detach().view(3, S, S)
    up = F.interpolate(spr[None], size=(8, 8), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(a[4:12, 0:8], up[0], atol=1e-5)
    assert (a[:, 12:] < spr[0].max() - 5).all()  # far outside: pushed down
    out = c(tok, mask, box=box)  # a token alone owns every cell: its features
    assert torch.allclose(out[0, :, 4:12, 0:8], up[1:], atol=1e-5)
    tok2 = tok.clone()
    tok2[0, 1] = 1e3
    assert torch.allclose(c(tok, mask), c(tok2, mask), atol=1e-6)
    # without a box, the predicted one
    pb = c.boxes(tok[0, :1]).detach().view(1, 1, 3)
    assert torch.allclose(c(tok, mask), c(tok, mask, box=torch.cat([pb, box[:, 1:]], 1)), atol=1e-6)
    with pytest.raises(UserError, match="canvas_window"):
        make_canvas("sprite", 6, 3, window=1)


def test_sprite_place_loss_and_teacher_forcing():
    """Training with masks adds canvas_place_weight x smooth-L1 between the predicted and the
    masks' boxes and draws into the true boxes; in eval the predicted boxes are used."""
    import torch.nn.functional as F
    from setok_cli.models.position import mask_boxes
    torch.manual_seed(0)
    B, K, g = 2, 3, 8
    lab = torch.randint(0, K, (B, g, g), generator=torch.Generator().manual_seed(1))
    masks = F.one_hot(lab, K).permute(0, 3, 1, 2).float()
    tok, tm, img = torch.randn(B, K, 8), torch.ones(B, K, dtype=torch.bool), torch.rand(B, 3, 16, 16)
    kw = dict(canvas_channels=4, canvas_grid=g, canvas_hidden=16, canvas_kind="sprite", canvas_window=4,
              canvas_mask_weight=1.0)
    a = Detokenizer(_tiny(canvas_place_weight=0.0, **kw))
    b = Detokenizer(_tiny(canvas_place_weight=3.0, **kw))
    b.load_state_dict(a.state_dict())
    la = a(img, tok, tm, generator=torch.Generator().manual_seed(0), masks=masks)
    lb = b(img, tok, tm, generator=torch.Generator().manual_seed(0), masks=masks)
    expect = F.smooth_l1_loss(b.canvas.boxes(tok).flatten(0, 1), mask_boxes(masks).flatten(0, 1), beta=0.05)
    assert torch.allclose(lb, la + 3.0 * expect, atol=1e-5)


def test_box_crops_known_values():
    """A mask resampled on its own bounding square: a disc fills the crop as a disc, a
    square box inside a filled image is all ones, and rows are y (a top half stays on top)."""
    from setok_cli.models.position import mask_boxes
    H = 64
    yy, xx = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(H) + 0.5, indexing="ij")
    disc = (((xx - 40) ** 2 + (yy - 20) ** 2) <= 10 ** 2).float()
    top = torch.zeros(H, H)
    top[8:16, 8:24] = 1  # the top half of the square x in [8, 24), y in [8, 24)
    full = torch.ones(H, H)
    m = torch.stack([disc, top, full])
    box = mask_boxes(m[None])[0]
    box[1] = torch.tensor([(16 / H) * 2 - 1, (16 / H) * 2 - 1, 8 / H * 2])  # the whole square
    box[2] = torch.tensor([0.0, 0.0, 0.5])
    S = 16
    crop = _crops(m, box, S)
    c = (torch.arange(S) + 0.5) / S * 2 - 1
    v, u = torch.meshgrid(c, c, indexing="ij")
    ref = ((u ** 2 + v ** 2) <= 1.0).float()
    inter = ((crop[0] > 0.5) & (ref > 0.5)).sum()
    union = ((crop[0] > 0.5) | (ref > 0.5)).sum()
    assert inter / union > 0.9
    assert (crop[1, : S // 2] > 0.9).all() and (crop[1, S // 2:] < 0.1).all()
    assert torch.allclose(crop[2], torch.ones(S, S))


def test_sprite_silhouette_loss_known_values_and_weight():
    """BCE against the mask cropped to the box: log 2 for zero logits, ~0 for sprites that
    already draw the crop; the detokenizer adds canvas_silhouette_weight x that term, and
    the option needs the sprite kind."""
    import math
    import torch.nn.functional as F
    from setok_cli.models.detokenizer import make_canvas
    from setok_cli.models.position import mask_boxes
    torch.manual_seed(0)
    S, T = 4, 6
    c = make_canvas("sprite", token_dim=T, channels=3, grid=8, hidden=8, window=S)
    masks = torch.zeros(1, 2, 16, 16)
    masks[0, 0, 2:10, 4:12] = 1
    masks[0, 0, 2:6, 4:8] = 0  # an L shape
    masks[0, 1] = 1 - masks[0, 0]
    box = mask_boxes(masks)
    known = torch.tensor([[True, True]])
    tok = torch.randn(1, 2, T)
    with torch.no_grad():
        c.sprite[-1].weight.zero_()
        c.sprite[-1].bias.zero_()
    assert math.isclose(_silhouette(c, tok, masks).item(), math.log(2), rel_tol=1e-5)
    target = _crops(masks[0], box[0], S)  # (2, S, S)
    assert target[0].min() < 0.1 and target[0].max() > 0.9  # the L is not a full square
    # one-hot tokens and a read-out that writes +-30 x (2 target - 1) into the alpha channel
    tok = torch.eye(T)[:2].view(1, 2, T)
    with torch.no_grad():
        c.sprite[0].weight.zero_(); c.sprite[0].bias.zero_()
        c.sprite[0].weight[:T, :T] = torch.eye(T)  # hidden = [token, 0...]
        c.sprite[2].weight.zero_(); c.sprite[2].bias.zero_()
        c.sprite[2].weight[:T, :T] = torch.eye(T)
        alpha = 30 * (2 * target.round() - 1).view(2, S * S)  # (2, S*S)
        g = F.gelu(F.gelu(torch.ones(1))).item()
        c.sprite[-1].weight[: S * S, :2] = alpha.T / g
    loss = _silhouette(c, tok, masks)
    soft = F.binary_cross_entropy(target.round(), target)  # what a perfect 0/1 drawing leaves on soft edge pixels
    assert loss.item() < soft.item() + 1e-3
    # in the detokenizer: + weight x the term
    img = torch.rand(1, 3, 16, 16)
    kw = dict(canvas_channels=4, canvas_grid=8, canvas_hidden=16, canvas_kind="sprite", canvas_window=S,
              canvas_place_weight=0.0)
    a = Detokenizer(_tiny(**kw))
    b = Detokenizer(_tiny(canvas_silhouette_weight=2.0, **kw))
    b.load_state_dict(a.state_dict())
    tok8, tm = torch.randn(1, 2, 8), torch.ones(1, 2, dtype=torch.bool)
    la = a(img, tok8, tm, generator=torch.Generator().manual_seed(0), masks=masks)
    lb = b(img, tok8, tm, generator=torch.Generator().manual_seed(0), masks=masks)
    expect = _silhouette(b.canvas, tok8, masks)
    assert torch.allclose(lb, la + 2.0 * expect, atol=1e-5)
    with pytest.raises(UserError, match="canvas_silhouette_weight"):
        Detokenizer(_tiny(canvas_channels=4, canvas_kind="bilinear", canvas_silhouette_weight=1.0))


def test_sprite_silhouette_loss_teaches_shapes():
    """Learning curve: four tokens, four masks (disc, square, triangle, cross) in boxes of
    different places and sizes; 150 Adam steps on the silhouette loss alone bring each
    token's sprite to its own shape (IoU > 0.8 with the crop), from chance at the start."""
    from setok_cli.models.detokenizer import make_canvas
    from setok_cli.models.position import mask_boxes
    torch.manual_seed(0)
    H, S = 32, 8
    yy, xx = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(H) + 0.5, indexing="ij")
    def shape(kind, cx, cy, r):
        u, v = (xx - cx) / r, (yy - cy) / r
        return {"disc": u * u + v * v <= 1, "square": (u.abs() <= 0.8) & (v.abs() <= 0.8),
                "triangle": (v <= 0.8) & (1.8 * u.abs() - v <= 1),
                "cross": ((u.abs() <= 0.95) & (v.abs() <= 0.3)) | ((u.abs() <= 0.3) & (v.abs() <= 0.95))}[kind].float()
    masks = torch.stack([shape("disc", 8, 8, 6), shape("square", 24, 9, 5), shape("triangle", 9, 23, 7),
                         shape("cross", 23, 23, 6)])[None]
    box = mask_boxes(masks)
    known = torch.ones(1, 4, dtype=torch.bool)
    tok = torch.randn(1, 4, 8)
    c = make_canvas("sprite", token_dim=8, channels=3, grid=16, hidden=64, window=S)
    target = _crops(masks[0], box[0], S) > 0.5

    def iou():
        with torch.no_grad():
            a = c.sprites(tok[0])[:, 0] > 0
        return ((a & target).sum((1, 2)) / (a | target).sum((1, 2))).min().item()
    before = iou()
    opt = torch.optim.Adam(c.parameters(), lr=3e-3)
    for _ in range(150):
        loss = _silhouette(c, tok, masks)
        opt.zero_grad(); loss.backward(); opt.step()
    assert before < 0.6 and iou() > 0.8


def test_canvas_skip_adds_the_canvas_image_to_the_unet_output():
    """canvas_skip: x0 = the canvas's first C channels (upsampled) + the UNet's output. With
    the UNet's last convolution zeroed, a sample is the canvas's image exactly; bad settings
    are one UserError."""
    torch.manual_seed(0)
    kw = dict(canvas_channels=4, canvas_grid=8, canvas_hidden=16, canvas_recon_weight=1.0,
              prediction_type="sample")
    a = Detokenizer(_tiny(**kw)).eval()
    b = Detokenizer(_tiny(canvas_skip=True, **kw)).eval()
    b.load_state_dict(a.state_dict())
    tok, mask = torch.randn(2, 3, 8), torch.tensor([[True, True, False], [True, False, False]])
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        cond, cm, canvas = b.mapper(tok, mask), b.mapper.condition_mask(mask), b.canvas(tok, mask)
        up = torch.nn.functional.interpolate(canvas[:, :3], size=(16, 16), mode="bilinear", align_corners=False)
        assert torch.allclose(b._unet(x, t, cond, cm, canvas), a._unet(x, t, cond, cm, canvas) + up, atol=1e-6)
        b.unet.conv_out.weight.zero_()
        b.unet.conv_out.bias.zero_()
        img = b.sample(tok, mask, steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(img, ((up.clamp(-1, 1) + 1) / 2), atol=1e-5)
    for bad in (dict(kw, prediction_type="epsilon"), dict(kw, canvas_recon_weight=0.0)):
        with pytest.raises(UserError, match="canvas_skip"):
            Detokenizer(_tiny(canvas_skip=True, **bad))


def test_training_draws_the_sprites_in_the_true_boxes():
    """Training draws the sprites in the masks' boxes (teacher forcing); eval in the
    boxes the tokens predict, as sampling does."""
    import torch.nn.functional as F
    from setok_cli.models.position import mask_boxes
    torch.manual_seed(0)
    B, K, g = 2, 3, 8
    lab = torch.randint(0, K, (B, g, g), generator=torch.Generator().manual_seed(1))
    masks = F.one_hot(lab, K).permute(0, 3, 1, 2).float()
    tok, tm, img = torch.randn(B, K, 8), torch.ones(B, K, dtype=torch.bool), torch.rand(B, 3, 16, 16)
    d = Detokenizer(_tiny(canvas_channels=4, canvas_grid=g, canvas_hidden=16, canvas_kind="sprite",
                          canvas_window=4))
    seen = []
    d.canvas.register_forward_hook(lambda mod, args, kwargs, out: seen.append(kwargs.get("box")), with_kwargs=True)
    d(img, tok, tm, generator=torch.Generator().manual_seed(0), masks=masks)
    d.eval()
    d(img, tok, tm, generator=torch.Generator().manual_seed(0), masks=masks)
    assert torch.equal(seen[0], mask_boxes(masks)) and seen[1] is None


def test_a_vae_without_a_pretrained_folder_is_saved_with_the_detokenizer(tmp_path, monkeypatch):
    """A latent-space detokenizer whose VAE comes from a preset (no pretrained folder)
    keeps that VAE's weights through save and load; one from a folder is not copied."""
    from setok_cli.models import detokenizer as det
    monkeypatch.setitem(det.VAE_PRESETS, "test", dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=32, norm_num_groups=4,
        block_out_channels=(4, 4, 4, 4), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4))
    torch.manual_seed(0)
    d = Detokenizer(_tiny(space="latent", image_size=32, vae_preset="test",
                          unet=dict(TINY_UNET, in_channels=4, out_channels=4, sample_size=4))).eval()
    with torch.no_grad():
        d.vae.decoder.conv_out.bias.fill_(0.25)  # unlike any fresh VAE
    d.save_pretrained(tmp_path / "a")
    e = Detokenizer.from_pretrained(tmp_path / "a")
    assert torch.equal(e.vae.decoder.conv_out.bias, torch.full((3,), 0.25))
    tok, mask = torch.randn(1, 2, 8), torch.ones(1, 2, dtype=torch.bool)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(d.sample(tok, mask, generator=g()), e.sample(tok, mask, generator=g()))
    d.config.vae_pretrained = "models/sd15"  # a VAE from a folder stays in that folder
    assert not any(k.startswith("vae.") for k in d.state_to_save())


def test_from_pretrained_errors_are_one_line(tmp_path):
    """A folder without config.json or weights, an unreadable or wrong config, and weights
    that do not fit the config: each a UserError naming the folder, never a traceback."""
    import json
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    Detokenizer(_tiny()).save_pretrained(tmp_path / "d")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        Detokenizer.from_pretrained(tmp_path / "empty")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    for name, text in (("junk", "{not json"), ("typo", json.dumps(dict(cfg, sampler_steps=3))),
                       ("bad", json.dumps(dict(cfg, space="voxel")))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
        (tmp_path / name / "model.safetensors").write_bytes((tmp_path / "d" / "model.safetensors").read_bytes())
        with pytest.raises(UserError, match=name):
            Detokenizer.from_pretrained(tmp_path / name)
    sd = load_file(str(tmp_path / "d" / "model.safetensors"))
    sd["mapper.queries"] = torch.zeros(1, 5, 16)  # one query too many
    save_file(sd, str(tmp_path / "d" / "model.safetensors"))
    with pytest.raises(UserError, match=r"mapper\.queries"):
        Detokenizer.from_pretrained(tmp_path / "d")
    (tmp_path / "d" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no model.safetensors"):
        Detokenizer.from_pretrained(tmp_path / "d")
    with pytest.raises(UserError, match="unknown DetokenizerConfig"):
        DetokenizerConfig.from_dict({"canvas_true_boxes": True})
