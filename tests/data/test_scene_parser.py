import numpy as np
from PIL import Image, ImageFilter

from setok_cli.data import shapes as S
from setok_cli.data.scene_parser import match_objects, parse_scene, score_scene


def _accuracy(seed, size, n, blur=None):
    correct = total = extra = exact = 0
    for i in range(n):
        ex = S.make_example(i, seed, size)
        img = ex["render"].image
        if blur:
            img = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(blur)))
        r = score_scene(img, ex["scene"])
        correct, total, extra = correct + r["correct"], total + r["n_gt"], extra + r["n_pred"] - r["correct"]
        exact += r["exact"]
    return correct / total, extra / total, exact / n


def test_parser_accuracy_on_a_fresh_seed():
    acc, extra, exact = _accuracy(seed=2024, size=64, n=100)
    assert acc >= 0.99 and extra <= 0.01, (acc, extra, exact)


def test_parser_at_128px():
    acc, extra, _ = _accuracy(seed=77, size=128, n=25)
    assert acc >= 0.98 and extra <= 0.02


def test_parser_degrades_gracefully_on_blur():
    acc, _, _ = _accuracy(seed=5, size=64, n=20, blur=1.0)
    assert acc >= 0.6


def test_parse_fields_and_empty_image():
    ex = S.make_example(0, 0, 64)
    objs = parse_scene(Image.fromarray(ex["render"].image))
    assert objs and {"shape", "color", "center", "size", "bbox", "area"} <= set(objs[0])
    assert parse_scene(np.full((64, 64, 3), 128, np.uint8)) == []


def test_match_objects():
    gt = [{"shape": "circle", "color": "red", "center": [0.2, 0.2]},
          {"shape": "square", "color": "blue", "center": [0.8, 0.8]}]
    assert match_objects(gt, gt)["correct"] == 2
    moved = [dict(gt[0], center=[0.6, 0.2]), gt[1]]
    assert match_objects(moved, gt)["correct"] == 1
    assert match_objects(moved, gt, pos_tol=None)["correct"] == 2
    assert match_objects([], gt) == {"correct": 0, "n_pred": 0, "n_gt": 2, "pairs": []}
