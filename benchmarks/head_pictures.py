"""The README's visual-head picture: the same captions written by several Setokim runs and
sampling settings, one row each, under the true images.

    python benchmarks/head_pictures.py --data data/shapes/val --out docs/visual_heads.png \
        --row "MSE head + bank=runs/tiny-stage2,bank=out/bank_tiny.safetensors" \
        --row "codebook 512, temp 0=runs/exp-S2K,temp=0" \
        --row "codebook + guidance 3, temp 0=runs/exp-S2KR,temp=0,guidance=3"

A row is LABEL=RUN[,temp=T][,guidance=G][,bank=FILE]: the same call as `setok generate
--visual-temperature T --guidance G --bank FILE` on the first --n captions of DATA/pairs.json
(`--file pairs_reading.json`: of another file of the split).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from setokim_pictures import _cell, _row, _save_stacked  # noqa: E402  (the same cells as the Setokim picture)


def _parse(spec: str) -> tuple[str, str, dict]:
    label, _, rest = spec.partition("=")
    run, *opts = rest.split(",")
    kw = {}
    for o in opts:
        k, _, v = o.partition("=")
        kw[k.strip()] = v.strip()
    return label, run, kw


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a split folder of the shapes world (pairs.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--row", action="append", required=True, help="LABEL=RUN[,temp=T][,guidance=G][,bank=FILE]")
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--file", default="pairs.json", help="the split's pairs file")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    import torch

    from setok_cli.data.formats import load
    from setok_cli.images import load_image
    from setok_cli.models.setokim.bank import load_bank, load_bank_layouts
    from setok_cli.tasks.setokim import Sampling, generate, load_setokim
    torch.set_num_threads(a.threads)
    pairs = load(Path(a.data) / a.file, "pairs")[: a.n]
    caps = [p["caption"] for p in pairs]
    size = np.asarray(load_image(pairs[0]["image"])).shape[0]
    rows = [_row([_cell(np.asarray(load_image(p["image"])), [f"truth: {p['caption']}"]) for p in pairs])]
    for spec in a.row:
        label, run, kw = _parse(spec)
        model = load_setokim(run)
        opts = Sampling(visual_temperature=float(kw["temp"]) if "temp" in kw else None,
                        guidance=float(kw.get("guidance", 1.0)),
                        bank=load_bank(kw["bank"], model) if "bank" in kw else None,
                        bank_layouts=load_bank_layouts(kw["bank"]) if "bank" in kw else None)
        rows.append(_row([_cell(g[0], [label]) for g in generate(model, caps, 1, opts, size)]))
    _save_stacked(rows, a.out)
    print(json.dumps({"out": a.out, "captions": len(caps), "rows": len(a.row)}))


if __name__ == "__main__":
    main()
