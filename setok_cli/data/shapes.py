"""The synthetic multi-object world: scene graphs, antialiased rendering and the five
SPEC section 4 data sets written from them (`setok data shapes`).

A scene graph is plain JSON (written as `scenes/<stem>.json`) and fully determines the
image: render(scene, size) is a pure function, so an edit re-renders the edited graph
on exactly the same background (the background noise is drawn from a seed stored in
the graph).

    scene = {"version": 1,
             "background": {"kind": "plain"|"gradient"|"noise", "rgb": [r, g, b],
                            "rgb2": [r, g, b], "angle": float, "noise": float, "seed": int},
             "objects": [{"shape": "circle", "color": "red", "center": [x, y], "size": r}, ...]}

Coordinates are resolution independent: `center` is in [0, 1] (x right, y down) and
`size` is the shape's circumradius as a fraction of the image side. Objects are drawn in
list order (later ones occlude earlier ones); instance id i + 1 is `objects[i]`.

The sampler keeps scenes readable by a parser: every object keeps at least
`MIN_VISIBLE` of its area visible in one connected piece, and two objects of the same
colour never touch, so a colour-connected region is always exactly one object.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from ..files import atomic_write_bytes, atomic_write_json, ensure_dir

COLORS: dict[str, tuple[int, int, int]] = {
    # Saturated and well separated in hue, so every one stands off every background.
    "red": (220, 38, 38),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 175, 60),
    "cyan": (30, 200, 215),
    "blue": (40, 70, 225),
    "purple": (145, 55, 205),
    "pink": (240, 100, 190),
}
COLOR_NAMES = tuple(COLORS)
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "ellipse", "cross")
PLURALS = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}
PLURALS["ellipse"] = "ellipses"

MIN_SIZE, MAX_SIZE = 0.10, 0.19   # circumradius, fraction of the image side
MIN_VISIBLE = 0.65                # visible fraction of each object's own area
CHECK_RES = 64                    # resolution at which scene validity is checked
SUPERSAMPLE = 4                   # sub-pixels per side when rendering
MAX_OBJECTS = 6

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
REGIONS = {  # name -> (x, y) target centre for "add"/"move"
    "top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75), "center": (0.5, 0.5), "top": (0.5, 0.22), "bottom": (0.5, 0.78),
    "left": (0.22, 0.5), "right": (0.78, 0.5),
}


# ----------------------------------------------------------------------------- geometry

def _star_boundary(gamma: np.ndarray, inner: float = 0.45) -> np.ndarray:
    """Radius of a 5-point star (outer radius 1) along angle `gamma` in [0, 36] deg
    measured from an outer vertex."""
    ix, iy = inner * np.cos(np.pi / 5), inner * np.sin(np.pi / 5)
    ex, ey = ix - 1.0, iy  # edge O -> I with O = (1, 0)
    dx, dy = np.cos(gamma), np.sin(gamma)
    return (1.0 * ey - 0.0 * ex) / (dx * ey - dy * ex)


def inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of points (u, v) in the unit shape (circumradius 1, y down)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.78) & (np.abs(v) <= 0.78)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "triangle":  # upright, vertices (0, -1), (+-1, 0.8)
        return (v <= 0.8) & (1.8 * np.abs(u) - v <= 1.0)
    if shape == "hexagon":  # flat top
        r3 = np.sqrt(3.0)
        return (np.abs(v) <= r3 / 2) & (r3 * np.abs(u) + np.abs(v) <= r3)
    if shape == "ellipse":
        return u * u + (v / 0.55) ** 2 <= 1.0
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.95) & (av <= 0.32)) | ((au <= 0.32) & (av <= 0.95))
    if shape == "star":  # one point up
        theta = np.arctan2(u, -v) % (2 * np.pi / 5)
        gamma = np.minimum(theta, 2 * np.pi / 5 - theta)
        rho = np.sqrt(u * u + v * v)
        return rho <= _star_boundary(gamma)
    raise ValueError(f"unknown shape {shape!r}")


# Half-extents of each unit shape (x_min, x_max, y_min, y_max): used by the parser to
# seed its fit from a bounding box.
EXTENTS = {
    "circle": (-1, 1, -1, 1), "square": (-0.78, 0.78, -0.78, 0.78), "diamond": (-1, 1, -1, 1),
    "triangle": (-1, 1, -1, 0.8), "hexagon": (-1, 1, -0.866, 0.866), "ellipse": (-1, 1, -0.55, 0.55),
    "cross": (-0.95, 0.95, -0.95, 0.95), "star": (-0.951, 0.951, -1, 0.809),
}


def coverage(shape: str, cx: float, cy: float, r: float, size: int, ss: int = SUPERSAMPLE,
             window: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Sub-pixel membership of one object, in pixel units of a `size` image.

    Returns (mask (h*ss, w*ss) bool, (y0, y1, x0, x1) pixel window). Only the object's
    bounding window is evaluated, so cost grows with the object, not the image.
    """
    if window is None:
        x0, x1 = max(0, int(np.floor(cx - r)) - 1), min(size, int(np.ceil(cx + r)) + 1)
        y0, y1 = max(0, int(np.floor(cy - r)) - 1), min(size, int(np.ceil(cy + r)) + 1)
    else:
        y0, y1, x0, x1 = window
    xs = (np.arange(x0 * ss, x1 * ss) + 0.5) / ss
    ys = (np.arange(y0 * ss, y1 * ss) + 0.5) / ss
    u = (xs[None, :] - cx) / r
    v = (ys[:, None] - cy) / r
    return inside(shape, u, v), (y0, y1, x0, x1)


# ----------------------------------------------------------------------------- rendering

@dataclass
class Rendered:
    image: np.ndarray       # (H, W, 3) uint8
    instances: np.ndarray   # (H, W) uint8, 0 = background, i + 1 = objects[i]
    cover: np.ndarray       # (n + 1, H, W) float32 visible coverage per id (0 = background)
    full_area: np.ndarray   # (n,) each object's own area in pixels, as if unoccluded


def _owner_coverage(objects: list[dict], size: int, ss: int) -> tuple[np.ndarray, np.ndarray]:
    owner = np.zeros((size * ss, size * ss), np.uint8)
    full = np.zeros(len(objects), np.float64)
    for i, o in enumerate(objects):
        cx, cy = o["center"][0] * size, o["center"][1] * size
        m, (y0, y1, x0, x1) = coverage(o["shape"], cx, cy, o["size"] * size, size, ss)
        owner[y0 * ss:y1 * ss, x0 * ss:x1 * ss][m] = i + 1
        full[i] = m.sum() / (ss * ss)
    n = len(objects)
    # counts per id and pixel: one bincount over (pixel, id) pairs.
    blocks = owner.reshape(size, ss, size, ss).transpose(0, 2, 1, 3).reshape(size * size, ss * ss)
    idx = blocks.astype(np.int64) + (n + 1) * np.arange(size * size)[:, None]
    counts = np.bincount(idx.ravel(), minlength=(n + 1) * size * size).reshape(size, size, n + 1)
    cover = counts.transpose(2, 0, 1).astype(np.float32) / (ss * ss)
    return cover, full


def render_background(bg: dict, size: int) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]."""
    c1 = np.asarray(bg["rgb"], np.float32) / 255.0
    img = np.broadcast_to(c1, (size, size, 3)).copy()
    if bg["kind"] == "gradient":
        c2 = np.asarray(bg["rgb2"], np.float32) / 255.0
        t = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
        a = np.deg2rad(bg["angle"])
        s = np.clip(np.cos(a) * t[None, :] + np.sin(a) * t[:, None] + 0.5, 0, 1)
        img = c1 * (1 - s[..., None]) + c2 * s[..., None]
    if bg.get("noise", 0.0) > 0:
        # Noise is drawn at a fixed 256 grid and sampled, so it is the same at any size.
        g = np.random.default_rng(bg["seed"]).normal(0.0, bg["noise"], (256, 256, 1)).astype(np.float32)
        idx = (np.arange(size) * 256) // size
        img = img + g[idx][:, idx]
    return np.clip(img, 0, 1)


def render(scene: dict, size: int, ss: int = SUPERSAMPLE) -> Rendered:
    """Render a scene graph: image colour = coverage-weighted mean of the sub-pixels; the
    instance id of a pixel = the id owning most of its sub-pixels after occlusion."""
    objects = scene["objects"]
    cover, full = _owner_coverage(objects, size, ss)
    img = render_background(scene["background"], size) * cover[0][..., None]
    for i, o in enumerate(objects):
        img += cover[i + 1][..., None] * (np.asarray(COLORS[o["color"]], np.float32) / 255.0)
    image = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    instances = cover.argmax(0).astype(np.uint8)
    return Rendered(image, instances, cover, full)


def _valid(objects: list[dict]) -> bool:
    """Parser-friendliness of a scene, checked at CHECK_RES (independent of output size)."""
    from scipy import ndimage

    cover, full = _owner_coverage(objects, CHECK_RES, 2)
    inst = cover.argmax(0)
    support = cover[1:] > 0
    grown = [ndimage.binary_dilation(s, iterations=1) for s in support]
    for i, o in enumerate(objects):
        vis = cover[i + 1].sum()
        if vis < MIN_VISIBLE * full[i]:
            return False
        _, ncomp = ndimage.label(inst == i + 1)
        if ncomp != 1:
            return False
        for j in range(i):
            if objects[j]["color"] == o["color"] and (grown[i] & support[j]).any():
                return False
    return True


# ----------------------------------------------------------------------------- sampling

def sample_background(rng: np.random.Generator) -> dict:
    """Muted (low saturation) colours, so objects stand off by saturation as well as hue."""
    def muted():
        v = rng.uniform(0.22, 0.78)
        tint = rng.uniform(-0.05, 0.05, 3)
        return [int(round(255 * float(np.clip(v + t, 0, 1)))) for t in tint]

    kind = ("plain", "gradient", "noise")[int(rng.integers(3))]
    bg = {"kind": kind, "rgb": muted(), "rgb2": None, "angle": 0.0, "noise": 0.0,
          "seed": int(rng.integers(2**31 - 1))}
    if kind == "gradient":
        c2 = np.clip(np.asarray(bg["rgb"]) + rng.uniform(-45, 45), 40, 215)
        bg["rgb2"] = [int(c) for c in c2]
        bg["angle"] = float(round(rng.uniform(0, 360), 2))
    if kind == "noise":
        bg["noise"] = float(round(rng.uniform(0.01, 0.025), 4))
    return bg


def sample_object(rng: np.random.Generator, shape: str | None = None, color: str | None = None,
                  center: tuple[float, float] | None = None, jitter: float = 0.0) -> dict:
    r = float(rng.uniform(MIN_SIZE, MAX_SIZE))
    if center is None:
        cx, cy = rng.uniform(r, 1 - r, 2)
    else:
        cx, cy = np.clip(np.asarray(center) + rng.uniform(-jitter, jitter, 2), r, 1 - r)
    return {"shape": shape or SHAPES[int(rng.integers(len(SHAPES)))],
            "color": color or COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))],
            "center": [round(float(cx), 4), round(float(cy), 4)], "size": round(r, 4)}


def sample_scene(rng: np.random.Generator, n: int | None = None, tries: int = 60) -> dict:
    """1..MAX_OBJECTS objects placed one by one; a candidate that breaks a validity rule
    is re-drawn (after `tries` failures the scene keeps the objects it has)."""
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n is None else n
    objects: list[dict] = []
    for _ in range(n):
        for _ in range(tries):
            cand = objects + [sample_object(rng)]
            if _valid(cand):
                objects = cand
                break
    if not objects:  # a lone object is always valid
        objects = [sample_object(rng)]
    return {"version": 1, "background": sample_background(rng), "objects": objects}


# ----------------------------------------------------------------------------- language

def phrase(o: dict) -> str:
    return f"{o['color']} {o['shape']}"


def count_phrase(k: int, color: str, shape: str) -> str:
    if k == 1:
        art = "an" if color[0] in "aeiou" else "a"
        return f"{art} {color} {shape}"
    return f"{NUMBER_WORDS[k]} {color} {PLURALS[shape]}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption(scene: dict, rng: np.random.Generator) -> str:
    groups: dict[tuple[str, str], int] = {}
    for o in scene["objects"]:
        groups[(o["color"], o["shape"])] = groups.get((o["color"], o["shape"]), 0) + 1
    parts = [count_phrase(k, c, s) for (c, s), k in groups.items()]
    n = len(scene["objects"])
    noun = "object" if n == 1 else "objects"
    t = int(rng.integers(3))
    if t == 0:
        return f"{NUMBER_WORDS[n].capitalize()} {noun}: {_join(parts)}."
    if t == 1:
        return f"A picture of {NUMBER_WORDS[n]} {noun}: {_join(parts)}."
    return f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {noun} in the image: {_join(parts)}."


def referring_expression(objects: list[dict], i: int) -> str | None:
    """A unique description of objects[i] (None if none of the templates is unique)."""
    o = objects[i]
    same = [j for j, p in enumerate(objects) if p["color"] == o["color"] and p["shape"] == o["shape"]]
    if len(same) == 1:
        by_shape = sum(p["shape"] == o["shape"] for p in objects)
        by_color = sum(p["color"] == o["color"] for p in objects)
        if by_color == 1 and by_shape > 1:
            return f"the {o['color']} object"
        if by_shape == 1 and by_color > 1:
            return f"the {o['shape']}"
        return f"the {phrase(o)}"
    xs = [objects[j]["center"][0] for j in same]
    ys = [objects[j]["center"][1] for j in same]
    for vals, lo, hi in ((xs, "leftmost", "rightmost"), (ys, "topmost", "bottommost")):
        srt = sorted(vals)
        if srt[1] - srt[0] > 0.08 and objects[i]["center"][0 if vals is xs else 1] == srt[0]:
            return f"the {lo} {phrase(o)}"
        if srt[-1] - srt[-2] > 0.08 and objects[i]["center"][0 if vals is xs else 1] == srt[-1]:
            return f"the {hi} {phrase(o)}"
    return None


def _relation(a: dict, b: dict, rng: np.random.Generator) -> tuple[str, bool] | None:
    dx, dy = b["center"][0] - a["center"][0], b["center"][1] - a["center"][1]
    opts = []
    if abs(dx) > 0.08:
        opts += [("to the left of", dx > 0), ("to the right of", dx < 0)]
    if abs(dy) > 0.08:
        opts += [("above", dy > 0), ("below", dy < 0)]
    return opts[int(rng.integers(len(opts)))] if opts else None


def questions(scene: dict, rng: np.random.Generator, k: int = 5) -> list[tuple[str, str, str]]:
    """(type, question, answer) triples, one of each answerable type, shuffled, first k."""
    objs = scene["objects"]
    qs: list[tuple[str, str, str]] = []
    shapes = [o["shape"] for o in objs]
    colors = [o["color"] for o in objs]
    uniq_shape = [o for o in objs if shapes.count(o["shape"]) == 1]
    uniq_color = [o for o in objs if colors.count(o["color"]) == 1]
    if uniq_shape:
        o = uniq_shape[int(rng.integers(len(uniq_shape)))]
        qs.append(("color", f"What color is the {o['shape']}?", o["color"]))
    if uniq_color:
        o = uniq_color[int(rng.integers(len(uniq_color)))]
        qs.append(("shape", f"What shape is the {o['color']} object?", o["shape"]))
    t = rng.random()  # the total count is uniform over 1..6; per-colour/shape counts skew to 1
    if t < 0.5:
        qs.append(("count", "How many objects are there?", str(len(objs))))
    elif t < 0.75:
        c = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))] if rng.random() < 0.3 else colors[int(rng.integers(len(objs)))]
        qs.append(("count", f"How many {c} objects are there?", str(colors.count(c))))
    else:
        s = SHAPES[int(rng.integers(len(SHAPES)))] if rng.random() < 0.3 else shapes[int(rng.integers(len(objs)))]
        qs.append(("count", f"How many {PLURALS[s]} are there?", str(shapes.count(s))))
    if rng.random() < 0.5:
        o = objs[int(rng.integers(len(objs)))]
        c, s = o["color"], o["shape"]
    else:
        c = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
        s = SHAPES[int(rng.integers(len(SHAPES)))]
    present = any(o["color"] == c and o["shape"] == s for o in objs)
    qs.append(("exist", f"Is there {count_phrase(1, c, s)}?", "yes" if present else "no"))
    names = [referring_expression(objs, i) for i in range(len(objs))]
    pairs = [(i, j) for i in range(len(objs)) for j in range(len(objs)) if i != j and names[i] and names[j]]
    if pairs:
        i, j = pairs[int(rng.integers(len(pairs)))]
        rel = _relation(objs[i], objs[j], rng)
        if rel is not None:
            q = f"Is {names[i]} {rel[0]} {names[j]}?"
            qs.append(("relation", q[0].upper() + q[1:], "yes" if rel[1] else "no"))
    order = rng.permutation(len(qs))
    return [qs[i] for i in order[:k]]


# ----------------------------------------------------------------------------- edits

def region_name(center: list[float]) -> str:
    return min(REGIONS, key=lambda k: (REGIONS[k][0] - center[0]) ** 2 + (REGIONS[k][1] - center[1]) ** 2)


def sample_edit(scene: dict, rng: np.random.Generator, tries: int = 40) -> tuple[dict, str, dict] | None:
    """One edit (recolor, remove, add, move) of a scene -> (target scene, instruction,
    info). info = {"op", "object": source instance id or None, "preserved": target ids
    of objects that are unchanged}. None if no valid edit was found."""
    objs = scene["objects"]
    ops = ["recolor", "move"] + (["remove"] if len(objs) > 1 else []) + (["add"] if len(objs) < MAX_OBJECTS else [])
    for _ in range(tries):
        op = ops[int(rng.integers(len(ops)))]
        if op == "add":
            region = list(REGIONS)[int(rng.integers(len(REGIONS)))]
            new = sample_object(rng, center=REGIONS[region], jitter=0.05)
            target = objs + [new]
            if region_name(new["center"]) != region or not _valid(target):
                continue
            instr = f"Add {count_phrase(1, new['color'], new['shape'])} at the {region}." if region in (
                "top", "bottom", "left", "right", "center") else \
                f"Add {count_phrase(1, new['color'], new['shape'])} in the {region}."
            return ({**scene, "objects": target}, instr,
                    {"op": op, "object": None, "preserved": list(range(1, len(objs) + 1))})
        i = int(rng.integers(len(objs)))
        name = referring_expression(objs, i)
        if name is None:
            continue
        rest = [k + 1 for k in range(len(objs)) if k != i]
        if op == "remove":
            target = objs[:i] + objs[i + 1:]
            if not _valid(target):
                continue
            return ({**scene, "objects": target}, f"Remove {name}.",
                    {"op": op, "object": i + 1, "preserved": list(range(1, len(target) + 1))})
        if op == "recolor":
            c = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
            if c == objs[i]["color"]:
                continue
            target = [dict(o) for o in objs]
            target[i]["color"] = c
            if not _valid(target):
                continue
            return ({**scene, "objects": target}, f"Make {name} {c}.",
                    {"op": op, "object": i + 1, "preserved": rest})
        if op == "move":
            region = list(REGIONS)[int(rng.integers(len(REGIONS)))]
            o = dict(objs[i])
            r = o["size"]
            c = np.clip(np.asarray(REGIONS[region]) + rng.uniform(-0.04, 0.04, 2), r, 1 - r)
            if region_name(list(c)) != region or region_name(o["center"]) == region:
                continue
            o["center"] = [round(float(c[0]), 4), round(float(c[1]), 4)]
            target = objs[:i] + [o] + objs[i + 1:]
            if not _valid(target):
                continue
            where = "to the " + region if region != "center" else "to the center"
            return ({**scene, "objects": target}, f"Move {name} {where}.",
                    {"op": op, "object": i + 1, "preserved": rest})
    return None


# ----------------------------------------------------------------------------- I/O

def png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def scene_record(scene: dict, r: Rendered, size: int) -> dict:
    """The scene graph plus what the render measured (pixel bboxes and visible areas)."""
    objs = []
    for i, o in enumerate(scene["objects"]):
        ys, xs = np.nonzero(r.instances == i + 1)
        bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if len(xs) else [0, 0, 0, 0]
        objs.append({"id": i + 1, **o, "bbox": bbox, "area": int(len(xs))})
    return {**scene, "size": size, "objects": objs}


def parse_splits(text: str) -> list[tuple[str, float]]:
    from ..errors import UserError

    try:
        fr = [float(t) for t in text.split(",")]
    except ValueError:
        raise UserError(f"--splits must be comma-separated fractions like 0.8,0.1,0.1, got {text!r}") from None
    if not 1 <= len(fr) <= 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise UserError(f"--splits needs 1 to 3 non-negative fractions summing to 1 (train,val,test), got {text!r}")
    return [(name, f) for name, f in zip(("train", "val", "test"), fr)]


def split_counts(n: int, splits: list[tuple[str, float]]) -> list[tuple[str, int]]:
    counts = [int(round(n * f)) for _, f in splits]
    counts[-1] = n - sum(counts[:-1])
    if counts[-1] < 0:
        counts[-2] += counts[-1]
        counts[-1] = 0
    return [(name, c) for (name, _), c in zip(splits, counts) if c > 0]


def make_example(index: int, seed: int, size: int) -> dict:
    """Everything for one image, deterministic in (seed, index); no file I/O."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng)
    r = render(scene, size)
    rec = scene_record(scene, r, size)
    stem = f"{index:06d}"
    out = {"stem": stem, "scene": rec, "render": r, "caption": caption(scene, rng),
           "phrases": [phrase(o) for o in scene["objects"]], "questions": questions(scene, rng),
           "referring": [], "edit": None}
    objs = scene["objects"]
    order = rng.permutation(len(objs))
    for i in order[:2]:
        expr = referring_expression(objs, int(i))
        if expr is not None:
            out["referring"].append((expr, int(i) + 1))
    ed = sample_edit(scene, rng)
    if ed is not None:
        tscene, instr, info = ed
        tr = render(tscene, size)
        out["edit"] = {"scene": scene_record(tscene, tr, size), "render": tr, "instruction": instr, "info": info}
    return out


def write_split(root: Path, split: str, indices: Iterable[int], seed: int, size: int,
                advance=None) -> dict[str, int]:
    """Write one split's images, masks, scenes and the five JSON lists. Returns counts."""
    d = Path(root) / split
    lists: dict[str, list] = {k: [] for k in ("pairs", "instruct", "referring", "edits", "objects")}
    for index in indices:
        ex = make_example(index, seed, size)
        s = ex["stem"]
        img, inst = f"images/{s}.png", f"instances/{s}.png"
        scn = f"scenes/{s}.json"
        atomic_write_bytes(d / img, png_bytes(ex["render"].image))
        atomic_write_bytes(d / inst, png_bytes(ex["render"].instances))
        atomic_write_json(d / scn, ex["scene"], indent=None)
        lists["pairs"].append({"image": img, "caption": ex["caption"], "phrases": ex["phrases"],
                               "instances": inst, "scene": scn})
        lists["objects"].append({"image": img, "instances": inst, "scene": scn})
        for q, (qtype, question, answer) in enumerate(ex["questions"]):
            lists["instruct"].append({"id": f"{s}_q{q}", "image": img, "type": qtype, "conversations": [
                {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
        for k, (expr, oid) in enumerate(ex["referring"]):
            m = f"referring/{s}_{k}.png"
            atomic_write_bytes(d / m, png_bytes(np.where(ex["render"].instances == oid, 255, 0).astype(np.uint8)))
            lists["referring"].append({"image": img, "expression": expr, "mask": m, "object": oid, "scene": scn})
        if ex["edit"] is not None:
            e = ex["edit"]
            tgt, tscn = f"edits/{s}_0.png", f"edits/{s}_0.json"
            atomic_write_bytes(d / tgt, png_bytes(e["render"].image))
            atomic_write_json(d / tscn, e["scene"], indent=None)
            lists["edits"].append({"source": img, "target": tgt, "instruction": e["instruction"],
                                   "source_scene": scn, "target_scene": tscn, "edit": e["info"]})
        if advance is not None:
            advance()
    for k, v in lists.items():
        atomic_write_json(d / f"{k}.json", v, indent=None)
    return {k: len(v) for k, v in lists.items()}


def generate(out: str | Path, n: int = 1000, size: int = 64, seed: int = 0,
             splits: str | list[tuple[str, float]] = "0.8,0.1,0.1", progress: bool = False) -> dict:
    """Generate the world into `out`/{train,val,test}/. Returns a summary dict (also
    written as `out`/dataset.json). Image i is a function of (seed, i) alone."""
    from ..errors import UserError

    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    if size < 32:
        raise UserError(f"--size must be at least 32 pixels, got {size}")
    sp = parse_splits(splits) if isinstance(splits, str) else splits
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root} exists and is not a directory")
    ensure_dir(root)  # before rendering: an unwritable --out fails at once
    counts = split_counts(n, sp)
    summary = {"generator": "setok data shapes", "version": 1, "n": n, "size": size, "seed": seed,
               "colors": COLORS, "shapes": list(SHAPES), "splits": {}}
    start = 0
    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                       TimeRemainingColumn(), transient=True)
        bar.start()
    try:
        for name, c in counts:
            adv = None
            if bar is not None:
                task = bar.add_task(name, total=c)
                adv = lambda t=task: bar.advance(t)  # noqa: E731
            summary["splits"][name] = write_split(root, name, range(start, start + c), seed, size, adv)
            start += c
    finally:
        if bar is not None:
            bar.stop()
    atomic_write_json(root / "dataset.json", summary)
    return summary
