import pytest

from setok_cli.data.shapes import generate


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A small generated world (24 images, 64 px) shared by the data tests."""
    root = tmp_path_factory.mktemp("world")
    generate(root, n=24, size=64, seed=3, splits="0.5,0.25,0.25")
    return root
