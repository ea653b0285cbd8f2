"""The figure of `setok bench-reduce`: VQA accuracy against visual tokens per image, one line
per reducer, the 576-token model dashed (matplotlib when installed, else drawn with PIL).
"""
from __future__ import annotations

import math

from .cost import FULL

COLOURS = {"setok": (214, 39, 40), "setok-fixed": (247, 152, 152), "pool2d": (31, 119, 180),
           "random": (127, 127, 127), "tome": (44, 160, 44), "visionzip": (148, 103, 189), "prumerge": (255, 127, 14),
           "full": (0, 0, 0)}


def plot(acc: dict, path, title: str = "VQA accuracy vs visual tokens per image (synthetic world, tiny LLaVA)") -> None:
    """Accuracy against tokens per image (log axis), one line per method, the 576-token model
    as a dashed line; PNG via matplotlib when installed, else drawn with PIL."""
    from ...files import atomic_write_bytes

    runs = acc["runs"]
    series = {}
    for r in runs:
        if r.get("accuracy") is None or r["method"] == "full":
            continue
        series.setdefault(r["method"], []).append((r["tokens_mean"], r["accuracy"], r["budget"]))
    full = next((r for r in runs if r["method"] == "full"), None)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    import io
    buf = io.BytesIO()
    if plt is not None:  # pragma: no cover (matplotlib is optional)
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for m, pts in series.items():
            pts = sorted(pts, key=lambda p: p[0])
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=m,
                    color=[c / 255 for c in COLOURS.get(m, (0, 0, 0))])
        if full is not None:
            ax.axhline(100 * full["accuracy"], ls="--", color="k", label="all 576 tokens")
        ax.set_xscale("log")
        ax.set_xlabel("visual tokens per image (mean)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(buf, format="png")
        plt.close(fig)
    else:
        _plot_pil(series, full, title, buf)
    atomic_write_bytes(path, buf.getvalue())


def _plot_pil(series, full, title, buf) -> None:
    from PIL import Image, ImageDraw

    W, H, L, R, T, B = 820, 520, 70, 150, 40, 60
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    xs = [p[0] for pts in series.values() for p in pts] + ([FULL] if full else [])
    ys = [p[1] for pts in series.values() for p in pts] + ([full["accuracy"]] if full else [])
    if not xs:
        xs, ys = [1, FULL], [0, 1]
    x0, x1 = math.log(max(min(xs), 1) * 0.8), math.log(max(xs) * 1.25)
    y0 = max(0.0, math.floor(min(ys) * 10) / 10 - 0.05)
    y1 = min(1.0, math.ceil(max(ys) * 10) / 10 + 0.02)
    if y1 <= y0:
        y1 = y0 + 0.1

    def px(x, y):
        return (L + (math.log(max(x, 1e-9)) - x0) / (x1 - x0) * (W - L - R),
                H - B - (y - y0) / (y1 - y0) * (H - T - B))

    d.rectangle([L, T, W - R, H - B], outline="black")
    for t in (1, 2, 4, 8, 16, 32, 64, 128, 256, 576):
        if math.log(t) < x0 or math.log(t) > x1:
            continue
        x, _ = px(t, y0)
        d.line([x, H - B, x, H - B + 5], fill="black")
        d.text((x - 8, H - B + 8), str(t), fill="black")
    step = 0.02 if y1 - y0 <= 0.2 else 0.05  # gridlines at whole percents
    y = math.ceil(y0 / step - 1e-9) * step
    while y <= y1 + 1e-9:
        _, yy = px(1, y)
        d.line([L - 5, yy, L, yy], fill="black")
        d.line([L, yy, W - R, yy], fill=(235, 235, 235))
        d.text((L - 40, yy - 6), f"{100 * y:.0f}%", fill="black")
        y += step
    d.rectangle([L, T, W - R, H - B], outline="black")
    d.text((L, 12), title, fill="black")
    d.text(((W - R + L) // 2 - 90, H - 25), "visual tokens per image (mean, log scale)", fill="black")
    ly = T + 5
    if full is not None:
        _, yy = px(1, full["accuracy"])
        for xx in range(L, W - R, 12):
            d.line([xx, yy, min(xx + 6, W - R), yy], fill="black", width=2)
        x, _ = px(FULL, full["accuracy"])
        d.ellipse([x - 4, yy - 4, x + 4, yy + 4], fill="black")
        d.line([W - R + 10, ly + 6, W - R + 30, ly + 6], fill="black", width=2)
        d.text((W - R + 35, ly), "all 576 tokens", fill="black")
        ly += 18
    for m, pts in series.items():
        c = COLOURS.get(m, (0, 0, 0))
        pts = sorted(pts, key=lambda p: p[0])
        coords = [px(p[0], p[1]) for p in pts]
        if len(coords) > 1:
            d.line(coords, fill=c, width=2)
        for (x, y) in coords:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=c)
        d.line([W - R + 10, ly + 6, W - R + 30, ly + 6], fill=c, width=3)
        d.text((W - R + 35, ly), m, fill="black")
        ly += 18
    im.save(buf, format="PNG")
