import hashlib
import json

import numpy as np
import pytest

from setok_cli.data import shapes as S
from setok_cli.errors import UserError


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_generator_is_deterministic(tmp_path):
    S.generate(tmp_path / "a", n=6, size=64, seed=11)
    S.generate(tmp_path / "b", n=6, size=64, seed=11)
    S.generate(tmp_path / "c", n=6, size=64, seed=12)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_image_depends_on_seed_and_index_only():
    a = S.make_example(5, 7, 64)
    b = S.make_example(5, 7, 64)
    assert a["scene"] == b["scene"] and np.array_equal(a["render"].image, b["render"].image)
    # the scene graph is resolution independent
    assert S.make_example(5, 7, 128)["scene"]["objects"][0]["center"] == a["scene"]["objects"][0]["center"]


def test_world_content_rules():
    shapes, colors, counts = set(), set(), {}
    for i in range(60):
        ex = S.make_example(i, 0, 64)
        objs = ex["scene"]["objects"]
        counts[len(objs)] = counts.get(len(objs), 0) + 1
        inst = ex["render"].instances
        for o in objs:
            shapes.add(o["shape"])
            colors.add(o["color"])
            ys, xs = np.nonzero(inst == o["id"])      # every object visible, as its record says
            assert o["area"] == len(xs) >= 1
            assert o["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert set(np.unique(inst).tolist()) == set(range(len(objs) + 1))
    # seed 0: every object count from 1 to MAX_OBJECTS, all shapes and colours
    assert counts == {1: 8, 2: 9, 3: 12, 4: 10, 5: 10, 6: 11} and S.MAX_OBJECTS == 6
    assert shapes == set(S.SHAPES) and colors == set(S.COLORS)


def test_masks_agree_with_pixels():
    # Interior pixels of an object (all 16 sub-pixels it) have its exact colour; the
    # instance id of a pixel owns the plurality of its coverage.
    for i in range(10):
        ex = S.make_example(i, 1, 64)
        r = ex["render"]
        assert np.array_equal(r.instances, r.cover.argmax(0))
        for k, o in enumerate(ex["scene"]["objects"]):
            full = r.cover[k + 1] == 1.0
            if full.any():
                assert (r.image[full] == np.asarray(S.COLORS[o["color"]], np.uint8)).all()
        # antialiasing: some pixels are partial
        assert ((r.cover[0] > 0) & (r.cover[0] < 1)).any()


def test_edit_target_is_the_edited_scene_rendered():
    for i in range(20):
        ex = S.make_example(i, 2, 64)
        e = ex["edit"]
        if e is None:
            continue
        again = S.render({k: v for k, v in e["scene"].items()}, 64)
        assert np.array_equal(again.image, e["render"].image)
        # same background where neither scene has an object
        bg = (ex["render"].cover[0] == 1) & (e["render"].cover[0] == 1)
        assert np.array_equal(ex["render"].image[bg], e["render"].image[bg])
        src, tgt = ex["scene"]["objects"], e["scene"]["objects"]
        op = e["info"]["op"]
        assert {"recolor": len(src), "move": len(src), "remove": len(src) - 1, "add": len(src) + 1}[op] == len(tgt)


def test_written_layout(world):
    summary = json.loads((world / "dataset.json").read_text())
    assert summary["n"] == 24 and set(summary["splits"]) == {"train", "val", "test"}
    for split, counts in summary["splits"].items():
        d = world / split
        for kind in ("pairs", "instruct", "referring", "edits", "objects"):
            entries = json.loads((d / f"{kind}.json").read_text())
            assert len(entries) == counts[kind]
        assert counts["pairs"] == counts["objects"] == len(list((d / "images").glob("*.png")))
    assert not list(world.rglob("*.tmp"))


def test_bad_arguments():
    with pytest.raises(UserError, match="splits"):
        S.parse_splits("0.5,0.6")
    with pytest.raises(UserError, match="splits"):
        S.parse_splits("a,b")
    with pytest.raises(UserError, match="--n"):
        S.generate("/tmp/never-written", n=0)


def test_generation_speed(tmp_path):
    import time

    t = time.perf_counter()
    S.generate(tmp_path, n=100, size=64, seed=0)
    assert time.perf_counter() - t < 15  # ~1 s on one core; generous for a shared machine
