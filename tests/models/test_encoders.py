"""Frozen encoders: tiny random HF models saved to disk load through the real code."""
import json

import pytest
import torch
import transformers

from setok_cli.errors import UserError
from setok_cli.models.builtin_encoder import BuiltinEncoder, rgb_to_lab
from setok_cli.models.encoders import load_encoder


TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    torch.manual_seed(0)
    dirs = {}
    cfg = transformers.CLIPVisionConfig(image_size=56, **TINY)
    transformers.CLIPVisionModel(cfg).save_pretrained(root / "clip")
    full = transformers.CLIPConfig(vision_config=dict(image_size=42, **TINY),
                                   text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=2, vocab_size=64))
    transformers.CLIPModel(full).save_pretrained(root / "clip_full")
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(image_size=42, **TINY)).save_pretrained(root / "siglip")
    transformers.Dinov2Model(transformers.Dinov2Config(image_size=56, **TINY)).save_pretrained(root / "dinov2")
    reg = transformers.Dinov2WithRegistersConfig(image_size=56, num_register_tokens=4, **TINY)
    transformers.Dinov2WithRegistersModel(reg).save_pretrained(root / "dinov2_reg")
    for k in ("clip", "clip_full", "siglip", "dinov2", "dinov2_reg"):
        dirs[k] = str(root / k)
    return dirs


@pytest.mark.parametrize("name,size,grid", [("clip", 56, 4), ("clip_full", 42, 3), ("siglip", 42, 3),
                                            ("dinov2", 336, 24), ("dinov2_reg", 336, 24)])
def test_hf_encoder_grid(tiny_dirs, name, size, grid):
    enc = load_encoder(tiny_dirs[name])
    assert enc.image_size == size and enc.patch_size == 14 and enc.hidden_size == 32
    x = torch.rand(2, 3, size, size)
    f = enc(x)
    assert f.shape == (2, grid, grid, 32)  # SigLIP: every patch kept; CLIP/DINOv2: CLS, registers dropped
    assert torch.isfinite(f).all()
    assert not any(p.requires_grad for p in enc.parameters())


def test_clip_uses_penultimate_layer_without_cls(tiny_dirs):
    enc = load_encoder(tiny_dirs["clip"])
    x = torch.rand(1, 3, 56, 56)
    xn = (x - enc.mean) / enc.std
    hs = enc.model(pixel_values=xn, output_hidden_states=True).hidden_states
    assert torch.allclose(enc(x).reshape(1, 16, 32), hs[-2][:, 1:], atol=1e-6)


def test_dinov2_drops_registers(tiny_dirs):
    enc = load_encoder(tiny_dirs["dinov2_reg"])
    x = torch.rand(1, 3, 56, 56)
    xn = (x - enc.mean) / enc.std
    hs = enc.model(pixel_values=xn).last_hidden_state
    assert hs.shape[1] == 1 + 4 + 16
    assert torch.allclose(enc(x).reshape(1, 16, 32), hs[:, 5:], atol=1e-6)


def test_preprocessor_stats_are_used(tiny_dirs, tmp_path):
    import shutil

    d = tmp_path / "clip"
    shutil.copytree(tiny_dirs["clip"], d)
    (d / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [1, 1, 1]}))
    enc = load_encoder(str(d))
    assert torch.allclose(enc.mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))


def test_missing_encoder_says_how_to_fetch():
    with pytest.raises(UserError, match="huggingface-cli download someone/not-cached-model"):
        load_encoder("someone/not-cached-model")
    with pytest.raises(UserError, match="not found"):
        load_encoder("./no/such/folder")


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="model_type 'bert'"):
        load_encoder(str(tmp_path))


def test_builtin_encoder():
    enc = load_encoder("builtin")
    assert isinstance(enc, BuiltinEncoder) and enc.image_size == 336
    x = torch.rand(2, 3, 336, 224)
    f = enc(x)
    assert f.shape == (2, 24, 16, 16) and torch.isfinite(f).all()
    flat = enc(torch.full((1, 3, 56, 56), 0.3))
    assert torch.allclose(flat, flat[:, :1, :1].expand_as(flat))  # a flat image: one feature everywhere
    with pytest.raises(ValueError):
        enc(torch.rand(1, 3, 30, 28))


def test_rgb_to_lab_matches_skimage():
    from skimage import color
    rgb = torch.rand(1, 3, 5, 7)
    ref = color.rgb2lab(rgb[0].permute(1, 2, 0).double().numpy())
    ours = rgb_to_lab(rgb)[0].permute(1, 2, 0).double().numpy()
    assert abs(ref - ours).max() < 0.05
