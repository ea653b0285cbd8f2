import json
import os

import pytest

from setok_cli.data import formats
from setok_cli.errors import UserError


@pytest.mark.parametrize("kind", formats.KINDS)
def test_generated_files_validate(world, kind):
    for split in ("train", "val", "test"):
        entries = formats.load(world / split / f"{kind}.json", kind)
        assert entries
        for e in entries:
            for k in formats.path_keys(kind):
                if k in e:
                    assert os.path.isabs(e[k]) and os.path.isfile(e[k])
        assert formats.infer_kind(json.loads((world / split / f"{kind}.json").read_text())[0]) == kind


def test_instruct_is_llava_format(world):
    for e in formats.load(world / "train" / "instruct.json", "instruct"):
        conv = e["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"]
        assert conv[0]["value"].startswith("<image>\n")


def _write(tmp_path, data):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(data))
    return p


def test_errors_name_entry_and_key(tmp_path, world):
    img = str(world / "train" / "images" / "000000.png")
    with pytest.raises(UserError, match=r"entry 1: missing key 'caption'"):
        formats.load(_write(tmp_path, [{"image": img, "caption": "x"}, {"image": img}]), "pairs")
    with pytest.raises(UserError, match=r"entry 0: key 'caption' must be str"):
        formats.load(_write(tmp_path, [{"image": img, "caption": 3}]), "pairs")
    with pytest.raises(UserError, match=r"entry 0: key 'image' names a file that does not exist"):
        formats.load(_write(tmp_path, [{"image": "nope.png", "caption": "x"}]), "pairs")
    with pytest.raises(UserError, match=r"conversations'\[0\]"):
        formats.load(_write(tmp_path, [{"image": img, "conversations": [{"from": "bot", "value": "x"}]}]),
                     "instruct")
    with pytest.raises(UserError, match="JSON list"):
        formats.load(_write(tmp_path, {"image": img}), "pairs")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(UserError, match="not valid JSON"):
        formats.load(bad, "pairs")
    with pytest.raises(UserError, match="not found"):
        formats.load(tmp_path / "missing.json", "pairs")


def test_paths_relative_to_json_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(b"x")
    p = tmp_path / "sub" / "objects.json"
    p.write_text(json.dumps([{"image": "a.png", "instances": "a.png"}]))
    (e,) = formats.load(p)  # kind inferred
    assert e["image"] == str(tmp_path / "sub" / "a.png")
