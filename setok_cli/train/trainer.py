"""The training loop, on `accelerate`.

Generic over stages: a stage is a builder `recipe -> (model, dataset)` where `model(batch)`
returns a dict of scalar tensors with the total under "loss" (the other entries are
logged), and `model.save_parts(folder)` writes its parts as `from_pretrained` folders.

What runs where comes from accelerate: plain CPU, one GPU, DDP, FSDP or DeepSpeed
(`accelerate launch --config_file ...` or `torchrun`). Mixed precision, gradient
accumulation and clipping are accelerate's; AdamW with a cosine schedule and linear
warmup (Table 7) is torch's and transformers'.

Exact resume: data order comes only from `SeededSampler` (seed, epoch, position), the
DataLoader has its own generator (so creating an iterator never draws from the global
RNG), and a checkpoint holds every process's RNG state, the optimizer, the scheduler and
the sampler. A run resumed at step s therefore takes the same batches and the same
noise as the uninterrupted run.
"""
from __future__ import annotations

import contextlib
import fnmatch
import importlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.datasets import SeededSampler, collate
from ..data.worker_errors import worker_message
from ..errors import UserError
from ..files import ensure_dir
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .precision import Precision, busy, measured, resolve_precision, time_steps
from .recipe import Recipe, dump_recipe

__all__ = ["Trainer", "run", "STAGES", "select_trainable", "build_optimizer", "build_scheduler", "TrainResult"]

# stage name -> "module:builder"; builder(recipe, accelerator) -> (model, dataset)
STAGES = {"stage1": "setok_cli.train.stage1:build_stage1", "stage2": "setok_cli.train.stage2:build_stage2",
          "stage3": "setok_cli.train.stage3:build_stage3"}


# stage name -> "module:meta builder:parameter report", for `setok train --dry-run`
META = {"stage1": "setok_cli.train.stage1:meta_stage1_model:parameter_report",
        "stage2": "setok_cli.train.stage2:meta_stage2_model:parameter_report",
        "stage3": "setok_cli.train.stage3:meta_stage3_model:parameter_report"}


def meta_model(recipe: Recipe):
    """The recipe's model on the meta device and the function that tabulates its parts."""
    if recipe.stage not in META:
        raise UserError(f"unknown stage {recipe.stage!r}; choose from {sorted(META)}")
    mod, build, report = META[recipe.stage].split(":")
    m = importlib.import_module(mod)
    return getattr(m, build)(recipe), getattr(m, report)


@dataclass
class TrainResult:
    step: int
    output_dir: Path
    last_checkpoint: Optional[Path]
    history: list            # the logged records (main process)
    wall_s: float
    peak_mem_mb: float


def _peak_mem_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    except Exception:
        return float("nan")


def select_trainable(model: nn.Module, trainable: list[str], frozen: list[str]) -> tuple[int, int]:
    """requires_grad = matches any `trainable` glob and no `frozen` glob. Parameters a
    module froze on purpose (a pretrained VAE, a frozen text encoder) stay frozen only if
    a `frozen` glob says so: the recipe is the one place that decides. Returns
    (trainable count, total count)."""
    names = [n for n, _ in model.named_parameters()]
    for pat in trainable:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise UserError(f"train.trainable pattern {pat!r} matches no parameter "
                            f"(parameter names look like {names[:3]})")
    n_train = n_total = 0
    for n, p in model.named_parameters():
        on = any(fnmatch.fnmatchcase(n, pat) for pat in trainable) and \
            not any(fnmatch.fnmatchcase(n, pat) for pat in frozen)
        p.requires_grad_(on)
        n_total += p.numel()
        n_train += p.numel() if on else 0
    if n_train == 0:
        raise UserError("no parameter trains: train.trainable / train.frozen leave nothing")
    return n_train, n_total


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW; parameter groups by glob (first match wins); no weight decay on 1-D tensors."""
    o = recipe.optim
    groups: dict[tuple, list] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr, wd = o.lr, o.weight_decay
        for g in o.param_groups:
            pats = g["params"] if isinstance(g["params"], list) else [g["params"]]
            if any(fnmatch.fnmatchcase(n, pat) for pat in pats):
                lr, wd = float(g.get("lr", lr)), float(g.get("weight_decay", wd))
                break
        if p.ndim <= 1:
            wd = 0.0
        groups.setdefault((lr, wd), []).append(p)
    param_groups = [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
    return torch.optim.AdamW(param_groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def build_scheduler(optimizer, recipe: Recipe, total: Optional[int] = None):   # total: recipe.train.max_steps
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
    total = total or recipe.train.max_steps
    warm = recipe.optim.warmup_steps if recipe.optim.warmup_steps is not None else \
        int(math.ceil(recipe.optim.warmup_ratio * total))
    if recipe.optim.schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warm, total)
    return get_constant_schedule_with_warmup(optimizer, warm)


def _release_accelerator_state(mixed_precision: str) -> None:
    """accelerate keeps one AcceleratorState per process and refuses a second Accelerator
    with another mixed precision. A second run in the same single process (a notebook, the
    tests) with another `train.mixed_precision` starts from a fresh state; the process
    group (PartialState) is kept."""
    from accelerate.state import AcceleratorState, PartialState
    st = AcceleratorState._shared_state
    if st and str(st.get("_mixed_precision", mixed_precision)) != mixed_precision \
            and PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=False)


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class _Progress:
    """A rich progress bar with the loss terms, throughput and ETA (main process only)."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[speed]}"), TimeElapsedColumn(), TextColumn("eta"),
                                 TimeRemainingColumn(), TextColumn("{task.fields[terms]}"))
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=start, speed="", terms="")

    def update(self, step: int, record: Optional[dict] = None):
        if not self.enabled:
            return
        fields = {}
        if record is not None:
            fields["speed"] = f"{record['samples_per_s']:.1f} img/s"
            fields["terms"] = " ".join(f"{k}={v:.3f}" for k, v in record.items()     # per-set terms: log.jsonl only
                                       if "/" not in k and k not in ("step", "epoch", "lr", "samples_per_s",
                                                                     "elapsed_s", "peak_mem_mb", "grad_norm"))
        self.progress.update(self.task, completed=step, **fields)

    def close(self):
        if self.enabled:
            self.progress.stop()


class Trainer:
    def __init__(self, recipe: Recipe, accelerator=None, builder: Optional[Callable] = None,
                 hooks: Optional[dict] = None):
        from accelerate import Accelerator, DistributedDataParallelKwargs
        from accelerate.utils import ProjectConfiguration, set_seed

        self.recipe = r = recipe
        self.output_dir = Path(r.output_dir)
        # before any long work: a folder that cannot be written fails now, not at the first checkpoint
        ensure_dir(self.output_dir)
        if r.train.threads:
            torch.set_num_threads(r.train.threads)
        if accelerator is None:
            log_with = None
            if r.train.tensorboard:
                try:
                    import tensorboard  # noqa: F401
                    log_with = "tensorboard"
                except ImportError:
                    raise UserError("train.tensorboard needs the tensorboard package "
                                    "(pip install 'setok[tensorboard]')") from None
            self.precision = resolve_precision(r.train.mixed_precision)
            # auto on a CPU with bf16 units: one process times its step both ways and runs its
            # own autocast (several processes would have to agree: they keep the units' bf16)
            self.measured = self.precision.measure and int(os.environ.get("WORLD_SIZE", "1")) == 1
            mp = "no" if self.measured else self.precision.mixed_precision
            _release_accelerator_state(mp)
            # on a machine without a GPU, `cpu=True` is what makes accelerate run several
            # processes (torchrun / accelerate launch) as MULTI_CPU over gloo
            accelerator = Accelerator(
                cpu=not torch.cuda.is_available(),
                mixed_precision=mp, gradient_accumulation_steps=r.train.grad_accum,
                log_with=log_with,
                project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                    logging_dir=str(self.output_dir / "tensorboard")),
                kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        else:
            self.precision = Precision(str(accelerator.mixed_precision), "the accelerator's")
            self.measured = False
        self.cpu_bf16 = False                   # our own CPU autocast (`measured` runs only)
        self.accelerator = acc = accelerator
        self.hooks = hooks or {}
        if not self.measured:
            acc.print(self.precision.line())
        if self.precision.warning and acc.is_main_process:
            print(f"warning: {self.precision.warning}", file=sys.stderr)

        # same seed everywhere: every replica starts from the same weights
        set_seed(r.seed)
        if builder is None:
            if r.stage not in STAGES:
                raise UserError(f"unknown stage {r.stage!r}; choose from {sorted(STAGES)}")
            mod, attr = STAGES[r.stage].split(":")
            builder = getattr(importlib.import_module(mod), attr)
        t_build = time.perf_counter()
        model, dataset = builder(r, acc)
        self.build_s = time.perf_counter() - t_build    # the stage's model and data (caches filled up front)
        self.n_trainable, self.n_total = select_trainable(model, r.train.trainable, r.train.frozen)
        self.dataset: Dataset = dataset
        optimizer = build_optimizer(model, r)
        self.scheduler = build_scheduler(optimizer, r)
        ds_plugin = getattr(acc.state, "deepspeed_plugin", None)
        if ds_plugin is not None:
            # the data loader stays ours (exact resume), so DeepSpeed learns the batch size here
            ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = r.data.batch_size
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.sampler = SeededSampler(len(dataset), seed=r.seed, rank=acc.process_index,
                                     world_size=acc.num_processes, shuffle=r.data.shuffle)
        if len(self.sampler) < r.data.batch_size:
            raise UserError(f"data.batch_size {r.data.batch_size} is larger than this process's share of the "
                            f"data ({len(self.sampler)} samples)")
        # the scheduler is stepped by hand once per optimizer step (accelerate's wrapper would
        # step it once per process); both it and the sampler ride in every checkpoint
        acc.register_for_checkpointing(self.scheduler)
        acc.register_for_checkpointing(self.sampler)
        if self.measured:
            self.precision = self._measure_precision()
            self.cpu_bf16 = self.precision.mixed_precision == "bf16"
            acc.print(self.precision.line())
            if self.precision.warning and acc.is_main_process:
                print(f"warning: {self.precision.warning}", file=sys.stderr)
        # each process draws its own noise from here on (reseeded by rank), restored on resume
        set_seed(r.seed + 1000 * (acc.process_index + 1))
        self.step = 0
        self.history: list[dict] = []

    def _measure_precision(self, n_batches: int = 4) -> Precision:
        """Time this run's own step (forward and backward) in float32 and under bf16 autocast
        over `n_batches` batches drawn with the recipe's seed (the first a warm-up); keep the
        faster (`precision.measured`). Gradients and buffers are put back as they were, and
        the sampler (the data order) is not touched."""
        fn = getattr(self.dataset, "collate", collate)
        bs, n = self.recipe.data.batch_size, len(self.dataset)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.recipe.seed)).tolist()
        order = (order * (bs * n_batches // n + 1))[:bs * n_batches]     # a data set smaller than the batches
        batches = [_to_device(fn([self.dataset[i] for i in order[k * bs:(k + 1) * bs]]), self.accelerator.device)
                   for k in range(n_batches)]
        saved = [b.detach().clone() for b in self.model.buffers()]
        self.model.train()
        steps = [lambda b=b: self.model(b)["loss"].backward() for b in batches]
        try:
            for step in steps:      # untimed: what a model computes once per sample (stage II's token cache)
                step()
            fp32_s, bf16_s = time_steps(steps, bf16=False), time_steps(steps, bf16=True)
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for b, v in zip(self.model.buffers(), saved):
                    b.copy_(v)
        return measured(self.precision, fp32_s, bf16_s, busy())

    def _autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.cpu_bf16 else contextlib.nullcontext()

    # -- data --
    def _loader(self) -> DataLoader:
        r = self.recipe
        return DataLoader(self.dataset, batch_size=r.data.batch_size, sampler=self.sampler,
                          collate_fn=getattr(self.dataset, "collate", collate),
                          num_workers=r.data.num_workers, drop_last=True,
                          generator=torch.Generator().manual_seed(r.seed),
                          persistent_workers=False, pin_memory=torch.cuda.is_available())

    def _batches(self) -> Iterator[dict]:
        bs = self.recipe.data.batch_size
        while True:
            if len(self.sampler) < bs:           # the rest of this epoch is less than a batch
                self.sampler.set_position(self.sampler.epoch + 1, 0)
            for batch in self._loader():
                self.sampler.position += bs
                yield batch
            self.sampler.set_position(self.sampler.epoch + 1, 0)

    # -- checkpoints --
    def _state(self) -> dict:
        state = {"epoch": self.sampler.epoch, "position": self.sampler.position,
                 "world_size": self.accelerator.num_processes, "seed": self.recipe.seed}
        if self.measured:                       # a resumed run keeps the precision it measured
            state["cpu_bf16"] = self.cpu_bf16
        return state

    def save(self) -> Path:
        unwrapped = self.accelerator.unwrap_model(self.model)

        def parts(folder: Path):
            if hasattr(unwrapped, "save_parts"):
                unwrapped.save_parts(folder)
            dump_recipe(self.recipe, folder / "recipe.yaml")
            if "after_parts" in self.hooks:
                self.hooks["after_parts"](folder)

        return save_checkpoint(self.accelerator, self.output_dir, self.step, self._state(),
                               self.recipe.train.keep_last, parts)

    def resume(self, path: Optional[str | Path] = None) -> bool:
        path = Path(path) if path else latest_checkpoint(self.output_dir)
        if path is None:
            return False
        state = load_checkpoint(self.accelerator, path)
        if state.get("world_size", 1) != self.accelerator.num_processes:
            raise UserError(f"checkpoint {path} was written by {state['world_size']} processes; this run has "
                            f"{self.accelerator.num_processes} (the data order would change)")
        self.step = int(state["step"])
        self.sampler.set_position(state["epoch"], state["position"])
        if self.measured and "cpu_bf16" in state and bool(state["cpu_bf16"]) != self.cpu_bf16:
            self.cpu_bf16 = bool(state["cpu_bf16"])
            self.accelerator.print(f"precision: {'bf16' if self.cpu_bf16 else 'fp32'} (as measured when {path.name} "
                                   "was trained: a run keeps one precision)")
        return True

    # -- the loop --
    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.accelerator.is_main_process:
            with open(self.output_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.recipe.train.tensorboard:
                self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def train(self, resume: bool = False, stop_after: Optional[int] = None) -> TrainResult:
        """Train to `train.max_steps` (or `stop_after` optimizer steps from here, for tests)."""
        r, acc = self.recipe, self.accelerator
        if acc.is_main_process:
            dump_recipe(r, self.output_dir / "recipe.yaml")
        resumed = self.resume() if resume else False
        if resume and not resumed and acc.is_main_process:
            acc.print(f"no checkpoint under {self.output_dir / 'checkpoints'}: starting from step 0")
        if r.train.tensorboard:
            acc.init_trackers("setok")
        target = r.train.max_steps if stop_after is None else min(r.train.max_steps, self.step + stop_after)
        progress = _Progress(r.train.progress and acc.is_main_process, r.train.max_steps, self.step)
        batches = self._batches()
        sums: dict[str, tuple[float, int]] = {}     # per term: its sum and count over the window
        window_samples = 0
        t_start = t_window = time.perf_counter()
        last_ckpt = None
        self.model.train()
        try:
            while self.step < target:
                grad_norm = None
                for _ in range(r.train.grad_accum):
                    try:
                        batch = _to_device(next(batches), acc.device)
                    except UserError as e:   # from a worker: its own line, not torch's traceback
                        raise UserError(worker_message(str(e))) from None
                    with acc.accumulate(self.model):
                        with self._autocast():
                            out = self.model(batch)
                        loss = out["loss"]
                        if not torch.isfinite(loss):
                            raise RuntimeError(f"non-finite loss {loss.item()} at step {self.step}: "
                                               f"{ {k: float(v) for k, v in out.items()} }")
                        acc.backward(loss)
                        if acc.sync_gradients and r.optim.max_grad_norm:
                            grad_norm = acc.clip_grad_norm_(
                                [p for p in self.model.parameters() if p.requires_grad], r.optim.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    for k, v in out.items():     # NaN: a term this batch has none of (a mixture set's loss)
                        x, (a, n) = float(v.detach()), sums.get(k, (0.0, 0))
                        sums[k] = (a + x, n + 1) if math.isfinite(x) else (a, n)
                    window_samples += batch["pixel_values"].shape[0] * acc.num_processes
                self.scheduler.step()
                self.step += 1
                if self.step % r.train.log_every == 0 or self.step == target:
                    keys = sorted(sums)
                    t = torch.tensor([sums[k][i] for i in (0, 1) for k in keys], device=acc.device)
                    t = (acc.reduce(t, reduction="sum") if acc.num_processes > 1 else t).tolist()
                    now = time.perf_counter()
                    record = {"step": self.step, "epoch": self.sampler.epoch,
                              "lr": self.scheduler.get_last_lr()[0],
                              **{k: a / n for k, a, n in zip(keys, t, t[len(keys):]) if n > 0},
                              "grad_norm": float(grad_norm) if grad_norm is not None else None,
                              "samples_per_s": window_samples / max(now - t_window, 1e-9),
                              "elapsed_s": now - t_start, "peak_mem_mb": _peak_mem_mb()}
                    self._log(record)
                    progress.update(self.step, record)
                    sums, window_samples, t_window = {}, 0, now
                else:
                    progress.update(self.step)
                if "after_step" in self.hooks:
                    self.hooks["after_step"](self)
                if r.train.checkpoint_every and self.step % r.train.checkpoint_every == 0:
                    last_ckpt = self.save()
        finally:
            progress.close()
        if self.step >= r.train.max_steps and (last_ckpt is None or not last_ckpt.name.endswith(f"{self.step:08d}")):
            last_ckpt = self.save()
        if r.train.tensorboard:
            acc.end_training()
        return TrainResult(self.step, self.output_dir, last_ckpt, self.history,
                           time.perf_counter() - t_start, _peak_mem_mb())


def run(recipe: Recipe, resume: bool = False) -> TrainResult:
    """`setok train`: build the stage, train, checkpoint."""
    trainer = Trainer(recipe)
    acc = trainer.accelerator
    if acc.is_main_process:
        acc.print(f"stage {recipe.stage}: {trainer.n_trainable:,} of {trainer.n_total:,} parameters train "
                  f"on {acc.num_processes} process(es), device {acc.device}")
    result = trainer.train(resume=resume)
    if acc.is_main_process:
        acc.print(f"done: step {result.step}, {result.wall_s:.0f} s training + {trainer.build_s:.0f} s building, "
                  f"peak memory {result.peak_mem_mb:.0f} MiB; checkpoint {result.last_checkpoint}")
    return result
