"""The library behind `setok bench-reduce`: what each visual-token reducer costs and what it
keeps, side by side (integrations/reducers.py, integrations/llava.py).

Cost (`cost_table`). For each token count an image can reach the LLM with (the budgets 16,
32, 64, 144, 576 and SeTok's natural count), on a LLaVA-1.5-7B-shaped config built in the
process with random weights (`llava_7b_shaped`: the full width 4096 / 11008 / 32 heads /
vocabulary 32000, but `layers` of the 32 decoder layers, so it fits a CPU; fp32) and on a
real LLaVA-1.5 folder when one is given:
  - prefill FLOPs from the config (`prefill_flops`: every decoder layer's projections,
    the L x L attention products and the SwiGLU MLP, plus the LM head on the last token);
  - measured prefill latency (median of `repeats`, after a warm-up) and the KV cache it
    leaves (bytes of the cache tensors, measured);
  - each reducer's own time on the same images' tower features, at the tower's width and at
    CLIP-L's 1024 (the features through a fixed random 1024-wide map, which keeps their
    distances up to scale), reported apart: a reducer that costs more than the prefill it
    saves is no reducer;
  - end-to-end time to first token (tower + reducer + projector + prefill, timed as one
    call) at 576 tokens and at SeTok's natural count, on the synthetic world's images and
    on real photos, with the FLOP and time ratios the issue's goal names.

Accuracy (`accuracy_table`), the paper's Table 9 protocol without downloads: a tiny
LLaVA-architecture model (`LlavaForConditionalGeneration`, a tiny Llama text model, the
builtin encoder plus a 2-D sin-cos position embedding as its vision tower: `BuiltinTower`)
gets one identical fine-tune (3000 steps) per reducer and budget on the synthetic world's VQA
(train/instruct.json): same initial weights (seed), same batches, same steps. The tower's
features are computed once and each reducer's tokens once per budget; training feeds them
through the model's own placeholder splice (`mm_encoder_outputs`), the projector trained
with the LLM. The fine-tune length is chosen on val (each run keeps the best of its
checkpoints at the `eval_steps`), and test is answered once with it (greedy `generate`) and
scored by `setok eval vqa`'s library function (`eval_vqa`).

Layout: cost.py (FLOPs, models, images, timings: `cost_table`), accuracy.py (the protocol:
`accuracy_table`), plot.py (the figure); `run` here ties them. Every public name of the
three stays importable from `setok_cli.bench.reduce`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ...errors import UserError
from ...integrations.reducers import METHODS
from .accuracy import (ACCURACY_BUDGETS, Protocol, World, accuracy_goals, accuracy_table, answer, finetune,
                       load_world, per_image_conversations, quick_protocol, reduce_world, score)
from .cost import (BUDGETS, FULL, TEXT_TOKENS, cost_table, cpu_name, image_outputs, llava_7b_shaped, load_pixels,
                   measure_prefill, photo_paths, prefill_flops, real_model_cost, reducer_times, time_to_first_token,
                   tiny_llava, tower_features)
from .plot import COLOURS, plot

__all__ = ["BUDGETS", "ACCURACY_BUDGETS", "TEXT_TOKENS", "FULL", "METHODS", "prefill_flops", "llava_7b_shaped",
           "tiny_llava", "image_outputs", "load_pixels", "tower_features", "photo_paths", "measure_prefill",
           "time_to_first_token", "reducer_times", "cost_table", "real_model_cost", "cpu_name", "Protocol",
           "quick_protocol", "World", "per_image_conversations", "load_world", "reduce_world", "answer", "score",
           "finetune", "accuracy_table", "accuracy_goals", "COLOURS", "plot", "run"]


def run(data: Optional[str], out_dir, quick: bool = False, model_folder: Optional[str] = None,
        methods: Sequence[str] = METHODS, skip_accuracy: bool = False, skip_cost: bool = False,
        protocol: Optional[Protocol] = None, layers: Optional[int] = None, repeats: Optional[int] = None,
        progress=None, jobs: int = 1) -> dict:
    """The whole benchmark; returns the JSON object the command prints and writes."""
    import platform

    out_dir = Path(out_dir)
    from ...files import ensure_dir
    ensure_dir(out_dir)
    for m in methods:
        if m not in METHODS:
            raise UserError(f"unknown reducer {m!r}; choose one of {', '.join(METHODS)}")
    if protocol is None:
        protocol = quick_protocol() if quick else Protocol()
    result = {"quick": quick, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "cpu": cpu_name(), "machine": platform.machine()}
    t0 = time.perf_counter()
    if not skip_accuracy:
        if data is None or not Path(data).is_dir():
            raise UserError(f"--data {data}: no such folder (make the world with `setok data shapes --out {data}`)")
        acc = accuracy_table(data, out_dir / "predictions", protocol, ACCURACY_BUDGETS if not quick else (16, 64),
                             methods, progress, jobs=jobs)
        result["accuracy"] = acc
        result["accuracy_goals"] = accuracy_goals(acc, ACCURACY_BUDGETS if not quick else (16, 64))
    if not skip_cost:
        world_images = []
        if data is not None and (Path(data) / "test" / "instruct.json").is_file():
            from ...data import formats
            ents = formats.load(Path(data) / "test" / "instruct.json", "instruct", check_files=False)
            world_images = sorted({e["image"] for e in ents})[: (3 if quick else 8)]
        say = (lambda s: progress("cost", s)) if progress else None
        result["cost"] = cost_table(layers or (1 if quick else 2), repeats or (1 if quick else 3),
                                    (16, 64, FULL) if quick else BUDGETS, methods, world_images,
                                    photo_paths()[: (1 if quick else 3)], model_folder, say,
                                    ttft_images=1 if quick else 3)
    result["seconds"] = time.perf_counter() - t0
    return result
