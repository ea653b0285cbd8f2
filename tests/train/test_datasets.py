import json

import pytest

from setok_cli.data.datasets import PairsDataset, build_dataset, collate
from setok_cli.errors import UserError

from .helpers import make_pairs


def test_pairs_relative_paths_and_collate(tmp_path):
    js = make_pairs(tmp_path / "d", n=3, size=16)
    ds = PairsDataset(js, image_size=8)
    it = ds[1]
    assert it["pixel_values"].shape == (3, 8, 8) and it["instances"].shape == (8, 8)
    assert it["instances"].max() == 2 and it["phrases"] and it["caption"].startswith("a picture")
    b = collate([ds[0], ds[1]])
    assert b["pixel_values"].shape == (2, 3, 8, 8) and b["has_instances"].all()


def test_mixed_sources_pad_missing_instances(tmp_path):
    js = make_pairs(tmp_path / "d", n=2, size=16)
    recs = json.loads(js.read_text())
    del recs[0]["instances"]
    js.write_text(json.dumps(recs))
    ds = PairsDataset(js)
    b = collate([ds[0], ds[1]])
    assert b["has_instances"].tolist() == [False, True]
    assert (b["instances"][0] == -1).all()


def test_bad_records_are_user_errors(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"caption": "x"}]))
    with pytest.raises(UserError, match="record 0 has no 'image'"):
        PairsDataset(tmp_path / "a.json")
    with pytest.raises(UserError, match="does not exist"):
        PairsDataset(tmp_path / "missing.json")
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        PairsDataset(tmp_path / "b.json")
    (tmp_path / "c.json").write_text(json.dumps([{"image": "nope.png", "caption": "x"}]))
    with pytest.raises(UserError, match="cannot read image"):
        PairsDataset(tmp_path / "c.json")[0]
    with pytest.raises(UserError, match="unknown data format"):
        build_dataset(tmp_path / "c.json", "edits")


def test_rgb_instance_png_reads_as_load_ids(tmp_path):
    """Training reads instance PNGs with the evaluation's reader (channel 0 of an RGB file),
    not as luma: red ids 1, 2, 3 with green 5, 10, 15 have luma 3, 6, 10."""
    import numpy as np
    from PIL import Image

    from setok_cli.files import load_ids

    js = make_pairs(tmp_path / "d", n=1, size=12)
    ids = np.zeros((12, 12), np.uint8)
    ids[:4], ids[4:8], ids[8:, :6] = 1, 2, 3
    rgb = np.stack([ids, 5 * ids, np.zeros_like(ids)], -1)
    path = tmp_path / "d" / "images" / "0_ids.png"
    Image.fromarray(rgb, "RGB").save(path)
    got = PairsDataset(js)[0]["instances"].numpy()
    assert np.array_equal(got, ids) and np.array_equal(got, load_ids(path))
