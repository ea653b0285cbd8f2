"""Which object does an edit diff change? The old-token lookup of `setok edit --diff`, per op.

    python benchmarks/diff_lookups.py --model RUN --data data/shapes/val/edits.json \
        [--ops recolor,remove,move] [--limit N] [--names] [--lookup diff|segment [--segment-place auto|draw]]
        [--out benchmarks/results/diff_lookups.json]

For each edit of the shapes world the model writes its diff answer (greedy, the place head
drawn at temperature 0, as `setok edit --diff --place draw --place-temperature 0`; one visual
token per image). The written old token picks the source token it is nearest to, as
`edit_diff.apply_diff` does, and that token is mapped to the object holding most of its pixels
(`edit_diff.object_token` over the instance map). Printed per op:

- `right`: the dropped token is the edited object's;
- `wrong`: another object's, split into another object of the named shape, of the named
  colour, of the recolouring's new colour, or no object's token (background);
- with `--names` (a model trained with the row's `names: true`): `words right`, answers whose
  words (all but the tokens) are the training answer's, and `old words right`, those whose words
  before the old token are.

With `--lookup segment` the old token is found as `setok edit --diff --lookup segment` finds it:
the model segments the object the instruction names (`tasks/edit_diff.segment_lookups`: the
source token whose region best matches that answer's mask), its place head at
`--segment-place` (auto: as `setok segment` writes; draw: drawn at temperature 0).

The figures of the README's "Names before tokens", "The old token by segmentation" and "The old token by its
mask" come from here.
"""
import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from setok_cli.data.formats import load
from setok_cli.models.setokim import prompt_batch
from setok_cli.models.setokim.bank import token_sets_with_layouts
from setok_cli.models.setokim.edit_diff import (DIFF_PROMPT, apply_diff, diff_conversation, diff_spec, object_token,
                                                parse_diff)
from setok_cli.tasks.edit_diff import segment_lookups
from setok_cli.tasks.setokim import Sampling, _kw, load_setokim


def words(text: str) -> list[str]:
    return [w for w in text.split() if w not in ("<image>", "[Img]", "[/Img]")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="an edits.json of the shapes world (with its scenes)")
    ap.add_argument("--ops", default="recolor,remove,move")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--names", action="store_true", help="also check the written words against names: true answers")
    ap.add_argument("--lookup", choices=["diff", "segment"], default="diff")
    ap.add_argument("--segment-place", choices=["auto", "draw"], default="auto")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    m = load_setokim(a.model)
    entries = load(a.data, "edits")[:a.limit]
    ops = a.ops.split(",")
    rgb = lambda p: np.asarray(Image.open(p).convert("RGB"))         # noqa: E731
    kw = {**_kw(Sampling(place="draw", place_temperature=0.0), torch.Generator().manual_seed(0)),
          "bank": None, "bank_layouts": None, "max_visual_tokens": 1}
    res: dict = {}
    for op in ops:
        es = [e for e in entries if (e.get("edit") or {}).get("op") == op]
        c = collections.Counter()
        for s in range(0, len(es), a.batch):
            chunk = es[s:s + a.batch]
            sets, lays, seeds = token_sets_with_layouts(m, [e["source"] for e in chunk], seeds=True)
            out = m.setok.tokenize([rgb(e["source"]) for e in chunk])
            gen = m.generate(*prompt_batch(m, [DIFF_PROMPT.format(instruction=e["instruction"]) for e in chunk],
                                           [[x] for x in m.readable(sets, seeds)]), **kw)
            looked = (segment_lookups(m, [e["source"] for e in chunk], sets, lays, m.readable(sets, seeds),
                                      [e["instruction"] for e in chunk],
                                      Sampling(place=a.segment_place, place_temperature=0.0))
                      if a.lookup == "segment" else None)
            for i, (e, o, toks) in enumerate(zip(chunk, gen, sets)):
                if a.names:
                    want = words(diff_conversation(e, names=True)[0][1]["value"])
                    got = words(o.text)
                    c["words right"] += got == want
                    old_words = len(want) - (3 if op == "move" else 2 if op == "recolor" else 0)
                    c["old words right"] += got[:old_words] == want[:old_words]
                old, _ = parse_diff(o.text, o.images)
                _, dropped = apply_diff(toks, old, None, m.normalize)
                if looked is not None:
                    dropped = looked[i][1] if looked[i] is not None else None
                objs = json.loads(Path(e["source_scene"]).read_text())["objects"]
                inst = np.asarray(Image.open(diff_spec(e)["source_instances"]))
                owner = {object_token(m, out, i, inst, j + 1): j for j in range(len(objs))}
                true, got_obj = e["edit"]["object"] - 1, owner.get(dropped)
                if got_obj == true:
                    c["right"] += 1
                    continue
                c["wrong"] += 1
                if got_obj is None:
                    c["wrong: no object's token"] += 1
                    continue
                new_colour = e["instruction"].rstrip(".").split()[-1] if op == "recolor" else None
                c["wrong: the named shape"] += objs[got_obj]["shape"] == objs[true]["shape"]
                c["wrong: the named colour"] += objs[got_obj]["color"] == objs[true]["color"]
                c["wrong: the new colour"] += objs[got_obj]["color"] == new_colour
        res[op] = {"edits": len(es), **dict(c)}
        print(op, json.dumps(res[op]))
    print(f"({time.time() - t0:.0f} s)")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"model": a.model, "data": a.data, "lookup": a.lookup,
                                           "segment_place": a.segment_place, "ops": res}, indent=1) + "\n")


if __name__ == "__main__":
    main()
