"""What `setok generate --rerank N --rerank-stop S` gives for each stop S, from one set of drawings.

    python benchmarks/rerank_stop.py --model runs/tiny-stage3 --data data/shapes/val/pairs_reading.json \
        --bank out/bank_tiny.safetensors --n 16 --stops 0.02,0.05,0.1,0.2 \
        [--image-weights 0.1,0.3,1,3] [--limit 250] [--out benchmarks/results/rerank_stop_val.json]

Each prompt's N candidates are drawn as `setok generate --size 64 --bank FILE --rerank N` draws
them (candidate c with seed c, the data in batches of 16, as the command's default), each is
scored as the reranker scores it (`tasks.rerank.caption_scores`) and parsed as `setok eval
generate` parses it. Each stop is then replayed on those drawings: a prompt keeps drawing until
its best score so far is at most S, and keeps its lowest-scoring candidate (`best_of`'s rule).
The row without a stop is plain `--rerank N` (its figures must equal `setok eval generate` on
that command's predictions), and `--n` prefixes give the smaller N. A real `--rerank-stop` run
draws the prompts still going as a smaller batch, so their later candidates are other draws of
the same distribution; the replay uses the full batch's. `--image-weights` also scores each
candidate the other way round (`image_scores`: the prompt's training loss of the candidate's own
tokens, as `setok caption --rerank` scores captions) and replays caption + w * image score.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation_lengths import load_prompts  # noqa: E402


@torch.no_grad()
def draw_all(model, entries: list[dict], opts, n: int, batch: int = 16, size: int = 64,
             image_score: bool = False) -> list[dict]:
    """-> per prompt {"scores": [N], "correct": [N], "n_pred": [N], "n_gt"}: each candidate's caption
    score and its objects matched, parsed and asked for; with `image_score` also "image_scores": [N],
    how well the prompt draws the candidate's own tokens (`tasks.rerank.image_scores`)."""
    from setok_cli.data.scene_parser import match_objects, parse_scene
    from setok_cli.eval.harness import _truth_objects
    from setok_cli.tasks.rerank import caption_scores, image_scores
    from setok_cli.tasks.setokim import generate
    rows = [{"scores": [], "correct": [], "n_pred": [], "n_gt": 0, "image_scores": []} for _ in entries]
    for start in range(0, len(entries), batch):
        chunk = entries[start:start + batch]
        prompts = [e["caption"] for e in chunk]
        truth = [_truth_objects(e) for e in chunk]
        for c in range(n):                    # candidate c: seed + j + c * num_images with seed 0, j 0, one image
            imgs = [ims[0] for ims in generate(model, prompts, 1, replace(opts, seed=c, rerank=1), size)]
            scores = caption_scores(model, imgs, prompts).tolist()
            if image_score:
                for k, v in enumerate(image_scores(model, model.read_sets(imgs), prompts).tolist()):
                    rows[start + k]["image_scores"].append(v)
            for k, (img, s, gt) in enumerate(zip(imgs, scores, truth)):
                m = match_objects(parse_scene(img), gt, None)
                r = rows[start + k]
                r["scores"].append(s)
                r["correct"].append(m["correct"])
                r["n_pred"].append(m["n_pred"])
                r["n_gt"] = m["n_gt"]
        print(f"  {min(start + batch, len(entries))} / {len(entries)} prompts", file=sys.stderr, flush=True)
    return rows


def replay(rows: list[dict], n: int, stop: float | None, image_weight: float = 0.0) -> dict:
    """The figures of `best_of` with at most n candidates and `stop` over the recorded drawings
    (`image_weight` w: each candidate scored as its caption score + w * its image score)."""
    correct = n_gt = n_pred = 0
    counts, drawn = [], []
    for r in rows:
        sc = [c + image_weight * i for c, i in zip(r["scores"], r["image_scores"])] if image_weight else r["scores"]
        best, k = 0, 0
        for k in range(n):
            if sc[k] < sc[best]:
                best = k
            if stop is not None and sc[best] <= stop:
                break
        drawn.append(k + 1)
        correct, n_gt, n_pred = correct + r["correct"][best], n_gt + r["n_gt"], n_pred + r["n_pred"][best]
        counts.append(r["n_pred"][best] == r["n_gt"])
    return {"n": n, "stop": stop, "image_weight": image_weight, "object_recall": correct / max(n_gt, 1), "object_precision": correct / max(n_pred, 1),
            "count_accuracy": float(np.mean(counts)), "mean_drawn": float(np.mean(drawn))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="a pairs file of the world (its entries name their scenes)")
    ap.add_argument("--bank", help="a token bank (setok bank), as `setok generate --bank`")
    ap.add_argument("--n", type=int, default=16, help="candidates drawn per prompt")
    ap.add_argument("--stops", default="0.02,0.05,0.1,0.2", help="comma-separated caption scores")
    ap.add_argument("--image-weights", default="", help="comma-separated w: also replay caption + w * image score")
    ap.add_argument("--limit", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="write the table and every candidate's score and parse here (JSON)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, opts, entries = load_prompts(a.model, a.bank, a.data, a.limit)
    weights = [float(w) for w in a.image_weights.split(",") if w.strip()]
    rows = draw_all(model, entries, opts, a.n, image_score=bool(weights))
    stops = [float(s) for s in a.stops.split(",") if s.strip()]
    table = [replay(rows, k, None) for k in sorted({1, 2, 4, 8, a.n}) if k <= a.n]
    table += [replay(rows, a.n, s) for s in stops]
    table += [replay(rows, k, None, w) for w in weights for k in sorted({8, a.n}) if k <= a.n]
    print(f"{a.model}: {len(rows)} prompts")
    print(f"{'N':>4} {'stop':>6} {'w':>5} {'recall':>7} {'precision':>9} {'count':>6} {'drawn':>6}")
    for t in table:
        stop = "-" if t["stop"] is None else f"{t['stop']:g}"
        print(f"{t['n']:>4} {stop:>6} {t['image_weight']:>5g} {t['object_recall']:>7.3f} "
              f"{t['object_precision']:>9.3f} {t['count_accuracy']:>6.3f} {t['mean_drawn']:>6.2f}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"model": a.model, "data": a.data, "table": table, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
