"""The README's picture of generation by re-reading (`setok generate --rerank N`, tasks/rerank.py).

    python benchmarks/rerank_pictures.py --model runs/tiny-stage3 --data data/shapes_seed1/test \
        --bank out/bank_tiny.safetensors --out docs/rerank.png [--n 4] [--rerank 8]

One row per prompt (the first N of `pairs_reading.json`): the prompt, then its N candidate drawings
(seeds 0..N-1, the candidates `--rerank N` draws for one image), each with its caption score
(the mean cross-entropy per word of the prompt read back from the drawing; lower is better) and
how many objects the scene parser finds in it; the kept one is framed in green. The same calls as
`setok generate --size 64 --bank FILE --rerank N`.
"""
from __future__ import annotations

import argparse
import textwrap

import numpy as np
from PIL import Image, ImageDraw

from setok_cli.viz import _font

CELL = 128
TEXT_H = 40


def _cell(image: np.ndarray, lines: list[str], chosen: bool) -> Image.Image:
    out = Image.new("RGB", (CELL + 6, CELL + 6 + TEXT_H), "white")
    out.paste(Image.fromarray(image).resize((CELL, CELL), Image.NEAREST), (3, 3))
    d = ImageDraw.Draw(out)
    if chosen:
        d.rectangle([0, 0, CELL + 5, CELL + 5], outline=(0, 170, 0), width=3)
    for k, ln in enumerate(lines):
        d.text((3, CELL + 8 + 13 * k), ln, fill="black", font=_font(11))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="a world split (its pairs_reading.json is read)")
    ap.add_argument("--bank", help="a token bank (setok bank)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--rerank", type=int, default=8)
    a = ap.parse_args(argv)
    import torch

    from setok_cli.data import formats
    from setok_cli.data.scene_parser import parse_scene
    from setok_cli.models.setokim.bank import load_bank, load_bank_layouts
    from setok_cli.tasks.rerank import caption_scores
    from setok_cli.tasks.setokim import Sampling, generate, load_setokim
    torch.set_num_threads(1)
    model = load_setokim(a.model)
    opts = Sampling()
    if a.bank:
        opts.bank, opts.bank_layouts = load_bank(a.bank, model), load_bank_layouts(a.bank)
    entries = list(formats.load(f"{a.data}/pairs_reading.json", "pairs", check_files=False))[:a.n]
    prompts = [e["caption"] for e in entries]
    drawn = generate(model, prompts, a.rerank, opts, size=64)          # image c of a prompt: seed c = candidate c
    rows = []
    for p, cands in zip(prompts, drawn):
        scores = caption_scores(model, cands, [p] * len(cands)).tolist()
        best = int(np.argmin(scores))
        cells = []
        for c, (im, sc) in enumerate(zip(cands, scores)):
            n = len(parse_scene(im))
            cells.append(_cell(im, [f"score {sc:.3f}" + ("  kept" if c == best else ""),
                                    f"{n} object{'s' if n != 1 else ''} parsed"], c == best))
        head = Image.new("RGB", (200, cells[0].height), "white")
        ImageDraw.Draw(head).multiline_text((4, 4), textwrap.fill(p, 30), fill="black", font=_font(12))
        row = Image.new("RGB", (200 + sum(c.width + 4 for c in cells), cells[0].height), "white")
        row.paste(head, (0, 0))
        x = 200
        for c in cells:
            row.paste(c, (x, 0))
            x += c.width + 4
        rows.append(row)
    pic = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 8 for r in rows)), "white")
    y = 0
    for r in rows:
        pic.paste(r, (0, y))
        y += r.height + 8
    pic.save(a.out)
    print(a.out)


if __name__ == "__main__":
    main()
