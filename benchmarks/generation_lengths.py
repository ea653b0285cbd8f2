"""How long the images Setokim writes are, against the prompt's objects, and what each length draws.

    python benchmarks/generation_lengths.py --model runs/tiny-stage3 --data data/shapes/val/pairs_reading.json \
        --bank out/bank_tiny.safetensors [--limit 250] [--out benchmarks/results/generation_lengths_val.json]

For each generation prompt of a world's pairs file, the model writes an image as `setok generate
--bank` does (greedy text, seed 0 per batch of 25, 64 px); its number of tokens K is compared with
the prompt's number of objects n (its scene's), and with the target image's own token count. The
written image is parsed as `setok eval generate` parses it, and the count is right when the
parser finds n objects. The table: per K - n, how many prompts and how many of those counted
right (README: "Generation by re-reading"). A model that says the size first
(`sized: true`, models/setokim/sized.py) is asked the same way `setok generate` asks it.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def lengths(model, entries: list[dict], opts, batch: int = 25) -> list[dict]:
    from setok_cli.data.scene_parser import parse_scene
    from setok_cli.models.setokim import TASK_PROMPTS, prompt_batch
    from setok_cli.tasks.setokim import _decode, _kw
    rows = []
    for i in range(0, len(entries), batch):
        chunk = entries[i:i + batch]
        texts = [TASK_PROMPTS["generate"].format(caption=e["caption"]) for e in chunk]
        g = torch.Generator().manual_seed(0)
        gen = model.generate(*prompt_batch(model, texts, start_image=not model.config.sized_images), **_kw(opts, g))
        written = [o.images[0] if o.images else torch.zeros(0, int(model.config.token_dim)) for o in gen]
        pics = _decode(model, written, opts, g, 64)                        # as `setok generate --size 64`
        truth = model.image_token_sets([e["image"] for e in chunk])
        for e, w, t, img in zip(chunk, written, truth, pics):
            n = len(json.loads(Path(e["scene"]).read_text())["objects"])
            rows.append({"image": e["image"], "objects": n, "written": int(w.shape[0]), "target": int(t.shape[0]),
                         "parsed": len(parse_scene(img))})
    return rows


def summary(rows: list[dict]) -> dict:
    by = collections.defaultdict(list)
    for r in rows:
        by[r["written"] - r["objects"]].append(r["parsed"] == r["objects"])
    return {"prompts": len(rows),
            "count_accuracy": float(np.mean([r["parsed"] == r["objects"] for r in rows])) if rows else None,
            "written_minus_objects": {str(k): {"prompts": len(v), "count_right": float(np.mean(v))}
                                      for k, v in sorted(by.items())},
            "target_minus_objects": dict(sorted(collections.Counter(
                str(r["target"] - r["objects"]) for r in rows).items(), key=lambda kv: int(kv[0])))}


def load_prompts(model_path: str, bank: str | None, data: str, limit: int):
    """-> (the model, `setok generate`'s default Sampling with the bank loaded, the first `limit`
    entries of the pairs file)."""
    from setok_cli.data import formats
    from setok_cli.models.setokim.bank import load_bank, load_bank_layouts
    from setok_cli.tasks.setokim import Sampling, load_setokim
    model = load_setokim(model_path)
    opts = Sampling()
    if bank:
        opts.bank, opts.bank_layouts = load_bank(bank, model), load_bank_layouts(bank)
    return model, opts, list(formats.load(data, "pairs", check_files=False))[:limit]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="a pairs file of the world (its entries name their scenes)")
    ap.add_argument("--bank", help="a token bank (setok bank), as `setok generate --bank`")
    ap.add_argument("--limit", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="write the summary and the rows here (JSON)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, opts, entries = load_prompts(a.model, a.bank, a.data, a.limit)
    rows = lengths(model, entries, opts)
    s = summary(rows)
    print(f"{a.model}: {s['prompts']} prompts, count right {s['count_accuracy']:.3f}")
    print(f"{'K - n':>6} {'prompts':>8} {'count right':>12}")
    for k, v in s["written_minus_objects"].items():
        print(f"{k:>6} {v['prompts']:>8} {v['count_right']:>12.3f}")
    print("the targets' own K - n:", s["target_minus_objects"])
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"model": a.model, "data": a.data, **s, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
