"""Setokim's losses on held-out rows, teacher forced: how well a stage-II/III run predicts the
next visual token of images it did not train on, without decoding or snapping anything.

    python benchmarks/teacher_forced_loss.py RUN [RUN ...] --data data/shapes/val [--task generate]
        [--limit 200] [--file pairs_reading.json]

Each run reads the same rows (the first --limit entries of the split's file, as the trainer's
data task renders them) and prints the mean visual loss (MSE in standardised token space, the
training loss) and the stop loss, per batch of 25 rows averaged; for a run with a place head
also its place loss (the visual loss is then the head's at the true places).
"""
import argparse
import os

import numpy as np
import torch

from setok_cli.data.conversations import ConversationDataset
from setok_cli.tasks.setokim import load_setokim


def losses(model, ds, limit: int, batch: int = 25) -> dict:
    vis, stop, place = [], [], []
    with torch.no_grad():
        for i in range(0, min(limit, len(ds)), batch):
            items = [ds[j] for j in range(i, min(i + batch, limit, len(ds)))]
            samples = []
            for it in items:
                ims = [(x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy() for x in it["pixel_values"]]
                sets, seeds = model.image_token_sets(ims, seeds=True)     # seeds: a place head's targets
                samples.append({"conversations": it["conversations"], "images": sets, "seeds": seeds})
            out = model(**model.collate(samples))
            vis.append(out.visual_loss.item())
            stop.append(out.stop_loss.item())
            if out.place_loss is not None:
                place.append(out.place_loss.item())
    res = {"visual": float(np.mean(vis)), "stop": float(np.mean(stop)), "rows": min(limit, len(ds))}
    return {**res, "place": float(np.mean(place))} if place else res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="Setokim run folders / checkpoints")
    ap.add_argument("--data", required=True, help="a split folder of the synthetic world")
    ap.add_argument("--task", default="generate", choices=["generate", "edit"])
    ap.add_argument("--file", help="the split's file (default: pairs_reading.json for generate, edits.json)")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    name = a.file or ("pairs_reading.json" if a.task == "generate" else "edits.json")
    ds = ConversationDataset(os.path.join(a.data, name), a.task, 64)
    for run in a.runs:
        r = losses(load_setokim(run), ds, a.limit)
        place = f", place {r['place']:.4f} (the visual loss at the true places)" if "place" in r else ""
        print(f"{run}: {a.task} on {r['rows']} rows of {a.data}/{name}: visual {r['visual']:.4f}, "
              f"stop {r['stop']:.4f}{place}")


if __name__ == "__main__":
    main()
