"""Drawing tokens: the image beside an overlay of each token's region.

    draw_tokens(image, labels, seeds) -> PIL.Image
"""
from __future__ import annotations

import colorsys
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def palette(n: int) -> np.ndarray:
    """n well-separated RGB colours (golden-ratio hue steps, alternating lightness). -> (n, 3) uint8"""
    out = []
    for i in range(n):
        h = (0.13 + i * 0.618033988749895) % 1.0
        l = (0.50, 0.62, 0.40)[i % 3]
        s = (0.85, 0.70, 0.95)[(i // 3) % 3]
        out.append([round(c * 255) for c in colorsys.hls_to_rgb(h, l, s)])
    return np.asarray(out, dtype=np.uint8).reshape(n, 3)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def token_anchor(labels: np.ndarray, token: int, seed: int) -> Optional[tuple[int, int]]:
    """(row, col) on the patch grid where token's number goes: its seed if it has one,
    else the region's patch nearest to the region's centroid (the remainder token)."""
    h, w = labels.shape
    if 0 <= seed < h * w and labels.flat[seed] == token:
        return divmod(int(seed), w)
    rr, cc = np.nonzero(labels == token)
    if rr.size == 0:
        return divmod(int(seed), w) if 0 <= seed < h * w else None
    i = int(np.argmin((rr - rr.mean()) ** 2 + (cc - cc.mean()) ** 2))
    return int(rr[i]), int(cc[i])


def draw_tokens(image: Image.Image, labels: np.ndarray, seeds: Sequence[int], *, alpha: float = 0.55,
                display: int = 512, gap: int = 8, title: Optional[str] = None) -> Image.Image:
    """The image (left) and its token regions (right).

    image: the RGB image the grid covers (its size need not be a multiple of the grid).
    labels: (h, w) int token index per patch (-1: no token, drawn unchanged).
    seeds: (K,) flat patch index of each token's seed (-1 for none: number at the centroid).
    Every token gets its own colour blended over the image, region borders are drawn in
    white, and each token's number is written at its seed.
    """
    labels = np.asarray(labels)
    h, w = labels.shape
    img = image.convert("RGB")
    scale = display / max(img.size)
    W, H = max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))
    img = img.resize((W, H), Image.Resampling.LANCZOS)
    base = np.asarray(img).astype(np.float32)

    # patch grid -> display pixels (nearest), so borders fall on patch edges
    ys = np.minimum((np.arange(H) * h) // H, h - 1)
    xs = np.minimum((np.arange(W) * w) // W, w - 1)
    lab_px = labels[ys[:, None], xs[None, :]]  # (H, W)
    K = int(max(labels.max() + 1, len(seeds), 1))
    colours = palette(K).astype(np.float32)
    has = lab_px >= 0
    over = base.copy()
    over[has] = (1 - alpha) * base[has] + alpha * colours[lab_px[has]]
    border = np.zeros((H, W), dtype=bool)
    border[:, 1:] |= lab_px[:, 1:] != lab_px[:, :-1]
    border[1:, :] |= lab_px[1:, :] != lab_px[:-1, :]
    border[:, :-1] |= border[:, 1:].copy()  # 2 px wide
    over[border] = 255.0
    right = Image.fromarray(over.clip(0, 255).astype(np.uint8))

    draw = ImageDraw.Draw(right)
    fsize = max(9, min(18, int(0.55 * min(H / h, W / w) + 4)))
    font = _font(fsize)
    for t in range(K):
        seed = int(seeds[t]) if t < len(seeds) else -1
        rc = token_anchor(labels, t, seed)
        if rc is None:
            continue
        cy = (rc[0] + 0.5) * H / h
        cx = (rc[1] + 0.5) * W / w
        draw.text((cx, cy), str(t), fill=(255, 255, 255), font=font, anchor="mm", stroke_width=2,
                  stroke_fill=(0, 0, 0))

    top = 0
    if title:
        top = fsize + 8
    canvas = Image.new("RGB", (2 * W + gap, H + top), (255, 255, 255))
    canvas.paste(img, (0, top))
    canvas.paste(right, (W + gap, top))
    if title:
        ImageDraw.Draw(canvas).text((4, 4), title, fill=(0, 0, 0), font=_font(fsize))
    return canvas
