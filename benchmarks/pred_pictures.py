"""The README's generation pictures from prediction files: the images `setok generate --data ... --pred-out`
wrote (the ones `setok eval generate` scored), one row per file, under the true images.

    python benchmarks/pred_pictures.py --data data/shapes_seed1/test/pairs_reading.json --out docs/gen_weights.png \
        --row "stage II=out/gen_stage2.json" --row "stage III=out/gen_stage3.json" [--n 6] [--start 0]

Each cell says how many of the caption's objects the scene parser matched in that image, and how many it parsed
(per image, as `setok eval generate` counts them). The rows show the first N entries from --start: no choice of
which prompts to show.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from setokim_pictures import _cell, _row, _save_stacked  # noqa: E402  (the same cells as the Setokim picture)


def per_image(data: str, pred: str) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """-> (the aligned predictions, per image [matched, true] objects, per image [matched, parsed] objects)."""
    from setok_cli.data import formats
    from setok_cli.eval.compare import Tally
    from setok_cli.eval.harness import _index, _norm_text, eval_generate, read_predictions
    tally = Tally()
    eval_generate(data, pred, tally=tally)
    entries = list(formats.load(data, "pairs", check_files=False))
    preds = read_predictions(pred, {"caption": "the prompt", "image": "the generated PNG"},
                             {"caption": ("prompt",)}, paths=("image",), match_keys=("caption",))
    aligned = _index(preds, [_norm_text(e["caption"]) for e in entries], lambda p: _norm_text(p["caption"]))
    arrays = tally.arrays()
    return aligned, arrays["object_recall"], arrays["object_precision"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the pairs file the predictions were written for")
    ap.add_argument("--row", action="append", required=True, help="LABEL=PRED.json (setok generate --pred-out)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--start", type=int, default=0)
    a = ap.parse_args(argv)
    from setok_cli.data.formats import load
    from setok_cli.images import load_image
    pairs = load(a.data, "pairs")
    show = range(a.start, min(a.start + a.n, len(pairs)))
    rows = [_row([_cell(np.asarray(load_image(pairs[i]["image"])), [f"truth: {pairs[i]['caption']}"]) for i in show])]
    totals = {}
    for spec in a.row:
        label, _, pred = spec.partition("=")
        aligned, recall, precision = per_image(a.data, pred)
        cells = []
        for i in show:
            if aligned[i] is None:
                raise SystemExit(f"error: {pred} has no image for entry {i}")
            found, true = recall[i].astype(int)
            parsed = int(precision[i][1])
            cells.append(_cell(np.asarray(load_image(aligned[i]["image"])),
                               [label, f"{found} of {true} objects, {parsed} parsed"]))
        rows.append(_row(cells))
        totals[label] = {"object_recall": float(recall[:, 0].sum() / recall[:, 1].sum()),
                         "object_precision": float(precision[:, 0].sum() / max(precision[:, 1].sum(), 1))}
    _save_stacked(rows, a.out)
    print(json.dumps({"out": a.out, "shown": list(show), "all images": totals}))


if __name__ == "__main__":
    main()
