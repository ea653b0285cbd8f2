"""The README's token-bank picture: generation from test captions without and with `--bank`.

    python benchmarks/bank_pictures.py --model runs/tiny-stage2 --bank out/bank_tiny.safetensors \
        --data data/shapes_seed1/test --out docs/bank_generate.png [--n 6] [--pairs pairs_reading.json]

Row 1: the true images of the first N test captions. Row 2: what the model writes for each
caption (greedy, the MSE head's regressed tokens). Row 3: the same with each written token
snapped to the nearest token of the bank. Row 4: the first N/2 test edits, source | edited
without the bank | edited with it. Row 5: the same edits, source | with the bank | with the bank
and the source's pixels kept over the objects the edit copied. The same calls as `setok
generate|edit [--bank FILE] [--keep-pixels]`.
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
    ap.add_argument("--pairs", default="pairs.json",
                    help="the captions file in --data (pairs_reading.json: reading order)")
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    import torch

    from setok_cli.data.formats import load
    from setok_cli.images import load_image
    from setok_cli.models.setokim.bank import load_bank, load_bank_layouts
    from setok_cli.tasks.setokim import Sampling, edit, generate, load_setokim
    torch.set_num_threads(a.threads)
    model = load_setokim(a.model)
    pairs = load(Path(a.data) / a.pairs, "pairs")[: a.n]
    caps = [p["caption"] for p in pairs]
    size = np.asarray(load_image(pairs[0]["image"])).shape[0]
    banked = Sampling(bank=load_bank(a.bank, model), bank_layouts=load_bank_layouts(a.bank))   # the CLI's defaults
    plain = generate(model, caps, 1, Sampling(), size)
    snapped = generate(model, caps, 1, banked, size)
    eds = load(Path(a.data) / "edits.json", "edits")[: max(1, a.n // 2)]
    srcs, instr = [e["source"] for e in eds], [e["instruction"] for e in eds]
    e_plain, e_snapped = edit(model, srcs, instr, Sampling(), size), edit(model, srcs, instr, banked, size)
    banked.keep_pixels = 1
    e_kept = edit(model, srcs, instr, banked, size)
    bar = np.full((size, 2, 3), 255, np.uint8)
    triples = [np.concatenate([np.asarray(load_image(s_)), bar, p_, bar, q_], 1)
               for s_, p_, q_ in zip(srcs, e_plain, e_snapped)]
    kept = [np.concatenate([np.asarray(load_image(s_)), bar, q_, bar, k_], 1)
            for s_, q_, k_ in zip(srcs, e_snapped, e_kept)]
    rows = [_row([_cell(np.asarray(load_image(p["image"])), [f"truth: {p['caption']}"]) for p in pairs]),
            _row([_cell(g[0], ["written (MSE head)"]) for g in plain]),
            _row([_cell(g[0], ["written, snapped to the bank"]) for g in snapped]),
            _row([_cell(t, [f"{i}: source | plain | bank"], 2 * CELL) for t, i in zip(triples, instr)]),
            _row([_cell(t, [f"{i}: source | bank | bank, pixels kept"], 2 * CELL) for t, i in zip(kept, instr)])]
    _save_stacked(rows, a.out)
    print(json.dumps({"out": a.out, "captions": len(caps), "edits": len(eds), "cell": CELL}))


if __name__ == "__main__":
    main()
