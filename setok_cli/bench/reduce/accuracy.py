"""The accuracy half of `setok bench-reduce` (the package docstring's "Accuracy"): the paper's
Table 9 protocol on the synthetic world's VQA, one identical tiny-LLaVA fine-tune per reducer
and budget, scored by `setok eval vqa`'s library function.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ...errors import UserError
from ...integrations.llava import BuiltinTower, splice_image_tokens
from ...integrations.reducers import IMPORTANCE_SUBSTITUTE, METHODS, NEEDS_IMPORTANCE, reduce_features
from .cost import FULL, image_outputs, tiny_llava, tower_features

ACCURACY_BUDGETS = (16, 32, 64)


@dataclass
class Protocol:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 128
    steps: int = 3000
    eval_steps: tuple = (1000, 2000, 3000)  # val checkpoints: the run keeps the best one
    batch_size: int = 24  # conversations (all questions about one image) per step
    lr: float = 3e-3
    warmup: int = 30
    seed: int = 0
    train_limit: Optional[int] = None  # images of each split at most (quick runs)
    val_limit: Optional[int] = None
    test_limit: Optional[int] = None
    eval_batch: int = 128


def quick_protocol() -> "Protocol":
    """--quick: 300 / 40 / 60 images of train / val / test, 60 steps of 16."""
    return Protocol(steps=60, eval_steps=(30, 60), batch_size=16, warmup=10, train_limit=300, val_limit=40,
                    test_limit=60)


@dataclass
class World:
    """The VQA data of the three splits, tokenized once, and their tower features."""
    tokenizer: object
    image_token_id: int
    pad_id: int
    splits: dict = field(default_factory=dict)  # split -> {"entries", "ids", "labels", "prompts", "image_of", "feats", "json"}


def _render(entries, tok, image_token_id, prompt_only: bool):
    from ...models.setokim.text import IMAGE_TOKEN_INDEX, render_conversation

    ids_all, lab_all = [], []
    for e in entries:
        conv = e["conversations"][:1] if prompt_only else e["conversations"]
        ids, labels = render_conversation(conv, tok, system="")
        ids = [image_token_id if i == IMAGE_TOKEN_INDEX else i for i in ids]
        ids_all.append(ids)
        lab_all.append(labels)
    return ids_all, lab_all


def per_image_conversations(entries: Sequence[dict]) -> list[dict]:
    """Single-question instruct entries -> one multi-turn entry per image (first-seen order;
    the image mark stays in the first question only)."""
    from ...models.setokim.text import IMAGE_TOKEN

    by_image: dict = {}
    for e in entries:
        conv = e["conversations"]
        c = by_image.setdefault(e["image"], {"image": e["image"], "conversations": []})
        if c["conversations"]:
            conv = [{**conv[0], "value": conv[0]["value"].replace(IMAGE_TOKEN, "").strip()}] + list(conv[1:])
        c["conversations"] += conv
    return list(by_image.values())


def load_world(data: str, protocol: Protocol, tower: BuiltinTower,
               progress: Optional[Callable[[str, int, int], None]] = None) -> World:
    from ...data import formats
    from ...models.setokim.text import build_word_tokenizer

    root = Path(data)
    files = {s: root / s / "instruct.json" for s in ("train", "val", "test")}
    for s, f in files.items():
        if not f.is_file():
            raise UserError(f"{f}: not found (make the world with `setok data shapes --out {data}`)")
    tok = build_word_tokenizer([files["train"]])
    image_token_id = len(tok)
    world = World(tok, image_token_id, tok.pad_token_id)
    limits = {"train": protocol.train_limit, "val": protocol.val_limit, "test": protocol.test_limit}
    for s, f in files.items():
        entries = formats.load(f, "instruct", check_files=False)
        images = sorted({e["image"] for e in entries})
        if limits[s]:
            keep = set(images[: limits[s]])
            images = images[: limits[s]]
            entries = [e for e in entries if e["image"] in keep]
        index = {p: i for i, p in enumerate(images)}
        cb = (lambda n, s=s, tot=len(images): progress(f"tower features, {s}", n, tot)) if progress else None
        feats = tower_features(tower, images, progress=cb)
        # training sequences: all questions about an image as one multi-turn conversation (the
        # image's tokens paid once for ~5 answers); questions are asked one at a time
        convs = per_image_conversations(entries)
        ids, labels = _render(convs, tok, image_token_id, prompt_only=False)
        prompts, _ = _render(entries, tok, image_token_id, prompt_only=True)
        for i, e in enumerate(entries):
            e.setdefault("id", str(i))
        world.splits[s] = {"entries": entries, "ids": ids, "labels": labels, "prompts": prompts,
                           "conv_image": [index[c["image"]] for c in convs],
                           "image_of": [index[e["image"]] for e in entries], "feats": feats, "json": f}
    return world


def reduce_world(feats: Tensor, method: str, budget: Optional[int], batch: int = 64) -> list[Tensor]:
    """Every image's tokens [(K_i, D)] (the stated importance substitute where needed)."""
    out = []
    for i in range(0, feats.shape[0], batch):
        out += reduce_features(feats[i:i + batch], method, budget)
    return out


def _batch(world: World, split: str, rows: Sequence[int], tokens: Sequence[Tensor], prompt: bool):
    from ...models.setokim.text import collate_conversations

    sp = world.splits[split]
    if prompt:
        rendered = [(sp["prompts"][r], [0] * len(sp["prompts"][r])) for r in rows]
        ids, _, mask = collate_conversations(rendered, world.pad_id, padding_side="left")
        labels = None
    else:
        ids, labels, mask = collate_conversations([(sp["ids"][r], sp["labels"][r]) for r in rows], world.pad_id)
    toks = [tokens[sp["image_of" if prompt else "conv_image"][r]] for r in rows]
    ids, mask, labels = splice_image_tokens(ids, [int(t.shape[0]) for t in toks], world.image_token_id, mask,
                                            labels, world.pad_id)
    return ids, mask, labels, toks


def answer(model, world: World, split: str, tokens: Sequence[Tensor], batch: int = 128,
           max_new_tokens: int = 3) -> list[dict]:
    """Greedy answers to every question of a split -> [{"question_id", "answer"}]."""
    sp = world.splits[split]
    tok = world.tokenizer
    preds = []
    model.eval()
    for i in range(0, len(sp["entries"]), batch):
        rows = list(range(i, min(i + batch, len(sp["entries"]))))
        ids, mask, _, toks = _batch(world, split, rows, tokens, prompt=True)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, mm_encoder_outputs=image_outputs(model, toks),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=world.pad_id)
        new = out[:, ids.shape[1]:]
        for r, seq in zip(rows, new.tolist()):
            seq = [t for t in seq if t not in (tok.eos_token_id, world.pad_id)]
            preds.append({"question_id": str(sp["entries"][r]["id"]),
                          "answer": tok.decode(seq, skip_special_tokens=True).strip()})
    return preds


def score(world: World, split: str, preds: list[dict], out_dir: Path, name: str) -> dict:
    """`setok eval vqa` on the predictions (written to out_dir/name.json)."""
    from ...eval.harness import eval_vqa
    from ...files import atomic_write_json

    sp = world.splits[split]
    pred_file = out_dir / f"{name}.json"
    atomic_write_json(pred_file, preds)
    data_file = sp["json"]
    if len(sp["entries"]) != len(json.loads(Path(data_file).read_text())):
        data_file = out_dir / f"{split}_subset.json"  # a --quick subset: score the questions asked
        atomic_write_json(data_file, sp["entries"])  # (image paths are absolute after formats.load)
    return eval_vqa(str(data_file), str(pred_file))


def finetune(world: World, tokens: dict, protocol: Protocol, out_dir: Path, name: str,
             progress: Optional[Callable[[int], None]] = None) -> dict:
    """One run of the protocol: a fresh tiny LLaVA (seeded), `steps` AdamW steps on train with
    these reduced tokens, val scored at each eval step (the better checkpoint kept), test
    answered once. tokens: split -> [(K_i, D)] per image."""
    p = protocol
    tok = world.tokenizer
    model = tiny_llava(len(tok) + 1, world.image_token_id, world.pad_id, p.hidden, p.layers, p.heads,
                       p.intermediate, p.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / p.warmup) * 0.5 *
                                              (1 + math.cos(math.pi * min(s, p.steps) / p.steps)))
    n = len(world.splits["train"]["ids"])
    g = torch.Generator().manual_seed(p.seed)  # the same batches for every run
    order = torch.randperm(n, generator=g).tolist()
    pos = 0
    best = None
    t0 = time.perf_counter()
    losses = []
    for step in range(1, p.steps + 1):
        if pos + p.batch_size > n:
            order = torch.randperm(n, generator=g).tolist()
            pos = 0
        rows = order[pos:pos + p.batch_size]
        pos += p.batch_size
        ids, mask, labels, toks = _batch(world, "train", rows, tokens["train"], prompt=False)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, mm_encoder_outputs=image_outputs(model, toks))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(out.loss.detach()))
        if progress:
            progress(1)
        if step in p.eval_steps:
            val = score(world, "val", answer(model, world, "val", tokens["val"], p.eval_batch), out_dir,
                        f"{name}.val{step}")
            if best is None or val["accuracy"] > best[1]:
                best = (step, val["accuracy"], {k: v.detach().clone() for k, v in model.state_dict().items()})
            model.train()
    train_s = time.perf_counter() - t0
    model.load_state_dict(best[2])
    test = score(world, "test", answer(model, world, "test", tokens["test"], p.eval_batch), out_dir,
                 f"{name}.test")
    return {"val_accuracy": best[1], "steps_chosen": best[0], "test": test, "train_seconds": train_s,
            "final_loss": statistics.mean(losses[-20:])}


def _finetune_job(job) -> dict:
    """One fine-tune in a worker process (spawned: no OpenMP state inherited from the parent)."""
    world, tokens, protocol, out_dir, name, threads = job
    torch.set_num_threads(threads)
    return finetune(world, tokens, protocol, out_dir, name)


def accuracy_table(data: str, out_dir: Path, protocol: Protocol, budgets: Sequence[int] = ACCURACY_BUDGETS,
                   methods: Sequence[str] = METHODS, progress=None, jobs: int = 1) -> dict:
    """The accuracy half (see the package docstring). progress(kind, ...) for the CLI's bars.
    jobs > 1 runs that many fine-tunes at once in spawned processes, each on
    max(1, torch threads // jobs) threads: the tiny model gains little from a second thread,
    so on a 2-core machine two 1-thread runs finish the table in about half the time. Every
    run is the same function on the same inputs, so the figures do not depend on jobs."""
    tower = BuiltinTower()
    say = progress or (lambda *a: None)
    world = load_world(data, protocol, tower, progress=lambda what, n, tot: say("features", what, n, tot))
    runs = [("full", FULL)] + [(m, None) for m in ("setok",) if m in methods] + \
        [(m, b) for b in budgets for m in methods]
    rows, todo = [], {}  # identical token sets (setok's counts under a budget it never reaches) share a run
    for method, budget in runs:
        tokens = {s: reduce_world(sp["feats"], "random" if method == "full" else method,
                                  FULL if method == "full" else budget) for s, sp in world.splits.items()}
        key = tuple(tuple(t.shape[0] for t in tokens[s]) for s in ("train", "val", "test"))
        sig = (method, key, float(sum(float(t.double().sum()) for t in tokens["train"][:50])))
        counts = torch.tensor([t.shape[0] for t in tokens["test"]], dtype=torch.float32)
        row = {"method": method, "budget": budget, "tokens_mean": float(counts.mean()),
               "tokens_min": int(counts.min()), "tokens_max": int(counts.max())}
        if method in NEEDS_IMPORTANCE:
            row["importance"] = IMPORTANCE_SUBSTITUTE
        if sig not in todo:
            todo[sig] = (f"{method}_{budget if budget is not None else 'natural'}", tokens)
        rows.append((row, sig))
    results = {}
    if jobs <= 1:
        for sig, (name, tokens) in todo.items():
            say("run", name, protocol.steps)
            results[sig] = finetune(world, tokens, protocol, out_dir, name, progress=lambda n: say("step", n))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        lite = World(world.tokenizer, world.image_token_id, world.pad_id,
                     {s: {k: v for k, v in sp.items() if k != "feats"} for s, sp in world.splits.items()})
        threads = max(1, torch.get_num_threads() // jobs)
        say("runs", len(todo))
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_finetune_job, (lite, tokens, protocol, out_dir, name, threads)): sig
                       for sig, (name, tokens) in sorted(todo.items(), key=lambda kv: kv[0][0] != "full")}
            for f in as_completed(futures):  # the full run (longest) was submitted first
                results[futures[f]] = f.result()
                say("run done", todo[futures[f]][0])
    out = []
    for row, sig in rows:
        name, r = todo[sig][0], results[sig]
        first = next(rw for rw, sg in rows if sg == sig)
        if first is not row:
            row["same_tokens_as"] = name
        row.update({"run": name, "accuracy": r["test"]["accuracy"], "val_accuracy": r["val_accuracy"],
                    "steps_chosen": r["steps_chosen"], "train_seconds": r["train_seconds"],
                    "final_loss": r["final_loss"],
                    "per_type": {k.split("/")[1]: v for k, v in r["test"].items() if k.startswith("accuracy/")}})
        out.append(row)
    return {"protocol": dataclasses.asdict(protocol), "runs": out, "jobs": jobs, "questions": {
        s: len(sp["entries"]) for s, sp in world.splits.items()}, "images": {
        s: int(sp["feats"].shape[0]) for s, sp in world.splits.items()}, "vocab": len(world.tokenizer) + 1}


def accuracy_goals(acc: dict, budgets: Sequence[int] = ACCURACY_BUDGETS) -> dict:
    """SeTok against the best baseline at each budget, and its natural count against 576."""
    runs = acc["runs"]
    full = next(r for r in runs if r["method"] == "full")
    out = {"per_budget": []}
    for b in budgets:
        at = [r for r in runs if r["budget"] == b]
        s = next((r for r in at if r["method"] == "setok"), None)
        base = [r for r in at if not r["method"].startswith("setok")]     # setok-fixed: another setok mode
        if s is None or not base:
            continue
        best = max(base, key=lambda r: r["accuracy"])
        out["per_budget"].append({"budget": b, "setok": s["accuracy"], "best_baseline": best["method"],
                                  "best_baseline_accuracy": best["accuracy"],
                                  "margin_points": 100 * (s["accuracy"] - best["accuracy"]),
                                  "met": s["accuracy"] >= best["accuracy"]})
    nat = next((r for r in runs if r["method"] == "setok" and r["budget"] is None), None)
    if nat is not None:
        gap = 100 * (full["accuracy"] - nat["accuracy"])
        out["natural"] = {"setok": nat["accuracy"], "tokens_mean": nat["tokens_mean"], "full_576": full["accuracy"],
                          "gap_points": gap, "met": gap <= 2.0}
    return out
