"""The `setok tokenize` pipeline as a library call.

    results, failures = tokenize_files(["cat.jpg", "photos/"], load_tokenizer(), out_dir="out",
                                       show_masks=True, write_json=True)

Bad inputs (missing, unreadable, empty, not an image, smaller than one patch) do not
stop a batch: each becomes a Failure and the rest is tokenized. Output files are
written atomically (a temporary file in the same folder, then a rename), so an
interrupted run never leaves a half-written PNG or JSON.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np

from ..errors import UserError
from ..files import atomic_write, atomic_write_text, ensure_dir
from ..images import expand_inputs, load_image


@dataclass
class ImageResult:
    path: str
    num_tokens: int
    grid: tuple[int, int]  # (gh, gw) patches covering the image
    seconds: float  # this image's share of its batch's wall time
    labels: np.ndarray  # (gh, gw) int64
    seeds: list[int]  # per token: flat index row * gw + col on the image grid, -1 none
    outputs: list[str] = field(default_factory=list)


@dataclass
class Failure:
    path: str
    message: str


def _stems(paths: list[str]) -> list[str]:
    """Output stems, made unique when two inputs share a file name (a.png, a_2.png...)."""
    out, count = [], {}
    for p in paths:
        s = os.path.splitext(os.path.basename(p))[0] or "image"
        n = count.get(s, 0) + 1
        count[s] = n
        out.append(s if n == 1 else f"{s}_{n}")
    return out


def image_json(res: ImageResult, mode: str, encoder: str) -> dict:
    return {"image": res.path, "num_tokens": res.num_tokens, "grid": list(res.grid),
            "labels": res.labels.tolist(), "seeds": res.seeds, "mode": mode, "encoder": encoder}


def tokenize_files(inputs: Iterable[str], model, *, out_dir: Optional[str] = None, show_masks: bool = False,
                   write_json: bool = False, batch_size: int = 8,
                   on_result: Optional[Callable[[object], None]] = None) -> tuple[list[ImageResult], list[Failure]]:
    """Tokenize image files, folders and globs. on_result(ImageResult | Failure) is called
    as each input finishes (for progress display)."""
    paths, problems = expand_inputs(inputs)
    failures = [Failure(p, m) for p, m in problems]
    for f in failures:
        if on_result:
            on_result(f)
    if (show_masks or write_json) and paths:
        out_dir = out_dir or "."
        ensure_dir(out_dir)
    stems = dict(zip(paths, _stems(paths)))
    mode, enc = model.config.mode, model.config.encoder
    results: list[ImageResult] = []
    batch_size = max(1, int(batch_size))
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        imgs, names = [], []
        for p in chunk:
            try:
                img = load_image(p)
                if min(img.size) < model.patch_size:
                    raise UserError(f"{p}: {img.size[0]}x{img.size[1]} pixels is too small for one "
                                    f"{model.patch_size}x{model.patch_size} patch")
            except UserError as e:
                failures.append(Failure(p, str(e)))
                if on_result:
                    on_result(failures[-1])
                continue
            imgs.append(img)
            names.append(p)
        if not imgs:
            continue
        t0 = time.perf_counter()
        out = model.tokenize(imgs, names=names)
        dt = (time.perf_counter() - t0) / len(imgs)
        W = out.grid[1]
        for i, p in enumerate(names):
            gh, gw = out.image_grids[i]
            n = int(out.num_tokens[i])
            labels = out.labels[i, :gh, :gw].cpu().numpy().astype(np.int64)
            seeds = []
            for s in out.seeds[i, :n].tolist():
                seeds.append(-1 if s < 0 else (s // W) * gw + (s % W))
            res = ImageResult(p, n, (gh, gw), dt, labels, seeds)
            stem = stems[p]
            if show_masks:
                from ..viz import draw_tokens

                png = os.path.join(out_dir, f"{stem}_tokens.png")
                pic = draw_tokens(out.images[i], labels, seeds,
                                  title=f"{os.path.basename(p)}: {n} tokens ({mode}, {enc})")
                atomic_write(png, lambda tmp: pic.save(tmp, format="PNG"))
                res.outputs.append(png)
            if write_json:
                js = os.path.join(out_dir, f"{stem}_tokens.json")
                atomic_write_text(js, json.dumps(image_json(res, mode, enc), separators=(",", ":")) + "\n")
                res.outputs.append(js)
            results.append(res)
            if on_result:
                on_result(res)
    return results, failures
