"""Setokim generation speed with and without the KV cache.

    python benchmarks/bench_generate.py [--model RUN] [--batch 4] [--new-tokens 64] [--rounds 5] [--threads 1] [--json]

Without --model a Setokim with a random LM of the tiny stage-2 recipe's shape (4 layers,
256 wide) is built in the process (no files needed); with --model the trained run is
loaded. Each round times greedy text generation of up to --new-tokens tokens for --batch
prompts with the cache (the prefix runs once, then one position per step) and without it
(the whole sequence re-runs every step), interleaved round by round; the report gives
medians, tokens/s and the ratio. The outputs of the two must be identical (checked).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from setok_cli.models.setokim import Setokim, SetokimConfig, build_word_tokenizer, prompt_batch  # noqa: E402

TINY_LM = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=1024)
WORDS = ("a red green blue circle square star triangle hexagon cross two three objects image describe "
         "generate the and of in an there are").split()


def random_model(tmp: str) -> Setokim:
    """Random tiny Setokim (its stage-1 part is a random SeTok; only the LM matters here)."""
    from setok_cli.models.setok import SeTok, SeTokConfig
    ck = os.path.join(tmp, "stage1")
    SeTok(SeTokConfig(token_dim=64, merger_dim=32, max_tokens=16)).save_pretrained(os.path.join(ck, "setok"))
    build_word_tokenizer(extra_texts=[" ".join(WORDS)]).save_pretrained(os.path.join(tmp, "tok"))
    cfg = SetokimConfig(lm=dict(TINY_LM), text_tokenizer=os.path.join(tmp, "tok"), stage1=ck)
    return Setokim.from_config(cfg).eval()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a stage-2/3 run or Setokim folder (default: a random tiny model)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = Setokim.from_pretrained(a.model).eval() if a.model else random_model(tmp)
        prompts = [f"Describe the image briefly. {' '.join(WORDS[: 4 + i])}" for i in range(a.batch)]
        args = prompt_batch(model, prompts)
        def run(cache: bool):
            t0 = time.perf_counter()
            out = model.generate(*args, max_new_tokens=a.new_tokens, use_cache=cache)
            return time.perf_counter() - t0, [o.ids for o in out]

        run(True), run(False)                                   # warm-up
        times = {True: [], False: []}
        same = True
        for _ in range(a.rounds):
            for cache in (True, False):
                t, ids = run(cache)
                times[cache].append(t)
                if cache:
                    ref = ids
                else:
                    same &= ids == ref
        n_tok = sum(len(x) for x in ref)                          # ids produced (a row may stop at </s>)
        med = {c: statistics.median(v) for c, v in times.items()}
        res = {"model": a.model or "random tiny (4 x 256)", "batch": a.batch, "new_tokens": a.new_tokens,
               "prompt_tokens": int(args[1].sum(1).max()), "generated_tokens": n_tok, "rounds": a.rounds, "threads": a.threads,
               "cache_s": round(med[True], 4), "no_cache_s": round(med[False], 4),
               "cache_tokens_per_s": round(n_tok / med[True], 1), "no_cache_tokens_per_s": round(n_tok / med[False], 1),
               "speedup": round(med[False] / med[True], 2), "identical_outputs": bool(same)}
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>22}: {v}")
    return res


if __name__ == "__main__":
    main()
