"""The README's Setokim pictures: questions and answers on the image, segment overlays, edits.

    python benchmarks/setokim_pictures.py --model runs/tiny-stage3 --data data/shapes_seed1/test \
        --out docs/stage3_tiny.png [--n 6]

Row 1: the first N test images with one question each (cycling over the question types),
the model's answer and the truth; a model whose answers look first (models/setokim/look.py)
shows the regions of the tokens it wrote, one colour each. Row 2: the first N referring expressions, the predicted
mask over the image (red) and the true outline (green). Row 3: the first N edits, source |
edited, with the instruction; with --diff, row 4: the same edits as token diffs (`setok edit
--diff --keep-pixels --place draw --place-temperature 0`). Greedy, the same calls as `setok ask /
segment / edit`.
"""
from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CELL = 160          # pixels per image side in the picture
TEXT_H = 54


def _font(size=11):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _cell(image: np.ndarray, lines: list[str], width: int = CELL) -> Image.Image:
    """An image with its text lines under it (each wrapped to at most 3 lines)."""
    im = Image.fromarray(image).resize((width, round(image.shape[0] * width / image.shape[1])), Image.NEAREST)
    parts = [part for ln in lines for part in textwrap.wrap(ln, width=width // 6)[:3]]
    out = Image.new("RGB", (width, im.height + max(TEXT_H, 12 * len(parts) + 6)), "white")
    out.paste(im, (0, 0))
    d = ImageDraw.Draw(out)
    for k, part in enumerate(parts):
        d.text((3, im.height + 2 + 12 * k), part, fill="black", font=_font())
    return out


def _row(cells: list[Image.Image], gap: int = 6) -> Image.Image:
    w = sum(c.width for c in cells) + gap * (len(cells) - 1)
    h = max(c.height for c in cells)
    out = Image.new("RGB", (w, h), "white")
    x = 0
    for c in cells:
        out.paste(c, (x, 0))
        x += c.width + gap
    return out


def _save_stacked(rows: list[Image.Image], out: str, gap: int = 8) -> None:
    """Rows one under the other -> a PNG at `out`."""
    pic = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows) + gap * len(rows)), "white")
    y = 0
    for r in rows:
        pic.paste(r, (0, y))
        y += r.height + gap
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    pic.save(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="a split folder of the shapes world (instruct/referring/edits.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--snap", action="store_true", help="segment with --snap")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bank", help="edits snap to this token bank (setok edit --bank)")
    ap.add_argument("--diff", action="store_true", help="a 4th row: the edits as token diffs (setok edit --diff)")
    ap.add_argument("--types", help="row 1 asks only these question types (comma-separated, e.g. relation)")
    ap.add_argument("--questions-only", action="store_true", help="draw row 1 (the questions) alone")
    a = ap.parse_args(argv)
    import torch

    from setok_cli.data.formats import load
    from setok_cli.data.shapes_text import final_answer
    from setok_cli.images import load_image
    from setok_cli.models.setokim.look import looked_masks, looked_picture
    from setok_cli.tasks.setokim import Sampling, ask, edit, load_setokim, overlay, segment, side_by_side
    torch.set_num_threads(a.threads)
    model = load_setokim(a.model)
    opts = Sampling(max_new_tokens=24)           # a looking answer writes up to 6 tokens, 3 steps each
    split = Path(a.data)
    rows = []

    inst = load(split / "instruct.json", "instruct")
    types = a.types.split(",") if a.types else sorted({e.get("type", "all") for e in inst})
    picked, seen_images = [], set()
    for e in inst:                       # one question per image, cycling over the types
        want = types[len(picked) % len(types)]
        if e["image"] not in seen_images and e.get("type") == want:
            picked.append(e)
            seen_images.add(e["image"])
        if len(picked) == a.n:
            break
    qs = [e["conversations"][0]["value"].replace("<image>", "").strip() for e in picked]
    answers = ask(model, [e["image"] for e in picked], qs, opts, tokens=True)
    cells = []
    for e, q, (ans, toks) in zip(picked, qs, answers):
        img = np.asarray(load_image(e["image"]))
        if toks:                         # a looking answer: the regions of the tokens it wrote, one colour each
            img = looked_picture(img, looked_masks(model, e["image"], toks))
            placed, _, counted = ans.rsplit(": ", 1)[0].partition(", ")      # places, then a count (chain)
            said = [w for w in placed.split() if w.isdigit()]                       # places (look_places)
            ans = f"{final_answer(ans)} ({len(toks)} looked up" + (f" at {', '.join(said)}" if said else "") + (
                f"; counted {counted}" if counted and said else "") + ")"
        cells.append(_cell(img, [f"Q: {q}", f"A: {ans}", f"truth: {final_answer(e['conversations'][1]['value'])}"]))
    rows.append(_row(cells))
    if a.questions_only:
        _save_stacked(rows, a.out)
        print(f"wrote {a.out}")
        return

    refs = load(split / "referring.json", "referring")[: a.n]
    segs = segment(model, [r["image"] for r in refs], [r["expression"] for r in refs], opts, snap_to_input=a.snap)
    cells = []
    for r, s in zip(refs, segs):
        img = np.asarray(load_image(r["image"]))
        gt = np.asarray(Image.open(r["mask"]).convert("L")) > 127
        pic = overlay(img, s.mask)
        edge = gt & ~(np.roll(gt, 1, 0) & np.roll(gt, -1, 0) & np.roll(gt, 1, 1) & np.roll(gt, -1, 1))
        pic[edge] = (40, 200, 40)
        inter, union = (s.mask & gt).sum(), (s.mask | gt).sum()
        cells.append(_cell(pic, [f"segment: {r['expression']}", f"IoU {inter / max(union, 1):.2f}"]))
    rows.append(_row(cells))

    eds = load(split / "edits.json", "edits")[: a.n // 2]
    if a.bank:
        from setok_cli.models.setokim.bank import load_bank, load_bank_layouts
        opts = Sampling(max_new_tokens=8, bank=load_bank(a.bank, model), bank_layouts=load_bank_layouts(a.bank))
    outs = edit(model, [e["source"] for e in eds], [e["instruction"] for e in eds], opts,
                size=np.asarray(load_image(eds[0]["source"])).shape[0])
    rows.append(_row([_cell(side_by_side(np.asarray(load_image(e["source"])), o), [e["instruction"]], 2 * CELL)
                      for e, o in zip(eds, outs)]))
    if a.diff:                      # the same edits as token diffs (`setok edit --diff --keep-pixels`)
        import dataclasses
        dopts = dataclasses.replace(opts, diff=True, keep_pixels=1, place="draw", place_temperature=0.0)
        outs = edit(model, [e["source"] for e in eds], [e["instruction"] for e in eds], dopts,
                    size=np.asarray(load_image(eds[0]["source"])).shape[0])
        rows.append(_row([_cell(side_by_side(np.asarray(load_image(e["source"])), o),
                                [f"--diff: {e['instruction']}"], 2 * CELL) for e, o in zip(eds, outs)]))

    _save_stacked(rows, a.out)
    print(json.dumps({"out": a.out, "questions": len(picked), "segments": len(refs), "edits": len(eds)}))


if __name__ == "__main__":
    main()
