"""Stage III's text-only first phase: the stage-2 LM learns conversation rows without images, then stage III.

    model:
      lora: {...}                                  # the phase trains through adapters of this spec
      text_first: {path: data/shapes/train/instruct_list_drills_echo.json, steps: 600, lr: 1.0e-3, batch_size: 32}

Why: a step that the LM learns on text alone can stay out of its reach inside the image mixture. The
tiny recipe's existence answers end in a lookup ("Is there a red cross?" "a pink cross, a blue cross,
red: no"); text-only drills of it reach 0.97 held out in 600 steps, while stage III's rows, images in the
context, never teach it (README: "Where the list is, and a "no" after it").

What runs, before stage III adds its own adapters (`build_stage3_model`):

    rows (the file's LLaVA conversations; "<image>" dropped from the user turns, no image read)
      -> LoRA of `model.lora` on the stage-2 LM (seed: the recipe's), AdamW with the recipe's weight
         decay, warm-up ratio, schedule and clipping at `text_first.lr`, `steps` steps of `batch_size`
         rows in a seeded order (reshuffled each epoch), rendered as stage III renders them (Vicuna v1,
         the Setokim's system prompt; only the answers count), fp32; the prefix every row shares (the
         system prompt) runs once per batch (`prefix_loss`: the same loss and gradients, 2.4 times faster)
      -> merge_and_unload: the stage-2 Setokim's LM is replaced by the drilled one.

The drilled LM is written to OUTPUT_DIR/text_first/ (`lm/`, and `phase.json`: the settings it was trained
with and its losses), so that a resumed run, or a run with the same settings, loads it instead of training
it again. Stage III's checkpoints hold it as their base `lm/`, so loading and `setok export` need nothing more.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch

from ..data.formats import read_json_list
from ..errors import UserError
from ..models.setokim.loading import quiet
from ..files import atomic_folder, atomic_write_json

__all__ = ["text_rows", "text_batch", "shared_prefix", "prefix_loss", "train_text_first", "apply_text_first"]


def text_rows(path: str | Path) -> list[list[dict]]:
    """A conversation file (SPEC's instruct format) -> its conversations, text only: "<image>" is dropped
    from user turns; an answer that writes an image is one UserError line (this phase reads no image)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"model.text_first.path: no file {p}")
    data = read_json_list(p)
    if not isinstance(data, list) or not data:
        raise UserError(f"{p}: expected a non-empty list of conversations")
    out = []
    for n, e in enumerate(data):
        conv = e.get("conversations") if isinstance(e, dict) else None
        if not isinstance(conv, list) or not conv:
            raise UserError(f"{p}: entry {n} has no conversations")
        turns = []
        for t in conv:
            value = t.get("value") if isinstance(t, dict) else None
            if not isinstance(value, str):
                raise UserError(f"{p}: entry {n}: a turn without a text value: {t!r}")
            if t.get("from") == "gpt" and "<image>" in value:
                raise UserError(f"{p}: entry {n} answers with an image; model.text_first trains on text only")
            turns.append({**t, "value": value.replace("<image>\n", "").replace("<image>", "").strip()})
        out.append(turns)
    return out


def text_batch(conversations: list[list[dict]], tok, system: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text-only conversations -> (ids, attention mask, labels), each (n, L), right-padded; `system` opens each
    (Vicuna v1, `render_conversation`); only the answers and their `</s>` are labelled."""
    from ..models.setokim.text import IGNORE_INDEX, render_conversation
    rows = [render_conversation(c, tok, system=system) for c in conversations]
    n, L = len(rows), max(len(i) for i, _ in rows)
    ids = torch.full((n, L), tok.pad_token_id or 0)
    att = torch.zeros(n, L, dtype=torch.long)
    lab = torch.full((n, L), IGNORE_INDEX)
    for r, (i, lb) in enumerate(rows):
        ids[r, :len(i)], att[r, :len(i)], lab[r, :len(i)] = torch.tensor(i), 1, torch.tensor(lb)
    return ids, att, lab


def shared_prefix(ids: torch.Tensor, lab: torch.Tensor) -> int:
    """The length P of the prefix that every row of a batch shares (the BOS and the system prompt) and that no label,
    nor the one after it, falls in (`prefix_loss` runs at least these once for the batch)."""
    from ..models.setokim.text import IGNORE_INDEX
    same = int((ids == ids[:1]).all(0).long().cumprod(0).sum())
    labelled = lab != IGNORE_INDEX
    first = int(labelled.float().argmax(1).min()) if labelled.any() else ids.shape[1]
    return max(0, min(same, first - 1))


def prefix_loss(lm, ids: torch.Tensor, att: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
    """The causal-LM loss of a right-padded batch (the mean over its labelled tokens), with the prefix every row
    shares run once and its keys and values repeated for the batch (`splice.after_prefix`, as stage II and III
    train): the same loss and gradients as one pass over the rows (tested), for about 0.4 of the work at the tiny
    recipe's drills (34 of 56 tokens are the system prompt)."""
    import inspect

    import torch.nn.functional as F

    from ..models.setokim.splice import after_prefix
    from ..models.setokim.text import IGNORE_INDEX
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    dec = base.get_decoder()
    key = "cache" if "cache" in inspect.signature(dec.forward).parameters else "past_key_values"
    h = after_prefix(lambda e, a, p, **kw: dec(inputs_embeds=e, attention_mask=a, position_ids=p, **kw),
                     base.get_input_embeddings()(ids), att, torch.arange(ids.shape[1]).expand_as(ids),
                     cache_kwarg=key)                                                             # (B, L, H)
    logits = base.get_output_embeddings()(h[:, :-1]).float()
    return F.cross_entropy(logits.flatten(0, 1), lab[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def train_text_first(lm, tok, rows: list[list[dict]], *, lora, optim, steps: int, lr: float, batch_size: int,
                     seed: int, system: str, progress: bool = False,
                     on_step=None) -> tuple[torch.nn.Module, list[float]]:
    """Train `lm` (a plain causal LM) on `rows` through fresh LoRA adapters of `lora`, then merge them.
    `on_step(step, lm)`, if given, is called after every step (e.g. to score held-out rows; the LM in train mode).
    -> (the merged plain LM, the loss of every step)."""
    from ..models.setokim.lora import wrap_lora
    from .stage2 import _progress
    from .trainer import build_scheduler
    lm = wrap_lora(lm, lora, seed)
    params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=optim.weight_decay, betas=tuple(optim.betas), eps=optim.eps)
    sched = build_scheduler(opt, SimpleNamespace(optim=optim), total=steps)     # the recipe's schedule over `steps`
    rng = np.random.default_rng([seed, 7])
    order, at, losses = rng.permutation(len(rows)), 0, []
    lm.train()
    with _progress(progress, "text first", steps) as advance:
        for _ in range(steps):
            take = []
            while len(take) < batch_size:
                if at == len(order):
                    order, at = rng.permutation(len(rows)), 0
                k = min(batch_size - len(take), len(order) - at)
                take += order[at:at + k].tolist()
                at += k
            ids, att, lab = text_batch([rows[i] for i in take], tok, system)
            loss = prefix_loss(lm, ids, att, lab)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if optim.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
            opt.step()
            sched.step()
            losses.append(float(loss.item()))
            if on_step is not None:
                on_step(len(losses), lm)
            advance(1)
    lm.eval()
    return lm.merge_and_unload(), losses


def _settings(recipe, rows: int, system: str) -> dict:
    """What the drilled LM depends on: the stage-2 source, the rows file's bytes, the phase and optimizer settings."""
    import hashlib
    t, o = recipe.model.text_first, recipe.optim
    s = {"source": str(Path(recipe.model.setokim_from or "").resolve()), "path": str(t.path), "rows": rows,
         "sha256": hashlib.sha256(Path(t.path).read_bytes()).hexdigest(), "system": system,
         "steps": t.steps, "lr": t.lr, "batch_size": t.batch_size, "seed": recipe.seed,
         "lora": vars(recipe.model.lora),
         "optim": {k: getattr(o, k) for k in ("weight_decay", "betas", "eps", "warmup_ratio", "warmup_steps",
                                              "schedule", "max_grad_norm")}}
    return json.loads(json.dumps(s, default=str))         # as phase.json reads back


def apply_text_first(setokim, recipe, progress: bool = False, write: bool = True) -> Optional[dict]:
    """Replace `setokim.lm` (plain, no adapters yet) by the one `model.text_first` trains, or by the one
    already in OUTPUT_DIR/text_first/ when it was trained with the same settings (`_settings`: the same stage-2
    source and rows file too). -> phase.json's record
    (None without `model.text_first`). Only the main process (`write`) writes the folder."""
    t = recipe.model.text_first
    if t is None:
        return None
    if not t.path:
        raise UserError("model.text_first.path is missing: a conversation file to learn on text first")
    if recipe.model.lora is None:
        raise UserError("model.text_first trains through adapters of model.lora: give model.lora")
    for key in ("steps", "batch_size"):
        if int(getattr(t, key)) < 1:
            raise UserError(f"model.text_first.{key} must be >= 1, got {getattr(t, key)}")
    if not (isinstance(t.lr, (int, float)) and math.isfinite(t.lr) and t.lr > 0):
        raise UserError(f"model.text_first.lr must be a number > 0, got {t.lr!r}")
    rows = text_rows(t.path)
    settings = _settings(recipe, len(rows), setokim.config.system_prompt)
    folder = Path(recipe.output_dir) / "text_first"
    record_path = folder / "phase.json"
    if record_path.is_file() and (folder / "lm").is_dir():
        record = json.loads(record_path.read_text())
        if record.get("settings") == settings:
            from transformers import AutoModelForCausalLM
            with quiet():
                setokim.lm = AutoModelForCausalLM.from_pretrained(folder / "lm", local_files_only=True)
            return record
    t0 = time.perf_counter()
    lm, losses = train_text_first(setokim.lm, setokim.text_tokenizer, rows, lora=recipe.model.lora,
                                  optim=recipe.optim, steps=t.steps, lr=t.lr, batch_size=t.batch_size,
                                  seed=recipe.seed, system=setokim.config.system_prompt, progress=progress)
    setokim.lm = lm
    w = max(1, min(50, t.steps // 4))
    record = {"settings": settings, "seconds": round(time.perf_counter() - t0, 1),
              "loss_first": float(np.mean(losses[:w])), "loss_last": float(np.mean(losses[-w:])), "losses": losses}
    if write:
        def fill(tmp: Path) -> None:
            with quiet():
                lm.save_pretrained(tmp / "lm")
            atomic_write_json(tmp / "phase.json", record, indent=1)
        atomic_folder(folder, fill)
        print(f"text first: {t.steps} steps over {len(rows)} rows, loss {record['loss_first']:.3f} -> "
              f"{record['loss_last']:.3f} ({record['seconds']:.0f} s) -> {folder}")
    return record
