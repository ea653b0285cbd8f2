"""Is the list lookup out of the LM's reach, or out of its learning rate's? Drills, text only.

    python benchmarks/drill_lr_probe.py --model runs/tiny-stage2 --recipe recipes/tiny/stage3.yaml \\
        --lr 1e-3 3e-4 [--steps 600] [--every 100] [--full] [--threads 1] [--out F.json] \\
        [--form question|answer|echo] [--save DIR]
    python benchmarks/drill_lr_probe.py --model runs/tiny-stage2 --recipe recipes/tiny/stage3.yaml --form echo \
        --recipe-phase [--seed 0] [--relations]   # the recipe's own model.text_first, scored as it trains

The drills of `setok data drills` ("Is there a red cross? a pink cross, a blue cross" -> "no") ask
the one step that existence answers after a list need: is the asked colour among the listed ones?
This trains the LM of a Setokim run (its stage-2 weights and word tokenizer) on such drills alone,
without images, as stage III would: after the Vicuna system prompt (unless --no-system), the
recipe's LoRA (`model.lora`, its `modules_to_save` too) or, with --full, every weight; AdamW with
the recipe's weight decay, warm-up ratio, schedule and clipping, `--steps` steps of `--batch`
drills rendered in the Vicuna v1 format (only the answer and its `</s>` count). Each learning rate
starts from the same weights and sees the same drills. Printed every `--every` steps: the mean
training loss of the last steps and the accuracy on 512 held-out drills (the more likely of "yes"
and "no" at the answer; chance is 0.5). `--form` puts the list in the question, or first in the answer (its
words count in the loss; `echo` adds the asked colour again before the word: `drill_turns`). `--save DIR` writes a
copy of the Setokim folder whose LM is the drilled one, for a stage III (README: "Where the list is, and a "no"
after it"); a recipe does the same with `model.text_first` (train/text_first.py). `--relations` (with
`--recipe-phase`) also scores 512 held-out relation drills (`relation_drill`: "Is the red circle above the blue
star?" "[Img] [/Img] 1 [Img] [/Img] 5: yes"; `--relations chain`: "... 5, 1 2 3 4 5: yes"), for a phase whose rows
hold them (`setok data drills --relations N`): the yes / no as above, and the share written exactly after the two
places, which are drawn at random (every later answer token the most likely given the ones before it).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from setok_cli.data.drills import FORMS, count_drill, drill_turns, list_drill, relation_drill
from setok_cli.data.shapes_world import SHAPES
from setok_cli.models.hub import resolve_checkpoint, resolve_folder
from setok_cli.models.setokim.loading import load_text_tokenizer, quiet
from setok_cli.models.setokim.lora import wrap_lora
from setok_cli.models.setokim.text import IGNORE_INDEX, VICUNA_SYSTEM
from setok_cli.train.recipe import load_recipe
from setok_cli.train.text_first import text_batch
from setok_cli.train.trainer import build_scheduler

HELD_OUT = 512


def setokim_folder(run: str) -> Path:
    """A stage-2 run, checkpoint or Setokim folder -> the Setokim folder (lm/, tokenizer/)."""
    ck = resolve_checkpoint(resolve_folder(run, "Setokim run"))
    return ck / "setokim" if (ck / "setokim").is_dir() else ck


def drill_batch(rng: np.random.Generator, n: int, tok, system: str = VICUNA_SYSTEM, form: str = "question"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n drills -> (ids, attention mask, labels), each (n, L), right-padded; `system` opens each; the
    answer as `form` writes it (`drill_turns`); rendered as stage III's text-only phase renders its rows."""
    turns = [drill_turns(*list_drill(rng), form) for _ in range(n)]
    return text_batch([[{"from": "human", "value": u}, {"from": "gpt", "value": a}] for u, a in turns], tok, system)


def relation_batch(rng: np.random.Generator, n: int, tok, system: str = VICUNA_SYSTEM, chain: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n relation drills (`relation_drill`, with `chain` the places counted) -> (ids, attention mask, labels), as
    `drill_batch`."""
    turns = [relation_drill(rng, chain) for _ in range(n)]
    return text_batch([[{"from": "human", "value": u}, {"from": "gpt", "value": a}] for u, a in turns], tok, system)


def count_batch(rng: np.random.Generator, n: int, tok, system: str = VICUNA_SYSTEM
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n count drills (`count_drill`: "How many red objects are there?" "a blue star, a red circle 1: 1") -> (ids,
    attention mask, labels), as `drill_batch`."""
    turns = [count_drill(rng) for _ in range(n)]
    return text_batch([[{"from": "human", "value": u}, {"from": "gpt", "value": a}] for u, a in turns], tok, system)


@torch.no_grad()
def count_scores(lm, batch, digits: torch.Tensor, shapes: torch.Tensor) -> tuple[float, float]:
    """Count drills -> (the share whose final number is the most likely token, the share whose every step is right),
    teacher-forced. A step is each place where a number may follow: after each object's shape word (a number there
    exactly when the object is counted, and the right one) and after ": ". The objects are drawn at random, so their
    words are not scored."""
    ids, att, lab = batch
    was = lm.training
    lm.eval()
    pick = lm(input_ids=ids, attention_mask=att).logits[:, :-1].argmax(-1)
    lm.train(was)
    gold = lab[:, 1:]
    number = torch.isin(gold, digits)
    step = number | (torch.isin(ids[:, :-1], shapes) & (gold != IGNORE_INDEX))
    ok = (torch.isin(pick, digits) == number) & ((pick == gold) | ~number)
    rows = torch.arange(len(ids))
    last = (gold != IGNORE_INDEX).long().cumsum(1).argmax(1) - 1       # the final number, before </s>
    return (pick[rows, last] == gold[rows, last]).float().mean().item(), (ok | ~step).all(1).float().mean().item()


PLACES = 6    # a relation drill's answer opens with "[Img] [/Img] 1 [Img] [/Img] 5": random places, not scored


@torch.no_grad()
def exact(lm, batch, skip: int = PLACES) -> float:
    """The share of rows whose every answer token after the first `skip` (a relation drill's two places, drawn at
    random) is the most likely one given the right ones before it (teacher forcing): the rows whose count and
    answer greedy decoding writes exactly after the places."""
    ids, att, lab = batch
    was = lm.training
    lm.eval()
    pick = lm(input_ids=ids, attention_mask=att).logits[:, :-1].argmax(-1)
    lm.train(was)
    gold, counted = lab[:, 1:], lab[:, 1:] != IGNORE_INDEX
    counted = counted & (counted.long().cumsum(1) > skip)
    return ((pick == gold) | ~counted).all(1).float().mean().item()


@torch.no_grad()
def accuracy(lm, batch, yes: int, no: int) -> float:
    """The share of drills whose yes / no (the answer's last token before `</s>`) is the more likely of the two."""
    ids, att, lab = batch
    was = lm.training
    lm.eval()
    logits = lm(input_ids=ids, attention_mask=att).logits
    lm.train(was)
    L = lab.shape[1]
    last = L - 1 - (lab != IGNORE_INDEX).flip(1).float().argmax(1)   # the answer's </s>
    first = last - 1                                                  # its yes / no
    rows = torch.arange(len(ids))
    pick = logits[rows, first - 1][:, [yes, no]].argmax(-1)
    gold = (lab[rows, first] == no).long()
    return (pick == gold).float().mean().item()


def train_one(base, tok, recipe, lr: float, args, held_out) -> tuple[list[dict], torch.nn.Module]:
    lm = copy.deepcopy(base)
    if args.full:
        params = list(lm.parameters())
    else:
        lm = wrap_lora(lm, recipe.model.lora, args.seed)
        params = [p for p in lm.parameters() if p.requires_grad]
    o = recipe.optim
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay)
    run = copy.deepcopy(recipe)
    run.train.max_steps = args.steps
    sched = build_scheduler(opt, run)
    yes, no = (tok.convert_tokens_to_ids(tok.tokenize(w))[0] for w in ("yes", "no"))
    rng = np.random.default_rng(args.seed)
    out = [{"step": 0, "loss": None, "accuracy": accuracy(lm, held_out, yes, no)}]
    losses, t0 = [], time.time()
    lm.train()
    for step in range(1, args.steps + 1):
        ids, att, lab = drill_batch(rng, args.batch, tok, args.system, args.form)
        loss = lm(input_ids=ids, attention_mask=att, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % args.every == 0 or step == args.steps:
            out.append({"step": step, "loss": float(np.mean(losses[-args.every:])),
                        "accuracy": accuracy(lm, held_out, yes, no), "seconds": round(time.time() - t0, 1)})
            print(f"lr {lr:g}  step {step:5d}  loss {out[-1]['loss']:.3f}  held-out accuracy "
                  f"{out[-1]['accuracy']:.3f}", flush=True)
    return out, lm


def recipe_phase(base, tok, recipe, args, held_out, held_rel=None, held_cnt=None) -> list[dict]:
    """The recipe's `model.text_first` as `setok train` runs it (train/text_first.py), scored every `--every` steps."""
    from setok_cli.train.text_first import text_rows, train_text_first
    t = recipe.model.text_first
    if t is None or recipe.model.lora is None:
        raise SystemExit(f"error: {args.recipe} has no model.text_first (and model.lora)")
    yes, no = (tok.convert_tokens_to_ids(tok.tokenize(w))[0] for w in ("yes", "no"))
    count_ids = [torch.tensor([tok.convert_tokens_to_ids(tok.tokenize(w))[0] for w in ws])
                 for ws in (list("0123456789"), SHAPES)]

    def scored(lm, k) -> dict:
        r = {"step": k, "accuracy": accuracy(lm, held_out, yes, no)}
        if held_rel is not None:
            r["relation_accuracy"], r["relation_exact"] = accuracy(lm, held_rel, yes, no), exact(lm, held_rel)
        if held_cnt is not None:
            r["count_final"], r["count_steps"] = count_scores(lm, held_cnt, *count_ids)
        return r
    out, t0 = [{**scored(base, 0), "loss": None}], time.time()

    def on_step(k, lm):
        if k % args.every == 0 or k == t.steps:
            out.append({**scored(lm, k), "seconds": round(time.time() - t0, 1)})
            rel = f"  relations {out[-1]['relation_accuracy']:.3f} (exact {out[-1]['relation_exact']:.3f})" \
                if held_rel is not None else ""
            rel += f"  counts {out[-1]['count_final']:.3f} (every step {out[-1]['count_steps']:.3f})" \
                if held_cnt is not None else ""
            print(f"text_first  step {k:5d}  held-out accuracy {out[-1]['accuracy']:.3f}{rel}", flush=True)
    train_text_first(copy.deepcopy(base), tok, text_rows(t.path), lora=recipe.model.lora, optim=recipe.optim,
                     steps=t.steps, lr=t.lr, batch_size=t.batch_size, seed=args.seed, system=args.system,
                     on_step=on_step)
    return out


def save_setokim(folder: Path, lm, out: Path) -> None:
    """A copy of the Setokim folder with the drilled LM as its base (`lm/`; LoRA merged into it): a stage III's
    `model.setokim_from` for a probe."""
    import shutil
    shutil.copytree(folder, out)
    if hasattr(lm, "merge_and_unload"):
        lm = lm.merge_and_unload()
    shutil.rmtree(out / "lm")
    lm.save_pretrained(out / "lm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a stage-2 run, checkpoint or Setokim folder")
    ap.add_argument("--recipe", default="recipes/tiny/stage3.yaml", help="its model.lora and optim are used")
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-3, 3e-4])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--full", action="store_true", help="train every LM weight instead of the recipe's LoRA")
    ap.add_argument("--no-system", dest="system", action="store_const", const="", default=VICUNA_SYSTEM,
                    help="drop the Vicuna system prompt that opens every Setokim conversation")
    ap.add_argument("--form", choices=FORMS, default="question",
                    help="where the list is: in the question, or written first in the answer (with the asked colour "
                         "again before the word: echo)")
    ap.add_argument("--save", type=Path, help="with one --lr: write a copy of the Setokim folder whose LM is the "
                    "drilled one (LoRA merged), for a stage III to start from")
    ap.add_argument("--recipe-phase", action="store_true",
                    help="train as the recipe's model.text_first does instead (its rows, steps, lr and batch, through "
                         "setok's own train_text_first), scoring the held-out drills of --form every --every steps")
    ap.add_argument("--counts", action="store_true",
                    help="with --recipe-phase: score held-out count drills too (`setok data drills --counts`)")
    ap.add_argument("--relations", nargs="?", const="places", choices=["places", "chain"],
                    help="with --recipe-phase: score held-out relation drills too (chain: with the places counted)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.save and len(args.lr) != 1:
        raise SystemExit("error: --save keeps one drilled model: give one --lr")
    if args.save and args.save.exists():
        raise SystemExit(f"error: {args.save} exists; give a new folder")
    recipe = load_recipe(args.recipe)
    if not args.full and recipe.model.lora is None:
        raise SystemExit(f"error: {args.recipe} has no model.lora (use --full)")
    folder = setokim_folder(args.model)
    from transformers import AutoModelForCausalLM
    with quiet():
        base = AutoModelForCausalLM.from_pretrained(folder / "lm", local_files_only=True)
    tok = load_text_tokenizer(folder / "tokenizer")
    held_out = drill_batch(np.random.default_rng([args.seed, 999]), HELD_OUT, tok, args.system, args.form)
    results = {}
    if args.recipe_phase:
        held_rel = relation_batch(np.random.default_rng([args.seed, 998]), HELD_OUT, tok, args.system,
                                  args.relations == "chain") if args.relations else None
        held_cnt = count_batch(np.random.default_rng([args.seed, 997]), HELD_OUT, tok, args.system) \
            if args.counts else None
        results = {"text_first": recipe_phase(base, tok, recipe, args, held_out, held_rel, held_cnt)}
    for lr in [] if args.recipe_phase else args.lr:
        torch.manual_seed(args.seed)
        results[f"{lr:g}"], lm = train_one(base, tok, recipe, lr, args, held_out)
        if args.save:
            save_setokim(folder, lm, args.save)
            print(f"the drilled model -> {args.save}")
    print("\n| lr | " + " | ".join(f"step {r['step']}" for r in next(iter(results.values()))) + " |")
    print("|---|" + "---:|" * len(next(iter(results.values()))))
    for lr, rows in results.items():
        print(f"| {lr} | " + " | ".join(f"{r['accuracy']:.3f}" for r in rows) + " |")
        if rows[0].get("relation_accuracy") is not None:
            print(f"| {lr}, relations | " + " | ".join(f"{r['relation_accuracy']:.3f}" for r in rows) + " |")
            print(f"| {lr}, relations exact | " + " | ".join(f"{r['relation_exact']:.3f}" for r in rows) + " |")
        if rows[0].get("count_final") is not None:
            print(f"| {lr}, counts: final number | " + " | ".join(f"{r['count_final']:.3f}" for r in rows) + " |")
            print(f"| {lr}, counts: every step | " + " | ".join(f"{r['count_steps']:.3f}" for r in rows) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": str(folder), "full": args.full, "system": bool(args.system),
                                        "form": args.form, "recipe_phase": args.recipe_phase,
                                        "steps": recipe.model.text_first.steps if args.recipe_phase else args.steps,
                                        "batch": args.batch, "seed": args.seed, "results": results}, indent=1))


if __name__ == "__main__":
    main()
