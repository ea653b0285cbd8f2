"""The README's picture of `setok edit --diff --lookup segment`: the old token found by the diff
answer against the one found by segmenting the object the instruction names.

    python benchmarks/lookup_pictures.py --model runs/tiny-stage3 --data data/shapes_seed1/test \
        --bank out/bank_tiny.safetensors --out docs/edit_lookup.png [--n 6] [--ops recolor]

One row per edit (the first N of the named ops): the source with the instruction, the region of
the token each lookup drops (red) over the source, the edit each lookup gives (`setok edit --diff
--bank FILE --keep-pixels --place draw --place-temperature 0`, then with `--lookup segment`),
and the true target. Greedy, the same calls as `setok edit`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import torch
from setokim_pictures import _cell, _row, _save_stacked

from setok_cli.data.formats import load
from setok_cli.images import load_image
from setok_cli.models.setokim import prompt_batch
from setok_cli.models.setokim.bank import load_bank, load_bank_layouts, token_sets_with_layouts
from setok_cli.models.setokim.edit_diff import DIFF_PROMPT, apply_diff, parse_diff
from setok_cli.tasks.edit_diff import segment_lookups
from setok_cli.tasks.setokim import Sampling, _kw, edit, load_setokim, overlay


def _layout_mask(layout: torch.Tensor, side: int) -> np.ndarray:
    """A token's region (P,) bool over its layout grid -> (side, side) bool."""
    g = int(round(layout.numel() ** 0.5))
    m = layout.view(g, g).numpy().astype(np.uint8)
    return np.kron(m, np.ones((side // g, side // g), np.uint8)).astype(bool)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="a split folder of the shapes world (edits.json)")
    ap.add_argument("--bank", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--ops", default="recolor")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = load_setokim(a.model)
    ops = a.ops.split(",")
    eds = [e for e in load(f"{a.data}/edits.json", "edits") if (e.get("edit") or {}).get("op") in ops][:a.n]
    opts = Sampling(max_new_tokens=16, bank=load_bank(a.bank, model), bank_layouts=load_bank_layouts(a.bank),
                    diff=True, keep_pixels=1, place="draw", place_temperature=0.0)
    srcs = [np.asarray(load_image(e["source"])) for e in eds]
    side = srcs[0].shape[0]
    sets, lays, seeds = token_sets_with_layouts(model, [e["source"] for e in eds], seeds=True)
    readable = model.readable(sets, seeds)
    kw = {**_kw(opts, torch.Generator().manual_seed(0)), "bank": None, "bank_layouts": None, "max_visual_tokens": 1}
    gen = model.generate(*prompt_batch(model, [DIFF_PROMPT.format(instruction=e["instruction"]) for e in eds],
                                       [[r] for r in readable]), **kw)
    by_diff = [apply_diff(s, parse_diff(o.text, o.images)[0], None, model.normalize)[1] for o, s in zip(gen, sets)]
    by_seg = [lk[1] if lk else None for lk in segment_lookups(model, [e["source"] for e in eds], sets, lays, readable,
                                                                [e["instruction"] for e in eds], opts)]
    outs = {lk: edit(model, [e["source"] for e in eds], [e["instruction"] for e in eds],
                     dataclasses.replace(opts, lookup=lk), size=side) for lk in ("diff", "segment")}
    rows = []
    for i, e in enumerate(eds):
        def dropped(k):
            return overlay(srcs[i], _layout_mask(lays[i][k], side)) if k is not None else srcs[i]
        rows.append(_row([
            _cell(srcs[i], [e["instruction"]]),
            _cell(dropped(by_diff[i]), ["dropped: diff answer"]),
            _cell(outs["diff"][i], ["edit: --lookup diff"]),
            _cell(dropped(by_seg[i]), ["dropped: segmentation"]),
            _cell(outs["segment"][i], ["edit: --lookup segment"]),
            _cell(np.asarray(load_image(e["target"])), ["truth"])]))
    _save_stacked(rows, a.out)
    print(json.dumps({"out": a.out, "edits": len(eds)}))


if __name__ == "__main__":
    main()
