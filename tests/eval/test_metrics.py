import numpy as np
import pytest

from setok_cli.eval import metrics as M


def test_ari_textbook_values():
    # scikit-learn's adjusted_rand_score documentation examples
    assert M.adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    assert M.adjusted_rand_index([0, 0, 1, 2], [0, 0, 1, 1]) == pytest.approx(4 / 7)
    assert M.adjusted_rand_index([0, 0, 1, 1], [1, 1, 0, 0]) == 1.0
    assert M.adjusted_rand_index([0, 0, 0, 0], [0, 1, 2, 3]) == 0.0
    assert M.adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
    # Hubert & Arabie by hand: n=6, contingency [[2,1],[0,3]]
    # sum C(n_ij,2)=1+0+0+3=4, rows C(3,2)*2=6, cols C(2,2)+C(4,2)=7, C(6,2)=15
    # expected=6*7/15=2.8, max=6.5 -> (4-2.8)/(6.5-2.8)
    assert M.adjusted_rand_index([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]) == pytest.approx(1.2 / 3.7)


def test_fg_ari_ignores_background():
    gt = np.array([[0, 0, 1, 1], [0, 0, 2, 2]])
    pred = np.array([[5, 6, 3, 3], [7, 8, 4, 4]])  # background split arbitrarily
    assert M.fg_ari(pred, gt) == 1.0
    assert M.fg_ari(np.zeros_like(gt), gt) == 0.0  # everything merged: chance level
    assert M.fg_ari(pred, np.zeros_like(gt)) is None


def test_resample_ids_majority():
    ids = np.zeros((8, 8), np.uint8)
    ids[:4, :4] = 1
    ids[4:, 4:] = 2
    ids[0, 0] = 2  # a minority pixel does not win its patch
    assert M.resample_ids(ids, (2, 2)).tolist() == [[1, 0], [0, 2]]
    assert M.resample_ids(ids, (8, 8)).tolist() == ids.tolist()


def test_best_overlap():
    gt = np.array([[1, 1, 0, 0], [1, 1, 0, 2]])
    pred = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    # object 1 = region 0 exactly; object 2 (1 px) vs region 1 (4 px): IoU 1/4
    assert M.best_overlap(pred, gt) == [1.0, 0.25]
    assert M.best_overlap(np.zeros_like(gt), gt) == [4 / 8, 1 / 8]
    lab = np.array([[0, 1], [2, 3]])
    assert M.upsample_labels(lab, (4, 4)).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_iou_known_masks():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 px
    b[:2, :3] = True  # 6 px, 4 shared
    assert M.iou(a, b) == pytest.approx(4 / 6)
    assert M.iou(a, a) == 1.0
    assert M.iou(a, ~a) == 0.0
    assert M.iou(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert M.mask_stats(a, b) == (4, 6)


def test_vqa_normalisation():
    assert M.exact_match("Two.", "2")
    assert M.exact_match("The Red", "red")
    assert M.exact_match("colour", "color")
    assert not M.exact_match("yes", "no")
    assert M.normalize_answer("  An  ORANGE   star! ") == "orange star"


def test_caption_facts_perfect_and_wrong():
    objs = [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"},
            {"color": "blue", "shape": "square"}]
    truth = M.scene_facts(objs)
    perfect = M.caption_facts("Three objects: a red circle and two blue squares.")
    assert perfect == truth
    s = M.fact_scores(perfect, truth)
    assert all(hit == stated == true for hit, stated, true in s.values())
    wrong = M.caption_facts("A picture of four green stars.")
    s = M.fact_scores(wrong, truth)
    assert all(hit == 0 for hit, _, _ in s.values())
    assert s["objects"] == (0, 1, 2)


def test_l1():
    a = np.zeros((2, 2, 3), np.uint8)
    assert M.l1(a, a) == 0.0
    assert M.l1(a, a + 255) == 1.0
    assert M.l1(a, a + 51) == pytest.approx(0.2)
