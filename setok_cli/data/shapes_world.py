"""The synthetic multi-object world: scene graphs, their antialiased rendering and
sampling (the data sets written from them are `setok_cli.data.shapes`).

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

from dataclasses import dataclass

import numpy as np

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
