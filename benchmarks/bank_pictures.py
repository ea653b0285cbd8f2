"""The README's token-bank picture: generation from test captions without and with `--bank`.

    python benchmarks/bank_pictures.py --model runs/tiny-stage2 --bank out/bank_tiny.safetensors \
        --data data/shapes_seed1/test --out docs/bank_generate.png [--n 6]

Row 1: the true images of the first N test captions. Row 2: what the model writes for each
caption (greedy, the MSE head's regressed tokens). Row 3: the same with each written token
snapped to the nearest token of the bank. The same calls as `setok generate [--bank FILE]`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from setokim_pictures import CELL, _cell, _row, _save_stacked  # noqa: E402  (the same cells as the Setokim picture)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--bank", required=True, help="a token bank (`setok bank DATA --model RUN --out FILE`)")
    ap.add_argument("--data", required=True, help="a split folder of the shapes world (pairs.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    import torch

    from setok_cli.data.formats import load
    from setok_cli.images import load_image
    from setok_cli.models.setokim.bank import load_bank
    from setok_cli.tasks.setokim import Sampling, generate, load_setokim
    torch.set_num_threads(a.threads)
    model = load_setokim(a.model)
    pairs = load(Path(a.data) / "pairs.json", "pairs")[: a.n]
    caps = [p["caption"] for p in pairs]
    size = np.asarray(load_image(pairs[0]["image"])).shape[0]
    plain = generate(model, caps, 1, Sampling(), size)
    snapped = generate(model, caps, 1, Sampling(bank=load_bank(a.bank, model)), size)
    rows = [_row([_cell(np.asarray(load_image(p["image"])), [f"truth: {p['caption']}"]) for p in pairs]),
            _row([_cell(g[0], ["written (MSE head)"]) for g in plain]),
            _row([_cell(g[0], ["written, snapped to the bank"]) for g in snapped])]
    _save_stacked(rows, a.out)
    print(json.dumps({"out": a.out, "captions": len(caps), "cell": CELL}))


if __name__ == "__main__":
    main()
