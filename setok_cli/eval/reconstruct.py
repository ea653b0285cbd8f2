"""Stage-1 scoring: `setok eval reconstruct --model CKPT --data pairs.json`.

    parts = load_stage1("runs/tiny-stage1")                 # a run folder, or checkpoints/step_*
    res = evaluate_reconstruction(parts.setok, parts.detokenizer, parts.mask_decoder, parts.alignment,
                                  data="data/shapes/test/pairs.json", image_size=parts.image_size,
                                  tokenizer_image_size=parts.tokenizer_image_size)

What it measures, on a pairs file with instance PNGs and scene graphs (the shapes world):
- reconstructions (tokens -> detokenizer samples, upsampled to the data's size), parsed by
  the scene parser and matched one to one to the scene's objects (shape, colour, centre
  within 10% of the side): recall = objects right / objects in the scenes, precision =
  objects right / objects parsed, so a reconstruction that adds objects scores below 1;
- the same for the token canvas alone (its image channels, where the detokenizer trains
  them: canvas_recon_weight > 0), so one sees what the diffusion part adds; and for the
  ground truth squeezed through the detokenizer's resolution, the ceiling;
- the mask decoder's mIoU over objects (`segment_miou`);
- FG-ARI / mBO / tokens per image of the trained clustering and of the untrained one
  (the same config, the cluster head at its identity initialisation);
- image -> caption and caption -> image retrieval through the alignment heads over the
  whole (limited) data file: R@1 and R@5, a hit being any candidate with the query's
  caption text (the shapes world repeats captions, and retrieving a twin is not wrong).
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from . import metrics as M

__all__ = ["Stage1Parts", "load_stage1", "evaluate_reconstruction", "SceneTally", "per_shape", "image_embeddings",
           "retrieval_scores", "training_figures"]


# ----------------------------------------------------------------------------- loading

@dataclass
class Stage1Parts:
    folder: Path                       # the checkpoint folder (checkpoints/step_*)
    setok: torch.nn.Module
    detokenizer: Optional[torch.nn.Module]
    mask_decoder: Optional[torch.nn.Module]
    alignment: Optional[torch.nn.Module]
    image_size: Optional[int]          # the recipe's data.image_size (None: the data's own)
    tokenizer_image_size: Optional[int] = None   # the recipe's model.tokenizer.image_size (as in training)


def load_stage1(path) -> Stage1Parts:
    """The parts of a stage-1 training checkpoint (setok/, detokenizer/, mask_decoder/,
    alignment/, recipe.yaml), or of a run folder's latest checkpoint."""
    from ..models.stage1 import load_stage1 as load_parts
    from ..models.stage1 import stage1_folder, stage1_recipe

    folder = stage1_folder(path)
    if not (folder / "setok").is_dir():
        raise UserError(f"{folder}: not a stage-1 checkpoint (no setok/ folder); give a run folder or one of "
                        f"its checkpoints/step_* folders")
    parts = load_parts(folder)
    recipe = stage1_recipe(folder)
    size = (recipe.get("data") or {}).get("image_size")
    tok_size = ((recipe.get("model") or {}).get("tokenizer") or {}).get("image_size")
    return Stage1Parts(folder, parts["setok"], parts["detokenizer"], parts["mask_decoder"], parts["alignment"],
                       int(size) if size else None, int(tok_size) if tok_size else None)


def training_figures(folder: Path) -> dict:
    """Step, wall time and peak memory of the run that wrote checkpoint `folder`, from the
    run's log.jsonl (the record of the checkpoint's step); {} when there is no log."""
    log = folder.parent.parent / "log.jsonl"
    state = folder / "trainer_state.json"
    if not (log.is_file() and state.is_file()):
        return {}
    try:
        step = json.loads(state.read_text())["step"]
        recs = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{log}: unreadable ({e})") from None
    upto = [r for r in recs if isinstance(r, dict) and r.get("step", 0) <= step]
    if not upto or upto[-1].get("elapsed_s") is None:
        return {}
    out = {"train_steps": step, "train_wall_s": round(float(upto[-1]["elapsed_s"]), 1)}
    mem = [r["peak_mem_mb"] for r in upto if r.get("peak_mem_mb") is not None]
    if mem:
        out["train_peak_mem_mb"] = round(float(max(mem)), 1)
    return out


# ----------------------------------------------------------------------------- scoring pieces

class SceneTally:
    """Objects right / in the scenes / parsed, summed over images (`score_scene`'s counts),
    and per true shape: by_shape[shape] = [right, in the scenes]."""

    def __init__(self):
        self.correct = self.n_gt = self.n_pred = 0
        self.by_shape: dict[str, list[int]] = {}

    def add(self, image: np.ndarray, scene: dict) -> None:
        """image (H, W, 3) uint8; scene a scene graph."""
        from ..data.scene_parser import score_scene, scene_objects
        s = score_scene(image, scene)
        self.correct += s["correct"]
        self.n_gt += s["n_gt"]
        self.n_pred += s["n_pred"]
        gt = scene_objects(scene)
        right = {j for _, j in s["pairs"]}
        for j, o in enumerate(gt):
            row = self.by_shape.setdefault(o["shape"], [0, 0])
            row[0] += j in right
            row[1] += 1

    def recall(self) -> Optional[float]:
        return self.correct / self.n_gt if self.n_gt else None

    def precision(self) -> Optional[float]:
        return self.correct / self.n_pred if self.n_pred else None


def per_shape(tallies: dict[str, SceneTally]) -> dict[str, dict[str, int]]:
    """{shape: {"objects": n, name: objects right for each tally}} over the true shapes."""
    first = next(iter(tallies.values()))
    return {shape: {"objects": first.by_shape[shape][1],
                    **{name: t.by_shape.get(shape, [0, 0])[0] for name, t in tallies.items()}}
            for shape in sorted(first.by_shape)}


def image_embeddings(alignment, tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """tokens (B, K, T), token_mask (B, K) -> (B, E): the image side of the alignment's
    image-caption InfoNCE (projected tokens, mean over the valid ones)."""
    return alignment.encode_image(tokens, token_mask)


def _text_key(s: str) -> str:
    return " ".join(str(s).lower().split())


def retrieval_scores(image_emb: torch.Tensor, text_emb: torch.Tensor, captions: list[str]) -> dict:
    """image_emb (N, E), text_emb (N, E), row i of each from pair i -> R@1 and R@5 of
    image -> caption and caption -> image by cosine similarity."""
    sim = (F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).t()).numpy()
    keys = [_text_key(c) for c in captions]
    return {"i2t_r1": M.retrieval_recall(sim, keys, keys, 1), "i2t_r5": M.retrieval_recall(sim, keys, keys, 5),
            "t2i_r1": M.retrieval_recall(sim.T, keys, keys, 1), "t2i_r5": M.retrieval_recall(sim.T, keys, keys, 5),
            "retrieval_pool": len(keys)}


def canvas_image(detok, tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """The token canvas's image channels decoded: (B, 3, S, S) in [0, 1]."""
    return detok.decode(detok.canvas(tokens, token_mask)[:, :detok._channels()])


def _u8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    return (x.float().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _resize(x: torch.Tensor, size: int, antialias: bool = False) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=antialias, align_corners=False)


def _save_grid(path, rows: list[torch.Tensor]) -> None:
    """rows: (k, 3, H, W) each -> one PNG, a row per tensor, shown at 2x."""
    from PIL import Image

    from ..files import atomic_write
    a = np.concatenate([np.concatenate([_u8(t) for t in row], axis=1) for row in rows], axis=0)
    im = Image.fromarray(a).resize((a.shape[1] * 2, a.shape[0] * 2), Image.NEAREST)
    atomic_write(path, lambda tmp: im.save(tmp))


def _segments(logits: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Mask-decoder logits (B, K, H, W) -> arg-max segments in random colours (B, 3, H, W)."""
    lab = logits.masked_fill(~token_mask[:, :, None, None], -1e9).argmax(1)
    pal = torch.rand(64, 3, generator=torch.Generator().manual_seed(1))
    return pal[lab % 64].permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- the evaluation

def evaluate_reconstruction(setok, detokenizer=None, mask_decoder=None, alignment=None, data=None, *,
                            limit: Optional[int] = None, steps: Optional[int] = None, seed: int = 0,
                            batch_size: int = 25, image_size: Optional[int] = None,
                            tokenizer_image_size: Optional[int] = None, grid=None,
                            progress: bool = False) -> dict:
    """Score in-memory stage-1 parts on `data` (a pairs file with instances; scene graphs
    for the reconstructions). image_size: the size the images are read at (the recipe's
    data.image_size); the tokenizer gets them at `tokenizer_image_size` (the recipe's
    model.tokenizer.image_size, as in training), else at its own config.image_size. grid: a PNG
    path for originals / reconstructions / canvas / segments of the first batch."""
    from ..data.datasets import PairsDataset, collate
    from ..models.mask_decoder import segment_miou
    from .harness import eval_tokenizer, load_scene

    if data is None:
        raise UserError("no data file: give a pairs.json with instances (and scene graphs to score reconstructions)")
    ds = PairsDataset(data, image_size=image_size)
    n = len(ds) if limit is None else min(limit, len(ds))
    if n == 0:
        raise UserError(f"{data}: no entries")
    need = ["instances"] + (["scene"] if detokenizer is not None else [])
    for key in need:
        lack = [i for i in range(n) if not ds.records[i].get(key)]
        if lack:
            raise UserError(f"{data}: entry {lack[0]} (and {len(lack) - 1} more) has no '{key}'; "
                            f"reconstruct needs instance PNGs and scene graphs (the shapes world's pairs.json)")
    tok_size = tokenizer_image_size or setok.config.image_size or setok.image_size
    with_canvas = (detokenizer is not None and detokenizer.canvas is not None
                   and detokenizer.config.canvas_recon_weight > 0)
    g = torch.Generator().manual_seed(seed)
    rec, can, ceil = SceneTally(), SceneTally(), SceneTally()
    ious: list[float] = []
    img_emb, txt_emb, captions = [], [], []
    grid_rows = None
    t0 = time.perf_counter()
    bar = None
    if progress:
        from rich.progress import Progress
        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("reconstruct", total=n)
    try:
        for start in range(0, n, batch_size):
            batch = collate([ds[i] for i in range(start, min(n, start + batch_size))])
            x = batch["pixel_values"]
            S = x.shape[-1]
            with torch.no_grad():
                out = setok(_resize(x, tok_size, antialias=True))
                views = {}
                if mask_decoder is not None:
                    feats = out.features if mask_decoder.config.feature_dim > 0 else None
                    logits = mask_decoder(x, out.tokens, feats)
                    ious += segment_miou(logits, out.token_mask, batch["instances"])[1]
                    views["seg"] = _segments(logits, out.token_mask)
                if detokenizer is not None:
                    s = detokenizer.config.image_size
                    views["rec"] = _resize(detokenizer.sample(out.tokens, out.token_mask, steps=steps, generator=g), S)
                    views["ceil"] = _resize(_resize(x, s, antialias=True), S)
                    if with_canvas:
                        views["can"] = _resize(canvas_image(detokenizer, out.tokens, out.token_mask), S)
                if alignment is not None:
                    img_emb.append(image_embeddings(alignment, out.tokens, out.token_mask))
                    txt_emb.append(alignment.encode_text(batch["caption"]))
                    captions += batch["caption"]
            if detokenizer is not None:
                for j, idx in enumerate(batch["index"].tolist()):
                    scene = load_scene(str(ds.root / ds.records[idx]["scene"]))
                    rec.add(_u8(views["rec"][j]), scene)
                    ceil.add(_u8(views["ceil"][j]), scene)
                    if with_canvas:
                        can.add(_u8(views["can"][j]), scene)
            if grid is not None and grid_rows is None:
                k = min(8, x.shape[0])
                grid_rows = [x[:k]] + [views[v][:k] for v in ("rec", "can", "seg") if v in views]
            if bar is not None:
                bar.advance(task, x.shape[0])
    finally:
        if bar is not None:
            bar.stop()
    result: dict = {"data": str(data), "images": n}
    if detokenizer is not None:
        c = detokenizer.config
        result.update(objects=rec.n_gt, recon_object_recall=rec.recall(), recon_object_precision=rec.precision())
        if with_canvas:
            result.update(canvas_object_recall=can.recall(), canvas_object_precision=can.precision())
        result.update(ceiling_object_recall=ceil.recall(), ceiling_object_precision=ceil.precision(),
                      detok_resolution=c.image_size, sample_steps=steps or c.sample_steps, sampler=c.sampler,
                      guidance_scale=c.guidance_scale)
        result["per_shape"] = per_shape({"recon": rec, **({"canvas": can} if with_canvas else {}), "ceiling": ceil})
    if mask_decoder is not None:
        result["mask_decoder_miou"] = float(np.mean(ious)) if ious else None
    if alignment is not None:
        result.update(retrieval_scores(torch.cat(img_emb), torch.cat(txt_emb), captions))
    # the trained clustering against the same config untrained (cluster head at identity)
    trained = eval_tokenizer(data, tokenizer=setok, limit=n, progress=progress)
    fresh = type(setok)(copy.deepcopy(setok.config), encoder=setok.encoder).eval()
    untrained = eval_tokenizer(data, tokenizer=fresh, limit=n, progress=progress)
    for key in ("fg_ari", "mbo", "tokens_per_image"):
        result[f"{key}_trained"], result[f"{key}_untrained"] = trained[key], untrained[key]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if grid is not None and grid_rows is not None:
        _save_grid(grid, grid_rows)
    return result

