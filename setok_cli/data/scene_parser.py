"""Read an image of the synthetic world back into its objects, and score it.

    parse_scene(image) -> [{"shape", "color", "center": [x, y] in [0, 1], "size",
                            "bbox": [x0, y0, x1, y1] pixels, "area": pixels, "fit": float}]
    match_objects(pred, gt, pos_tol=0.1) -> {"correct", "n_pred", "n_gt", "pairs"}
    score_scene(image, scene_or_objects, use_position=True) -> metrics dict

How it works (analysis by synthesis):

1. Colour. Backgrounds are low-saturation and objects are saturated, and an antialiased
   edge pixel is `a * colour + (1 - a) * background`. Subtracting each pixel's grey
   level keeps `a` times the colour's chroma vector, so the nearest palette colour is
   the one with the most similar chroma direction and `a` (the coverage) is the
   projection length. A pixel is foreground when its coverage is at least 0.5.
2. Regions. Per colour, 8-connected components; thin slivers (the mixed colour where
   two objects meet) are dropped because they do not survive a 3x3 opening. The world
   guarantees that same-coloured objects never touch, so a region is one object.
3. Shape. For every shape kind a template is fitted to the region (centre and size,
   pattern search from the bounding box) with the renderer's own geometry, scoring the
   mismatch only where the region is visible or the background shows: pixels of other
   objects may hide this one and are "don't care". The kind with the lowest mismatch
   wins, so partial occlusion does not fool it and blurry images degrade smoothly.
"""
from __future__ import annotations

import numpy as np

from .shapes import COLORS, EXTENTS, SHAPES, inside

_PAL = np.asarray(list(COLORS.values()), np.float32) / 255.0
_CHROMA = _PAL - _PAL.mean(1, keepdims=True)
_NAMES = list(COLORS)


def _to_array(image) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        image = np.asarray(image.convert("RGB"))
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    image = image[..., :3]
    if image.dtype != np.uint8:
        image = np.clip(image if image.max() > 1.5 else image * 255.0, 0, 255).astype(np.uint8)
    return image


def color_coverage(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """img (H, W, 3) uint8 -> (colour index (H, W) int, coverage (H, W) float32)."""
    x = img.astype(np.float32) / 255.0
    c = x - x.mean(-1, keepdims=True)
    proj = c @ _CHROMA.T / (_CHROMA * _CHROMA).sum(1)  # (H, W, 8): coverage if this colour
    cos = (c @ _CHROMA.T) / (np.linalg.norm(c, axis=-1, keepdims=True) * np.linalg.norm(_CHROMA, axis=1) + 1e-8)
    idx = cos.argmax(-1)
    cover = np.take_along_axis(proj, idx[..., None], -1)[..., 0]
    return idx, cover


def _templates(shape: str, params: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """params (C, 3) = (cx, cy, r) in pixels; ys (h,), xs (w,) sample coordinates ->
    (C, h, w) float32 coverage (samples are already sub-pixel)."""
    u = (xs[None, None, :] - params[:, 0, None, None]) / params[:, 2, None, None]
    v = (ys[None, :, None] - params[:, 1, None, None]) / params[:, 2, None, None]
    return inside(shape, u, v).astype(np.float32)


def _fit(shape: str, target: np.ndarray, care: np.ndarray, y0: int, x0: int, init: np.ndarray,
         ss: int, step: float, min_step: float) -> tuple[float, np.ndarray]:
    """Pattern search of (cx, cy, r) for one kind against `target` (h, w) pixel coverage
    in a window at (y0, x0). The template is rendered on an ss x ss sub-grid and averaged
    per pixel, so antialiased edges carry information. Returns (mismatch, params)."""
    h, w = target.shape
    ys = y0 + (np.arange(h * ss) + 0.5) / ss
    xs = x0 + (np.arange(w * ss) + 0.5) / ss
    wgt = care.astype(np.float32)

    def cost(p):
        t = _templates(shape, p, ys, xs).reshape(len(p), h, ss, w, ss).mean((2, 4))
        return (np.abs(t - target) * wgt).sum((1, 2))

    best = np.asarray(init, np.float64)
    best_c = cost(best[None])[0]
    for _ in range(60):
        cand = best[None] + _MOVES * step
        cand[:, 2] = np.maximum(cand[:, 2], 1.0)
        c = cost(cand)
        k = int(c.argmin())
        if c[k] < best_c - 1e-6:
            best, best_c = cand[k], c[k]
        else:
            step /= 2
            if step < min_step:
                break
    return float(best_c), best


_MOVES = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1],
                   [1, 1, 0], [1, -1, 0], [-1, 1, 0], [-1, -1, 0]], np.float64)


def _classify(target: np.ndarray, care: np.ndarray, bbox, y0: int, x0: int, refine: int = 3):
    """Best (mismatch, params, shape): a coarse fit of every kind, then a fine fit of the
    `refine` best."""
    bx0, by0, bx1, by1 = bbox
    coarse = []
    for s in SHAPES:
        ex0, ex1, ey0, ey1 = EXTENTS[s]
        # Occlusion only shrinks a box, so the larger of the two axis estimates.
        r = max((bx1 - bx0) / (ex1 - ex0), (by1 - by0) / (ey1 - ey0))
        init = np.array([(bx0 + bx1) / 2 - (ex0 + ex1) / 2 * r, (by0 + by1) / 2 - (ey0 + ey1) / 2 * r, r])
        err, p = _fit(s, target, care, y0, x0, init, ss=1, step=max(1.0, 0.15 * r), min_step=0.4)
        coarse.append((err, p, s))
    coarse.sort(key=lambda c: c[0])
    fine = [(*_fit(s, target, care, y0, x0, p, ss=4, step=0.4, min_step=0.1), s) for _, p, s in coarse[:refine]]
    return min(fine, key=lambda c: c[0])


def parse_scene(image, min_area: float = 0.003, min_cover: float = 0.5, work_size: int = 64) -> list[dict]:
    """Objects of a world image: image (H, W, 3) uint8 array or PIL image.

    `min_area` is the smallest region kept, as a fraction of the image area. Images
    larger than 1.5 x `work_size` are box-filtered down to `work_size` first (the
    filter keeps antialiased coverage); bbox and area are reported in input pixels."""
    from scipy import ndimage

    img = _to_array(image)
    H0, W0 = img.shape[:2]
    if max(H0, W0) > 1.5 * work_size:
        from PIL import Image

        f = work_size / max(H0, W0)
        img = np.asarray(Image.fromarray(img).resize((max(1, round(W0 * f)), max(1, round(H0 * f))), Image.BOX))
    H, W = img.shape[:2]
    sx, sy = W0 / W, H0 / H
    idx, cover = color_coverage(img)
    fg = cover >= min_cover
    cross = ndimage.generate_binary_structure(2, 1)
    regions: list[tuple[int, np.ndarray]] = []
    for ci in np.unique(idx[fg]):
        m = fg & (idx == ci)
        seeds = ndimage.binary_opening(m, structure=cross)
        lab, n = ndimage.label(m, structure=np.ones((3, 3), bool))
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        seeded = np.bincount(lab[seeds], minlength=n + 1) > 0
        for k in range(1, n + 1):
            if seeded[k] and sizes[k] >= max(4.0, min_area * H * W):
                regions.append((int(ci), lab == k))
    kept = np.zeros((H, W), bool)
    for _, m in regions:
        kept |= m
    objects = []
    for ci, m in regions:
        ys, xs = np.nonzero(m)
        bx0, by0, bx1, by1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        pad = max(2, int(0.3 * max(bx1 - bx0, by1 - by0)))
        y0, y1, x0, x1 = max(0, by0 - pad), min(H, by1 + pad), max(0, bx0 - pad), min(W, bx1 + pad)
        # Fit target: this colour's soft coverage (antialiased edges count by how much
        # they are covered), at least 0.5 inside the region, 0 on other regions.
        own = (idx[y0:y1, x0:x1] == ci) & ~(kept[y0:y1, x0:x1] & ~m[y0:y1, x0:x1])
        target = np.where(own, np.clip(cover[y0:y1, x0:x1], 0, 1), 0.0).astype(np.float32)
        target = np.where(m[y0:y1, x0:x1], np.maximum(target, 0.5), target)
        # Don't care: pixels of other objects (they may be in front of this one).
        care = ~(kept[y0:y1, x0:x1] & ~m[y0:y1, x0:x1])
        err, p, shape = _classify(target, care, (bx0, by0, bx1, by1), y0, x0)
        objects.append({"shape": shape, "color": _NAMES[ci],
                        "center": [round(float(p[0]) / W, 4), round(float(p[1]) / H, 4)],
                        "size": round(float(p[2]) / W, 4),
                        "bbox": [round(bx0 * sx), round(by0 * sy), round(bx1 * sx), round(by1 * sy)],
                        "area": int(round(m.sum() * sx * sy)), "fit": round(err / max(1, m.sum()), 4)})
    return objects


# ----------------------------------------------------------------------------- scoring

def match_objects(pred: list[dict], gt: list[dict], pos_tol: float | None = 0.1) -> dict:
    """Pair predicted and true objects one to one, maximising the number of correct pairs
    (same shape and colour and, when `pos_tol` is set, centres within `pos_tol` of the
    image side), ties broken by distance. Returns {"correct", "n_pred", "n_gt", "pairs":
    [(pred index, gt index), ...] correct pairs only}."""
    from scipy.optimize import linear_sum_assignment

    if not pred or not gt:
        return {"correct": 0, "n_pred": len(pred), "n_gt": len(gt), "pairs": []}
    cost = np.zeros((len(pred), len(gt)))
    ok = np.zeros_like(cost, bool)
    for i, p in enumerate(pred):
        for j, g in enumerate(gt):
            d = float(np.hypot(p["center"][0] - g["center"][0], p["center"][1] - g["center"][1])) \
                if "center" in p and "center" in g else 0.0
            good = p["shape"] == g["shape"] and p["color"] == g["color"] and (pos_tol is None or d <= pos_tol)
            ok[i, j] = good
            cost[i, j] = (-1.0 + 1e-3 * d) if good else 0.0
    ri, ci = linear_sum_assignment(cost)
    pairs = [(int(i), int(j)) for i, j in zip(ri, ci) if ok[i, j]]
    return {"correct": len(pairs), "n_pred": len(pred), "n_gt": len(gt), "pairs": pairs}


def scene_objects(scene) -> list[dict]:
    """Objects of a scene graph dict (or an object list)."""
    return scene["objects"] if isinstance(scene, dict) else list(scene)


def score_scene(image, scene, use_position: bool = True, pos_tol: float = 0.1) -> dict:
    """Parse `image` and compare with `scene` (graph dict or object list)."""
    pred = parse_scene(image)
    gt = scene_objects(scene)
    m = match_objects(pred, gt, pos_tol if use_position else None)
    return {"correct": m["correct"], "n_pred": m["n_pred"], "n_gt": m["n_gt"],
            "exact": m["correct"] == m["n_gt"] == m["n_pred"], "pred": pred, "pairs": m["pairs"]}
