"""Shared fixtures. Keep this small: per-area fixtures live next to their tests."""
import os

import pytest


@pytest.fixture(scope="session")
def photo_dir():
    """Real photos that ship with scikit-image (chelsea.png, astronaut.png, coffee.png...)."""
    skimage = pytest.importorskip("skimage")
    return os.path.join(os.path.dirname(skimage.__file__), "data")


@pytest.fixture(scope="session")
def chelsea_path(photo_dir):
    return os.path.join(photo_dir, "chelsea.png")


@pytest.fixture(scope="session")
def builtin_tokenizer():
    """The default tokenizer (builtin encoder, untrained deterministic merger), shared."""
    from setok_cli.models.setok import load_tokenizer

    return load_tokenizer().eval()


def _write_tiny_stage1(ck, **setok):
    """A tiny stage-1 checkpoint at `ck`: a SeTok with 8-wide tokens (SeTokConfig overrides in
    `setok`), a tiny detokenizer and a tiny mask decoder (reading the builtin encoder's 16
    feature channels), random weights."""
    from setok_cli.models.detokenizer import Detokenizer, DetokenizerConfig, MapperConfig
    from setok_cli.models.mask_decoder import MaskDecoder, MaskDecoderConfig
    from setok_cli.models.setok import SeTok, SeTokConfig
    cfg = dict(image_size=112, max_tokens=8, merger_dim=16, token_dim=8, merger_depth=1, merger_cross_depth=1)
    SeTok(SeTokConfig(**{**cfg, **setok})).save_pretrained(ck / "setok")
    unet = dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, sample_size=16,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
    Detokenizer(DetokenizerConfig(image_size=16, unet=unet, sample_steps=2, mapper=MapperConfig(
        token_dim=8, hidden_size=16, num_queries=4, intermediate_size=32, output_dim=16))).save_pretrained(
        ck / "detokenizer")
    MaskDecoder(MaskDecoderConfig(token_dim=8, feature_dim=16, embed_dim=8, pixel_channels=8, num_convs=1)
                ).save_pretrained(ck / "mask_decoder")
    return ck


@pytest.fixture(scope="session")
def write_tiny_stage1():
    """The function that writes a tiny stage-1 checkpoint folder (see _write_tiny_stage1)."""
    return _write_tiny_stage1


@pytest.fixture(scope="session")
def stage2_world(tmp_path_factory):
    """A tiny shapes world and a tiny stage-1 run folder (random parts, the tiny recipe's
    tokenizer settings at 112 px so that it is quick)."""
    from setok_cli.data.shapes import generate
    root = tmp_path_factory.mktemp("stage2")
    generate(root / "shapes", n=30, size=32, seed=0)
    _write_tiny_stage1(root / "stage1" / "checkpoints" / "step_00000010", image_policy="squash")
    return root
