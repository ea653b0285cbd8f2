"""The five SPEC section 4 data sets of the synthetic multi-object world (`setok data shapes`).

    generate(out, n=1000, size=64, seed=0)  ->  out/{train,val,test}/{pairs,instruct,referring,edits,objects}.json

Image i is a function of (seed, i) alone (`make_example`). The scene graphs, their rendering
and sampling live in `shapes_world`, the captions, questions and edits in `shapes_text`;
their names are re-exported here.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterable

import numpy as np

from ..files import atomic_write_bytes, atomic_write_json, ensure_dir
from .shapes_text import (DESCRIBE_BY_SHAPE, EXPLAINED_EXCLUSIVE, EXPLAINED_KINDS, EXPLAINED_OPTIONAL, QUESTION_TYPES,
                          all_questions, caption, caption_in_reading_order, count_phrase, describe_by_shape,
                          explained_answer, phrase, questions, reading_order, referring_expression, region_name,
                          sample_edit)
from .shapes_world import (CHECK_RES, COLOR_NAMES, COLORS, EXTENTS, MAX_OBJECTS, MAX_SIZE, MIN_SIZE, MIN_VISIBLE,
                           NUMBER_WORDS, PLURALS, REGIONS, SHAPES, SUPERSAMPLE, Rendered, _valid, coverage, inside,
                           render, render_background, sample_background, sample_object, sample_scene)

__all__ = ["generate", "make_example", "write_split", "referring_by", "describe_by", "questions_all", "edits_all",
           "explain_answers", "captions_reading", "parse_splits",
           "split_counts", "scene_record", "png_bytes",
           "all_questions", "caption", "caption_in_reading_order", "count_phrase", "reading_order", "describe_by_shape",
           "phrase", "questions",
           "referring_expression", "region_name", "sample_edit",
           "CHECK_RES", "COLOR_NAMES", "COLORS", "EXTENTS", "MAX_OBJECTS", "MAX_SIZE", "MIN_SIZE", "MIN_VISIBLE",
           "NUMBER_WORDS", "PLURALS", "REGIONS", "SHAPES", "SUPERSAMPLE", "Rendered", "_valid", "coverage", "inside",
           "render", "render_background", "sample_background", "sample_object", "sample_scene"]


# ----------------------------------------------------------------------------- I/O

def png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def scene_record(scene: dict, r: Rendered, size: int) -> dict:
    """The scene graph plus what the render measured (pixel bboxes and visible areas)."""
    objs = []
    for i, o in enumerate(scene["objects"]):
        ys, xs = np.nonzero(r.instances == i + 1)
        bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if len(xs) else [0, 0, 0, 0]
        objs.append({"id": i + 1, **o, "bbox": bbox, "area": int(len(xs))})
    return {**scene, "size": size, "objects": objs}


def parse_splits(text: str) -> list[tuple[str, float]]:
    from ..errors import UserError

    try:
        fr = [float(t) for t in text.split(",")]
    except ValueError:
        raise UserError(f"--splits must be comma-separated fractions like 0.8,0.1,0.1, got {text!r}") from None
    if not 1 <= len(fr) <= 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise UserError(f"--splits needs 1 to 3 non-negative fractions summing to 1 (train,val,test), got {text!r}")
    return [(name, f) for name, f in zip(("train", "val", "test"), fr)]


def split_counts(n: int, splits: list[tuple[str, float]]) -> list[tuple[str, int]]:
    counts = [int(round(n * f)) for _, f in splits]
    counts[-1] = n - sum(counts[:-1])
    if counts[-1] < 0:
        counts[-2] += counts[-1]
        counts[-1] = 0
    return [(name, c) for (name, _), c in zip(splits, counts) if c > 0]


def make_example(index: int, seed: int, size: int) -> dict:
    """Everything for one image, deterministic in (seed, index); no file I/O."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng)
    r = render(scene, size)
    rec = scene_record(scene, r, size)
    stem = f"{index:06d}"
    out = {"stem": stem, "scene": rec, "render": r, "caption": caption(scene, rng),
           "phrases": [phrase(o) for o in scene["objects"]], "questions": questions(scene, rng),
           "referring": [], "edit": None}
    objs = scene["objects"]
    order = rng.permutation(len(objs))
    for i in order[:2]:
        expr = referring_expression(objs, int(i))
        if expr is not None:
            out["referring"].append((expr, int(i) + 1))
    ed = sample_edit(scene, rng)
    if ed is not None:
        tscene, instr, info = ed
        tr = render(tscene, size)
        out["edit"] = {"scene": scene_record(tscene, tr, size), "render": tr, "instruction": instr, "info": info}
    return out


def write_split(root: Path, split: str, indices: Iterable[int], seed: int, size: int,
                advance=None) -> dict[str, int]:
    """Write one split's images, masks, scenes and the five JSON lists. Returns counts."""
    d = Path(root) / split
    lists: dict[str, list] = {k: [] for k in ("pairs", "instruct", "referring", "edits", "objects")}
    for index in indices:
        ex = make_example(index, seed, size)
        s = ex["stem"]
        img, inst = f"images/{s}.png", f"instances/{s}.png"
        scn = f"scenes/{s}.json"
        atomic_write_bytes(d / img, png_bytes(ex["render"].image))
        atomic_write_bytes(d / inst, png_bytes(ex["render"].instances))
        atomic_write_json(d / scn, ex["scene"], indent=None)
        lists["pairs"].append({"image": img, "caption": ex["caption"], "phrases": ex["phrases"],
                               "instances": inst, "scene": scn})
        lists["objects"].append({"image": img, "instances": inst, "scene": scn})
        for q, (qtype, question, answer) in enumerate(ex["questions"]):
            lists["instruct"].append({"id": f"{s}_q{q}", "image": img, "type": qtype, "conversations": [
                {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
        for k, (expr, oid) in enumerate(ex["referring"]):
            m = f"referring/{s}_{k}.png"
            atomic_write_bytes(d / m, png_bytes(np.where(ex["render"].instances == oid, 255, 0).astype(np.uint8)))
            lists["referring"].append({"image": img, "expression": expr, "mask": m, "object": oid, "scene": scn})
        if ex["edit"] is not None:
            e = ex["edit"]
            tgt, tscn = f"edits/{s}_0.png", f"edits/{s}_0.json"
            atomic_write_bytes(d / tgt, png_bytes(e["render"].image))
            atomic_write_json(d / tscn, e["scene"], indent=None)
            lists["edits"].append({"source": img, "target": tgt, "instruction": e["instruction"],
                                   "source_scene": scn, "target_scene": tscn, "edit": e["info"]})
        if advance is not None:
            advance()
    for k, v in lists.items():
        atomic_write_json(d / f"{k}.json", v, indent=None)
    return {k: len(v) for k, v in lists.items()}


def generate(out: str | Path, n: int = 1000, size: int = 64, seed: int = 0,
             splits: str | list[tuple[str, float]] = "0.8,0.1,0.1", progress: bool = False) -> dict:
    """Generate the world into `out`/{train,val,test}/. Returns a summary dict (also
    written as `out`/dataset.json). Image i is a function of (seed, i) alone."""
    from ..errors import UserError

    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    if size < 32:
        raise UserError(f"--size must be at least 32 pixels, got {size}")
    sp = parse_splits(splits) if isinstance(splits, str) else splits
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root} exists and is not a directory")
    ensure_dir(root)  # before rendering: an unwritable --out fails at once
    counts = split_counts(n, sp)
    summary = {"generator": "setok data shapes", "version": 1, "n": n, "size": size, "seed": seed,
               "colors": COLORS, "shapes": list(SHAPES), "splits": {}}
    start = 0
    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                       TimeRemainingColumn(), transient=True)
        bar.start()
    try:
        for name, c in counts:
            adv = None
            if bar is not None:
                task = bar.add_task(name, total=c)
                adv = lambda t=task: bar.advance(t)  # noqa: E731
            summary["splits"][name] = write_split(root, name, range(start, start + c), seed, size, adv)
            start += c
    finally:
        if bar is not None:
            bar.stop()
    atomic_write_json(root / "dataset.json", summary)
    return summary


REFERRING_KEYS = ("shape", "color")


def _world_pairs(split: str | Path, keys: tuple[str, ...]) -> tuple[Path, list[tuple[dict, list[dict]]]]:
    """A written split -> (its folder, [(pairs entry, its scene's objects)]), each entry
    checked for `keys`; a folder that is not a shapes-world split is one UserError line."""
    from ..errors import UserError
    from .formats import load
    d = Path(split)
    if not (d / "pairs.json").is_file():
        raise UserError(f"{d}: no pairs.json (a split folder written by `setok data shapes`)")
    out = []
    for e in load(d / "pairs.json", "pairs"):
        if any(k not in e for k in keys):
            raise UserError(f"{d / 'pairs.json'}: entries need {' and '.join(repr(k) for k in keys)} "
                            "(a shapes-world split)")
        out.append((e, json.loads(Path(e["scene"]).read_text())["objects"]))
    return d, out


def referring_by(split: str | Path, by: str = "shape") -> tuple[Path, int]:
    """A written split -> `referring_<by>.json` (SPEC referring entries) beside its other
    files: in every image of two or more objects, each object whose `by` alone is unique
    ("the hexagon", "the red object") with its mask (`referring_<by>/<stem>_<id>.png`).
    The world's own referring.json names an object by its shape alone only where its colour
    is shared (510 of 3,679 training expressions); this names every object that its shape
    singles out. Returns (path, number of expressions)."""
    from ..errors import UserError
    if by not in REFERRING_KEYS:
        raise UserError(f"--by must be one of {', '.join(REFERRING_KEYS)}, got {by!r}")
    d, entries = _world_pairs(split, ("scene", "instances"))
    from PIL import Image
    out: list[dict] = []
    for e, objs in entries:
        if len(objs) < 2:
            continue
        with Image.open(e["instances"]) as im:
            inst = np.asarray(im)
        stem = Path(e["image"]).stem
        for o in objs:
            if sum(q[by] == o[by] for q in objs) != 1 or not (inst == o["id"]).any():
                continue
            m = f"referring_{by}/{stem}_{o['id']}.png"
            atomic_write_bytes(d / m, png_bytes(np.where(inst == o["id"], 255, 0).astype(np.uint8)))
            expr = f"the {o['shape']}" if by == "shape" else f"the {o['color']} object"
            out.append({"image": Path(e["image"]).relative_to(d.resolve()).as_posix(), "expression": expr, "mask": m,
                        "object": o["id"], "scene": Path(e["scene"]).relative_to(d.resolve()).as_posix()})
    path = d / f"referring_{by}.json"
    atomic_write_json(path, out, indent=None)
    return path, len(out)


def describe_by(split: str | Path, by: str = "shape") -> tuple[Path, int]:
    """A written split -> `describe_<by>.json` beside its other files: SPEC instruct entries
    (type "describe"), one per image, "<image>\\nList the objects by shape." answered by
    `describe_by_shape`. A stage-II set: the world's captions name each object colour first,
    so writing them trains the LM to find an object by its colour and never by its shape.
    Returns (path, number of entries)."""
    from ..errors import UserError
    if by != "shape":
        raise UserError(f"--by must be shape, got {by!r}")
    d, entries = _world_pairs(split, ("scene",))
    out: list[dict] = []
    for e, objs in entries:
        image = Path(e["image"]).relative_to(d.resolve()).as_posix()
        conv = [{"from": "human", "value": f"<image>\n{DESCRIBE_BY_SHAPE}"},
                {"from": "gpt", "value": describe_by_shape(objs)}]
        out.append({"id": f"{Path(e['image']).stem}_describe_{by}", "image": image, "type": "describe",
                    "conversations": conv})
    path = d / f"describe_{by}.json"
    atomic_write_json(path, out, indent=None)
    return path, len(out)


def questions_all(split: str | Path, seed: int = 0, types: tuple[str, ...] = (), absent: int = 1) -> tuple[Path, int]:
    """A written split -> `instruct_all.json` beside its other files: SPEC instruct entries,
    every question `all_questions` finds for each image (the world's instruct.json keeps one
    per type, 4-5 an image), ids `<stem>_a<k>`, shuffled per image by (seed, image number).
    A stage-III set: ~5.5x the questions of instruct.json on the same images, so the lookups
    (an object found by its shape, colour or place) are not learnt off a few thousand
    repeated questions. `types` (e.g. ("count", "relation")): only those kinds, written to
    `instruct_count_relation.json` instead (kinds in QUESTION_TYPES order), a mixture row that
    adds them alone. `absent`: count questions about that many absent colours and as many
    absent shapes per image (answer 0; 1 by default), written to `..._absent<N>.json`.
    Returns (path, number of entries)."""
    from ..errors import UserError
    bad = sorted(set(types) - set(QUESTION_TYPES))
    if bad:
        raise UserError(f"unknown question type {bad[0]!r}: choose from {', '.join(QUESTION_TYPES)}")
    if isinstance(absent, bool) or not isinstance(absent, int) or absent < 0:
        raise UserError(f"absent must be an integer >= 0, got {absent!r}")
    d, entries = _world_pairs(split, ("scene",))
    out: list[dict] = []
    for i, (e, objs) in enumerate(entries):
        image = Path(e["image"]).relative_to(d.resolve()).as_posix()
        stem = Path(e["image"]).stem
        rng = np.random.default_rng([seed, int(stem) if stem.isdigit() else i])
        for k, (kind, q, a) in enumerate(all_questions({"objects": objs}, rng, absent)):
            if types and kind not in types:
                continue
            out.append({"id": f"{stem}_a{k}", "image": image, "type": kind,
                        "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]})
    path = d / ("instruct_" + ("_".join(t for t in QUESTION_TYPES if t in types) if types else "all")
                + (f"_absent{absent}" if absent != 1 else "") + ".json")
    atomic_write_json(path, out, indent=None)
    return path, len(out)


def explain_answers(path: str | Path, kinds: tuple[str, ...] = EXPLAINED_KINDS,
                    out: str | Path | None = None) -> tuple[Path, int]:
    """An instruct file of a written split (beside its pairs.json) -> `<name>_explained.json`
    beside it: the same entries, single- and multi-turn, with each answer to a relation
    question stating both objects' places first ("the red circle at 2, the blue square at 5:
    yes") and each count by colour or shape listing the objects counted ("a red circle, a red
    star: 2") and each existence question the objects of its colour ("a red star, a red circle:
    yes") and each colour question the objects in reading order up to the asked one ("a red
    circle, a blue hexagon: blue"), found from the scene; only the question kinds in `kinds`.
    A stage-III set in which each step is one lookup and one place, or one comparison. `out`:
    where to write instead.
    Returns (path, number of answers explained)."""
    from ..errors import UserError
    known = EXPLAINED_KINDS + EXPLAINED_OPTIONAL
    bad = sorted(set(kinds) - set(known))
    if bad or not kinds:
        raise UserError(f"unknown kind {bad[0]!r}: choose from {', '.join(known)}" if bad else
                        f"no kinds: choose from {', '.join(known)}")
    for group in EXPLAINED_EXCLUSIVE:
        both = [k for k in group if k in kinds]
        if len(both) > 1:
            raise UserError(f"kinds {' and '.join(both)} explain the same questions: choose one")
    src = Path(path)
    if not src.is_file():
        raise UserError(f"{src}: no such file (an instruct file of a `setok data shapes` split)")
    from .formats import read_json_list
    entries = read_json_list(src)                                  # one line for a file that is no JSON list
    d, pairs = _world_pairs(src.parent, ("scene",))
    scenes = {str(Path(e["image"]).resolve()): objs for e, objs in pairs}
    n = 0
    for e in entries:
        turns = (e.get("conversations") or []) if isinstance(e, dict) else []
        for ask, ans in zip(turns, turns[1:]):
            if ask.get("from") != "human" or ans.get("from") != "gpt":
                continue
            objs = scenes.get(str((d / str(e.get("image"))).resolve()))
            if objs is None:
                raise UserError(f"{src}: entry {e.get('id')!r}: {e.get('image')} is not an image of {d / 'pairs.json'}")
            q = ask.get("value", "").replace("<image>", "").strip()
            try:
                said = explained_answer(q, ans.get("value"), objs, kinds)
            except ValueError:
                raise UserError(f"{src}: entry {e.get('id')!r}: {q!r} is not answered as its scene "
                                "answers it") from None
            if said is not None:
                ans["value"], n = said, n + 1
    out = Path(out) if out else src.with_name(src.stem + "_explained.json")
    atomic_write_json(out, entries, indent=None)
    return out, n


def edits_all(split: str | Path, per_image: int = 3, seed: int = 0, advance=None) -> tuple[Path, int]:
    """A written split -> `edits_all.json` beside its other files: the world's edits.json
    plus `per_image` more edits of every image (`sample_edit` with rng (seed, image number,
    k); targets `edits/<stem>_<k>.png` and `.json`, k >= 1), re-rendered from each image's
    scene graph. A stage-II set: the world writes one edit per image, so each kind of edit
    (recolour, move, add, remove) is seen off a few hundred examples. Returns (path, number)."""
    from ..errors import UserError
    if per_image < 1:
        raise UserError(f"--per-image must be at least 1, got {per_image}")
    d, entries = _world_pairs(split, ("scene",))
    own = d / "edits.json"
    out: list[dict] = json.loads(own.read_text()) if own.is_file() else []
    for i, (e, objs) in enumerate(entries):
        rec = json.loads(Path(e["scene"]).read_text())
        scene = {"version": rec.get("version", 1), "background": rec["background"],
                 "objects": [{k: o[k] for k in ("shape", "color", "center", "size")} for o in objs]}
        size = int(rec.get("size", 64))
        stem = Path(e["image"]).stem
        rng = np.random.default_rng([seed, int(stem) if stem.isdigit() else i, 7])
        for k in range(1, per_image + 1):
            ed = sample_edit(scene, rng)
            if ed is None:
                continue
            tscene, instr, info = ed
            tr = render(tscene, size)
            tgt, tscn = f"edits/{stem}_{k}.png", f"edits/{stem}_{k}.json"
            atomic_write_bytes(d / tgt, png_bytes(tr.image))
            atomic_write_json(d / tscn, scene_record(tscene, tr, size), indent=None)
            out.append({"source": Path(e["image"]).relative_to(d.resolve()).as_posix(), "target": tgt,
                        "instruction": instr, "source_scene": Path(e["scene"]).relative_to(d.resolve()).as_posix(),
                        "target_scene": tscn, "edit": info})
        if advance is not None:
            advance()
    path = d / "edits_all.json"
    atomic_write_json(path, out, indent=None)
    return path, len(out)


def captions_reading(split: str | Path, rows: int = 16) -> tuple[Path, int]:
    """A written split -> `pairs_reading.json` beside its other files: pairs.json with each
    caption's list in reading order (`caption_in_reading_order`), every other field as it was.
    Setokim writes an image's tokens by seed position in raster order, and the world's
    captions list their objects in the order the scene drew them, so token k of a target is
    any of the caption's objects and the MSE head regresses their mean colour; in reading
    order, the k-th phrase is (mostly) the k-th token. Returns (path, number of entries)."""
    from ..errors import UserError
    if rows < 1:
        raise UserError(f"--rows must be at least 1, got {rows}")
    d, entries = _world_pairs(split, ("scene",))
    out = [{**e, "caption": caption_in_reading_order(e["caption"], objs, rows)}
           | ({"phrases": [phrase(o) for o in reading_order(objs, rows)]} if "phrases" in e else {})
           for e, objs in entries]
    for e in out:
        for k in ("image", "scene", "instances"):
            if k in e:
                e[k] = Path(e[k]).relative_to(d.resolve()).as_posix()
    path = d / "pairs_reading.json"
    atomic_write_json(path, out, indent=None)
    return path, len(out)
