"""Metrics of `setok eval`, each a small function on numpy arrays or strings.

    adjusted_rand_index(a, b)                 ARI (pair-counting form, as scikit-learn)
    fg_ari(pred_labels, gt_ids)               ARI over foreground (gt id > 0) only
    resample_ids(ids, (h, w))                 instance ids -> patch grid by majority vote
    best_overlap(pred_labels, gt_ids)         per-object best IoU (mBO = their mean)
    iou(pred, gt) / mask_stats(pred, gt)      binary masks
    normalize_answer(s) / exact_match(p, g)   VQA normalisation
    caption_facts(text) / scene_facts(objs)   the facts a caption states / a scene holds
    fact_scores(stated, truth)                recall/precision per fact type and overall
    l1(a, b)                                  mean absolute difference in [0, 1]
    retrieval_recall(sim, q_keys, c_keys, k)  R@k: a query's top k hold a candidate of its key
"""
from __future__ import annotations

import re

import numpy as np

# ----------------------------------------------------------------------------- clustering


def adjusted_rand_index(a, b) -> float:
    """ARI between two labellings of the same items (Hubert and Arabie). Identical
    partitions (including the trivial cases of one cluster or all singletons) score 1."""
    a = np.asarray(a).ravel()
    b = np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"labellings differ in length: {a.shape} vs {b.shape}")
    n = a.size
    if n < 2:
        return 1.0
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    cont = np.zeros((ai.max() + 1, bi.max() + 1), np.int64)
    np.add.at(cont, (ai, bi), 1)
    # pair confusion matrix, as sklearn.metrics.cluster.pair_confusion_matrix
    sum_sq = float((cont.astype(np.float64) ** 2).sum())
    rows, cols = cont.sum(1).astype(np.float64), cont.sum(0).astype(np.float64)
    tp = sum_sq - n
    fp = float((cont.astype(np.float64) * cols[None, :]).sum()) - sum_sq
    fn = float((cont.astype(np.float64).T * rows[None, :]).sum()) - sum_sq
    tn = n * n - fp - fn - sum_sq
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def fg_ari(pred_labels, gt_ids) -> float | None:
    """ARI restricted to items whose gt id is > 0 (foreground). None when there is no
    foreground item."""
    pred = np.asarray(pred_labels).ravel()
    gt = np.asarray(gt_ids).ravel()
    fg = gt > 0
    if not fg.any():
        return None
    return adjusted_rand_index(pred[fg], gt[fg])


def resample_ids(ids: np.ndarray, grid: tuple[int, int], samples: int = 4) -> np.ndarray:
    """Instance ids (H, W) -> (h, w) patch grid: each patch takes the id most of its
    samples x samples evenly spaced sample points fall on (ties: the smaller id, so
    background wins a tie). With H = h * p this is a majority vote over the patch."""
    ids = np.asarray(ids)
    H, W = ids.shape
    h, w = grid
    off = (np.arange(samples) + 0.5) / samples
    ys = np.minimum(((np.arange(h)[:, None] + off[None, :]) * H / h).astype(np.int64), H - 1).ravel()
    xs = np.minimum(((np.arange(w)[:, None] + off[None, :]) * W / w).astype(np.int64), W - 1).ravel()
    pts = ids[ys][:, xs].reshape(h, samples, w, samples).transpose(0, 2, 1, 3).reshape(h * w, -1)
    m = int(ids.max()) + 1
    counts = np.zeros((h * w, m), np.int64)
    np.add.at(counts, (np.repeat(np.arange(h * w), pts.shape[1]), pts.ravel().astype(np.int64)), 1)
    return counts.argmax(1).reshape(h, w).astype(ids.dtype)


def upsample_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Patch labels (h, w) -> (H, W) by nearest neighbour (each pixel takes its patch)."""
    h, w = labels.shape
    H, W = shape
    ys = np.minimum((np.arange(H) + 0.5) * h / H, h - 1).astype(np.int64)
    xs = np.minimum((np.arange(W) + 0.5) * w / W, w - 1).astype(np.int64)
    return np.asarray(labels)[ys][:, xs]


def best_overlap(pred_labels, gt_ids) -> list[float]:
    """For every gt object (id > 0) the best IoU with any predicted region. Both arrays
    have the same shape; every predicted label is a candidate region."""
    pred = np.asarray(pred_labels).ravel()
    gt = np.asarray(gt_ids).ravel()
    _, pi = np.unique(pred, return_inverse=True)
    _, gi = np.unique(gt, return_inverse=True)
    gvals = np.unique(gt)
    cont = np.zeros((gi.max() + 1, pi.max() + 1), np.int64)
    np.add.at(cont, (gi, pi), 1)
    inter = cont.astype(np.float64)
    union = cont.sum(1, keepdims=True) + cont.sum(0, keepdims=True) - inter
    iou_m = inter / np.maximum(union, 1)
    return [float(iou_m[k].max()) for k, v in enumerate(gvals) if v > 0]


# ----------------------------------------------------------------------------- masks

def mask_stats(pred, gt) -> tuple[int, int]:
    """(intersection, union) pixel counts of two boolean masks."""
    p = np.asarray(pred, bool)
    g = np.asarray(gt, bool)
    if p.shape != g.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {g.shape}")
    return int((p & g).sum()), int((p | g).sum())


def iou(pred, gt) -> float:
    """IoU of two boolean masks; two empty masks agree perfectly (1.0)."""
    i, u = mask_stats(pred, gt)
    return 1.0 if u == 0 else i / u


def l1(a, b) -> float:
    """Mean absolute difference of two uint8 images, in [0, 1]."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    return float(np.abs(a - b).mean() / 255.0)


def retrieval_recall(sim, query_keys, candidate_keys, k: int) -> float:
    """R@k of a retrieval: the share of queries (rows of sim (Q, C)) whose k most similar
    candidates include one with the query's own key. Keys (e.g. caption texts) make
    duplicates fair: in a world of few colours and shapes two images often share a
    caption, and retrieving the other one is not a mistake. Ties in similarity go to the
    lower candidate index."""
    sim = np.asarray(sim, np.float64)
    q = np.asarray(query_keys, dtype=object)
    c = np.asarray(candidate_keys, dtype=object)
    if sim.shape != (len(q), len(c)):
        raise ValueError(f"similarity {sim.shape} does not match {len(q)} queries x {len(c)} candidates")
    if len(q) == 0:
        return 0.0
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]       # (Q, k)
    return float(np.mean([(c[row] == key).any() for row, key in zip(top, q)]))


# ----------------------------------------------------------------------------- text

NUMBERS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}
_ARTICLES = {"a", "an", "the"}
_SYNONYMS = {"colour": "color", "grey": "gray", "true": "yes", "false": "no", "centre": "center"}


def normalize_answer(s: str) -> str:
    """VQA-style: lower case, punctuation dropped, articles dropped, number words as
    digits, British spellings folded ("colour" -> "color"), whitespace collapsed."""
    s = re.sub(r"[^\w\s]", " ", str(s).lower())
    words = [NUMBERS.get(w, _SYNONYMS.get(w, w)) for w in s.split() if w not in _ARTICLES]
    return " ".join(words)


def exact_match(pred: str, gt: str) -> bool:
    return normalize_answer(pred) == normalize_answer(gt)


def _vocab():
    from ..data.shapes import COLOR_NAMES, PLURALS, SHAPES

    shape_words = {s: s for s in SHAPES}
    shape_words.update({p: s for s, p in PLURALS.items()})
    return set(COLOR_NAMES), shape_words


def caption_facts(text: str) -> dict[str, set]:
    """Facts a caption states: "objects" {(color, shape)}, "colors", "shapes", and
    "counts" {(color, shape, k)} plus ("total", n) from "<n> objects". A count comes from
    the number word or digit before "<color> <shape>" ("a"/"an" = 1); a phrase without
    one states no count."""
    colors, shape_words = _vocab()
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    words = [_SYNONYMS.get(w, w) for w in words]
    facts: dict[str, set] = {"objects": set(), "colors": set(), "shapes": set(), "counts": set()}
    for i, w in enumerate(words):
        if w in colors and i + 1 < len(words) and words[i + 1] in shape_words:
            c, s = w, shape_words[words[i + 1]]
            facts["objects"].add((c, s))
            facts["colors"].add(c)
            facts["shapes"].add(s)
            if i > 0:
                prev = words[i - 1]
                k = 1 if prev in ("a", "an") else int(NUMBERS.get(prev, prev)) if NUMBERS.get(prev, prev).isdigit() else None
                if k is not None:
                    facts["counts"].add((c, s, k))
        if w in ("objects", "object", "shapes", "things") and i > 0:
            prev = NUMBERS.get(words[i - 1], words[i - 1])
            if prev.isdigit():
                facts["counts"].add(("total", int(prev)))
    return facts


def scene_facts(objects: list[dict]) -> dict[str, set]:
    """The true facts of a scene, in the form of `caption_facts`."""
    groups: dict[tuple[str, str], int] = {}
    for o in objects:
        groups[(o["color"], o["shape"])] = groups.get((o["color"], o["shape"]), 0) + 1
    return {"objects": set(groups), "colors": {c for c, _ in groups}, "shapes": {s for _, s in groups},
            "counts": {(c, s, k) for (c, s), k in groups.items()} | {("total", len(objects))}}


def fact_scores(stated: dict[str, set], truth: dict[str, set]) -> dict[str, tuple[int, int, int]]:
    """Per fact type: (true facts stated, facts stated, true facts). Counts are judged
    only against count facts (a stated count is either right or wrong)."""
    out = {}
    for k in truth:
        s, t = stated.get(k, set()), truth[k]
        out[k] = (len(s & t), len(s), len(t))
    return out


def edit_applied(edit: dict, gt: list[dict], hit: set, parsed: list[dict], removed: list[dict] | None,
                 pos_tol: float = 0.1) -> bool | None:
    """Whether a shapes-world edit shows in the edited image. `edit`: the entry's {"op",
    "object", "preserved"}; `gt`: the target scene's objects; `hit`: the target indices the
    edited image matched; `parsed`: its objects; `removed`: the source object a removal takes
    away. An add, move or recolour shows when the target objects it changed or added (ids
    outside "preserved") are all matched; a removal when `removed` is no longer found. None
    when the entry does not say (no op, or a removal without its source object)."""
    from ..data.scene_parser import match_objects
    if "op" not in edit or edit.get("preserved") is None:
        return None
    if edit["op"] == "remove":
        return None if not removed else match_objects(parsed, removed, pos_tol)["correct"] == 0
    keep = set(edit["preserved"])
    changed = [j for j, o in enumerate(gt) if o.get("id", j + 1) not in keep]
    return bool(changed) and all(j in hit for j in changed)
