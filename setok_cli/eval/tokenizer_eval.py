"""`setok eval tokenizer`: FG-ARI, mBO and token counts of a tokenizer on the shapes world
(`harness.eval_tokenizer`, re-exported there)."""
from __future__ import annotations

import time

import numpy as np

from ..data import formats
from ..errors import UserError
from ..files import load_ids
from . import metrics as M


def eval_tokenizer(data: str, tokenizer=None, model=None, encoder=None, mode=None, k=None, bandwidth=None,
                   max_tokens=None, batch_size: int = 16, limit: int | None = None, progress: bool = False) -> dict:
    """FG-ARI, mBO and token counts of a tokenizer on objects (or pairs with instances).

    FG-ARI: the instance PNG is resampled to the tokenizer's patch grid by a majority
    vote of 4 x 4 sample points per patch; ARI between token labels and instance ids over
    patches whose id is > 0, averaged over images. mBO: token labels are upsampled to
    pixels (nearest patch); for each object the best IoU with any token region (the
    background's tokens included as candidates); mean over all objects of all images.
    mBO_grid: the same on the patch grid against the resampled instances (objects
    smaller than a patch drop out), which separates clustering quality from the grid's
    resolution limit.
    """
    from PIL import Image

    from .harness import _mean, load_image

    kind, entries = formats.load_kind(data, ("objects", "pairs"))
    entries = [e for e in entries if "instances" in e]
    if not entries:
        raise UserError(f"{data} has no entries with 'instances' (instance PNGs are needed for FG-ARI and mBO)")
    if limit is not None:
        entries = entries[:limit]
    if tokenizer is None:
        try:
            from ..models.setok import load_tokenizer
        except ImportError as e:
            raise UserError(f"the SeTok tokenizer is not available in this install ({e})") from None
        overrides = {k_: v for k_, v in dict(model=model, encoder=encoder, mode=mode, k=k, bandwidth=bandwidth,
                                             max_tokens=max_tokens).items() if v is not None}
        tokenizer = load_tokenizer(**overrides)

    aris, overlaps, overlaps_grid, tokens, n_objects = [], [], [], [], 0
    grid = None
    seconds = 0.0
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("tokenize", total=len(entries))
    try:
        for b in range(0, len(entries), batch_size):
            batch = entries[b:b + batch_size]
            images = [Image.fromarray(load_image(e["image"])) for e in batch]
            t = time.perf_counter()
            out = tokenizer.tokenize(images)
            seconds += time.perf_counter() - t
            labels = _np(out.labels)
            num = _np(out.num_tokens).reshape(-1)
            grid = tuple(int(g) for g in (out.grid if getattr(out, "grid", None) is not None else labels.shape[1:]))
            for i, e in enumerate(batch):
                ids = load_ids(e["instances"])
                lab = labels[i]
                ids_g = M.resample_ids(ids, lab.shape)
                aris.append(M.fg_ari(lab, ids_g))
                overlaps += M.best_overlap(M.upsample_labels(lab, ids.shape), ids)
                overlaps_grid += M.best_overlap(lab, ids_g)
                tokens.append(int(num[i]))
                n_objects += int(len(np.unique(ids[ids > 0])))
            if bar is not None:
                bar.advance(task, len(batch))
    finally:
        if bar is not None:
            bar.stop()
    return {"task": "tokenizer", "data": str(data), "images": len(entries), "objects": n_objects,
            "fg_ari": _mean(aris), "mbo": _mean(overlaps), "mbo_grid": _mean(overlaps_grid),
            "tokens_per_image": float(np.mean(tokens)), "tokens_per_object": sum(tokens) / max(1, n_objects),
            "objects_per_image": n_objects / len(entries), "grid": list(grid) if grid else None,
            "images_per_s": len(entries) / seconds if seconds > 0 else None}


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


