"""A step of stage III's text-only phase (`model.text_first`): one pass over the rows, or the shared prefix once.

    python benchmarks/bench_text_first.py --model runs/tiny-stage2 --recipe recipes/tiny/stage3.yaml \\
        [--steps 12] [--threads 2]

Both ways train the recipe's LoRA on the recipe's `text_first` rows, batch by batch as the phase draws them: a
forward and backward of `lm(ids, labels)` (one pass over every row), and of `prefix_loss` (the prefix all rows
share, BOS and the system prompt, run once and its keys and values repeated). The steps alternate, each way's first
step is untimed; printed: the median seconds of each, their ratio, and the largest difference of the two losses.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a stage-2 run, checkpoint or Setokim folder")
    ap.add_argument("--recipe", default="recipes/tiny/stage3.yaml")
    ap.add_argument("--steps", type=int, default=12, help="timed steps of each way")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from setok_cli.models.setokim import Setokim
    from setok_cli.models.setokim.lora import wrap_lora
    from setok_cli.train.recipe import load_recipe
    from setok_cli.train.text_first import prefix_loss, shared_prefix, text_batch, text_rows
    recipe = load_recipe(args.recipe)
    t = recipe.model.text_first
    if t is None or recipe.model.lora is None:
        raise SystemExit(f"error: {args.recipe} has no model.text_first (and model.lora)")
    s = Setokim.from_pretrained(args.model)
    rows = text_rows(t.path)
    lm = wrap_lora(s.lm, recipe.model.lora, recipe.seed).train()
    params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr)
    rng = np.random.default_rng(0)
    times = {"one pass": [], "shared prefix": []}
    diff, P, L = 0.0, 0, 0
    for k in range(args.steps + 1):
        take = rng.choice(len(rows), t.batch_size, replace=False)
        ids, att, lab = text_batch([rows[i] for i in take], s.text_tokenizer, s.config.system_prompt)
        P, L = shared_prefix(ids, lab), ids.shape[1]
        losses = []
        for name in times:
            t0 = time.perf_counter()
            loss = lm(input_ids=ids, attention_mask=att, labels=lab).loss if name == "one pass" else \
                prefix_loss(lm, ids, att, lab)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if k:
                times[name].append(time.perf_counter() - t0)
            losses.append(loss.item())
        diff = max(diff, abs(losses[0] - losses[1]))       # the same weights: no optimizer step between the two
    a, b = (float(np.median(v)) for v in times.values())
    print(f"batch {t.batch_size} rows of {L} tokens, {P} shared; {args.threads} threads, median of {args.steps} steps")
    print(f"one pass {a:.3f} s   shared prefix {b:.3f} s   ratio {a / b:.2f}   largest loss difference {diff:.2e}")


if __name__ == "__main__":
    main()
