import pytest

from setok_cli.data.shapes import generate


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A small generated world (12 images, 64 px, one split) shared by the eval tests."""
    root = tmp_path_factory.mktemp("evalworld")
    generate(root, n=12, size=64, seed=9, splits="1.0")
    return root / "train"
