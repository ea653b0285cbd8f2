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
