"""One function per `setok eval` task: read a SPEC data file (and a prediction file),
return a flat dict of metrics. Every function is usable from Python.

Prediction files are JSON lists; paths inside are relative to the prediction file. An
entry names the data entry it answers either by `"index"` (position in the data list;
for vqa, in the list of questions, which is the same for single-turn entries) or by the
keys below; data entries without a prediction count as wrong and are reported as
`missing`; predictions for entries not in the data are ignored.

    vqa       {"question_id": id, "answer": str}   id = the instruct entry's "id" (its
              index when it has none); for multi-turn entries "<id>/<turn>" (turn 0, 1..)
    caption   {"image": path, "caption": str}       matched by image file name
    segment   {"image": path, "expression": str, "mask": png}   by (file name, expression)
    generate  {"caption" or "prompt": str, "image": png}        by caption text
    edit      {"source": path, "instruction": str, "image": png} by (file name, instruction)
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from ..data import formats
from ..data.shapes_text import final_answer
from ..errors import UserError
from ..files import load_ids
from . import metrics as M
from . import tokenizer_eval as _tokenizer_eval

TASKS = ("tokenizer", "vqa", "caption", "segment", "generate", "edit")


# ----------------------------------------------------------------------------- helpers

def load_image(path: str, mode: str = "RGB") -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode))
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def load_scene(path: str | None) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read scene {path}: {e}") from None


def read_predictions(path, required: dict[str, str], alternatives: dict[str, tuple[str, ...]] | None = None,
                     paths: tuple[str, ...] = (), match_keys: tuple[str, ...] = ()) -> list[dict]:
    """Validated prediction entries, path keys made absolute. `required` maps key ->
    description; `alternatives` maps a required key to other accepted names;
    `match_keys` only identify the data entry, so an entry with "index" may omit them."""
    if path is None:
        raise UserError("this task needs --pred JSON (the model's predictions)")
    p = Path(path)
    data = formats.read_json_list(p)
    base = p.resolve().parent
    out = []
    for i, e in enumerate(data):
        if not isinstance(e, dict):
            raise UserError(f"{p}: entry {i}: expected a JSON object, found {type(e).__name__}")
        e = dict(e)
        for key, desc in required.items():
            names = (key,) + (alternatives or {}).get(key, ())
            found = next((n for n in names if n in e), None)
            if found is None:
                if key in match_keys and "index" in e:
                    continue
                raise UserError(f"{p}: entry {i}: missing key '{key}' ({desc})")
            e[key] = e[found]
        if "index" in e and not (isinstance(e["index"], int) and not isinstance(e["index"], bool)):
            raise UserError(f"{p}: entry {i}: key 'index' must be an integer")
        for k in paths:
            if k in e:
                if not isinstance(e[k], str):
                    raise UserError(f"{p}: entry {i}: key '{k}' must be a path string")
                e[k] = str((base / e[k]).resolve())
        out.append(e)
    return out


def _align_by_image_and_text(pred, entries: list[dict], image: str, text: str, png: str,
                             descs: tuple[str, str, str]) -> list[dict | None]:
    """Predictions {image (file name) or "image_key", text, png} aligned to the data
    entries by (image file name, text); segment and edit are keyed this way."""
    preds = read_predictions(pred, {"image_key": descs[0], text: descs[1], png: descs[2]},
                             {"image_key": (image,)}, paths=(image, png), match_keys=("image_key", text))
    return _index(preds, [(_name(e[image]), e[text]) for e in entries], lambda p: (_name(p["image_key"]), p[text]))


def _index(preds: list[dict], keys: list, pred_key_of) -> list[dict | None]:
    """Align predictions to data entries (whose match keys are `keys`): by "index" or by
    `pred_key_of(prediction)`. Returns, per data entry, its prediction or None."""
    n = len(keys)
    by_key = {k: i for i, k in reversed(list(enumerate(keys)))}
    out: list[dict | None] = [None] * n
    for j, p in enumerate(preds):
        if "index" in p:
            i = p["index"]
            if not 0 <= i < n:
                raise UserError(f"--pred entry {j}: index {i} is outside the data (0..{n - 1})")
        else:
            i = by_key.get(pred_key_of(p))
            if i is None:
                continue  # a prediction for something not in --data: ignored
        out[i] = p
    return out


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _name(path: str) -> str:
    return Path(path).name


# ----------------------------------------------------------------------------- tokenizer

eval_tokenizer, _np = _tokenizer_eval.eval_tokenizer, _tokenizer_eval._np     # in their own module


# ----------------------------------------------------------------------------- vqa

def vqa_questions(entries: list[dict]) -> list[dict]:
    """Flatten instruct entries into questions {"id", "type", "question", "answer"}."""
    qs = []
    for i, e in enumerate(entries):
        conv = e["conversations"]
        turns = [(conv[t]["value"], conv[t + 1]["value"]) for t in range(len(conv) - 1)
                 if conv[t]["from"] == "human" and conv[t + 1]["from"] == "gpt"]
        base = str(e.get("id", i))
        for t, (q, a) in enumerate(turns):
            qs.append({"id": base if len(turns) == 1 else f"{base}/{t}", "type": e.get("type", "all"),
                       "question": q.replace("<image>", "").strip(), "answer": a, "entry": i})
    return qs


def eval_vqa(data: str, pred: str, limit: Optional[int] = None, tally=None) -> dict:
    """Exact match of `final_answer`s after `normalize_answer`, overall and per question type.
    `tally` (`compare.Tally`): filled per question."""
    entries = list(formats.load(data, "instruct", check_files=False))[:limit]
    qs = vqa_questions(entries)
    preds = read_predictions(pred, {"question_id": "the instruct entry's id", "answer": "the model's answer"},
                             {"question_id": ("id",)}, match_keys=("question_id",))
    by_id = {}
    for j, p in enumerate(preds):
        if "question_id" in p:
            by_id[str(p["question_id"])] = p["answer"]
        else:
            i = p["index"]
            if not 0 <= i < len(qs):
                raise UserError(f"--pred entry {j}: index {i} is outside the questions (0..{len(qs) - 1})")
            by_id[qs[i]["id"]] = p["answer"]
    per_type: dict[str, list[bool]] = defaultdict(list)
    missing = 0
    for j, q in enumerate(qs):
        a = by_id.get(q["id"])
        missing += a is None
        per_type[q["type"]].append(a is not None and M.exact_match(final_answer(str(a)), final_answer(q["answer"])))
        if tally is not None:
            tally.add("accuracy", j, per_type[q["type"]][-1])
            tally.add(f"accuracy/{q['type']}", j, per_type[q["type"]][-1])
    if tally is not None:
        tally.n = len(qs)
    allc = [c for v in per_type.values() for c in v]
    out = {"task": "vqa", "data": str(data), "questions": len(qs), "missing": missing,
           "accuracy": float(np.mean(allc)) if allc else None}
    for t in sorted(per_type):
        out[f"accuracy/{t}"] = float(np.mean(per_type[t]))
    return out


# ----------------------------------------------------------------------------- caption

def _truth_objects(entry: dict, scene_key: str = "scene", caption_key: str = "caption") -> list[dict]:
    """Objects of an entry: its scene graph, else the facts of its reference caption."""
    scene = load_scene(entry.get(scene_key))
    if scene is not None:
        return scene["objects"]
    facts = M.caption_facts(entry[caption_key])
    counted = {(c, s): k for c, s, *k in [f for f in facts["counts"] if f[0] != "total"] for k in k}
    objs = []
    for c, s in sorted(facts["objects"]):
        objs += [{"color": c, "shape": s}] * counted.get((c, s), 1)
    return objs


def eval_caption(data: str, pred: str, limit: Optional[int] = None, tally=None) -> dict:
    """Recall and precision of scene facts (objects, colours, shapes, counts) stated in
    the captions, micro-averaged over the data set, per fact type and overall. `tally`
    (`compare.Tally`): filled per caption."""
    entries = list(formats.load(data, "pairs", check_files=False))[:limit]
    preds = read_predictions(pred, {"image_key": "the image the caption is for", "caption": "the caption"},
                             {"image_key": ("image",)}, paths=("image",), match_keys=("image_key",))
    aligned = _index(preds, [_name(e["image"]) for e in entries], lambda p: _name(p["image_key"]))
    tot = defaultdict(lambda: np.zeros(3, np.int64))
    missing = 0
    for j, (e, p) in enumerate(zip(entries, aligned)):
        truth = M.scene_facts(_truth_objects(e))
        missing += p is None
        stated = M.caption_facts(p["caption"]) if p is not None else {}
        for k, (hit, said, true) in M.fact_scores(stated, truth).items():
            tot[k] += (hit, said, true)
            for m in (("", f"/{k}") if tally is not None else ()):
                tally.add(f"recall{m}", j, hit, true)
                tally.add(f"precision{m}", j, hit, said)
    if tally is not None:
        tally.n = len(entries)
    out = {"task": "caption", "data": str(data), "captions": len(entries), "missing": missing}
    allv = sum(tot.values())
    out["recall"] = float(allv[0] / allv[2]) if allv[2] else None
    out["precision"] = float(allv[0] / allv[1]) if allv[1] else None
    for k, (hit, stated, true) in sorted(tot.items()):
        out[f"recall/{k}"] = float(hit / true) if true else None
        out[f"precision/{k}"] = float(hit / stated) if stated else None
    return out


# ----------------------------------------------------------------------------- segment

def _binary(mask: np.ndarray) -> np.ndarray:
    return mask > (127 if mask.max() > 1 else 0)


def _resize_nearest(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if a.shape[:2] == tuple(shape):
        return a
    ys = np.minimum((np.arange(shape[0]) + 0.5) * a.shape[0] / shape[0], a.shape[0] - 1).astype(int)
    xs = np.minimum((np.arange(shape[1]) + 0.5) * a.shape[1] / shape[1], a.shape[1] - 1).astype(int)
    return a[ys][:, xs]


def eval_segment(data: str, pred: str, limit: Optional[int] = None, tally=None) -> dict:
    """mIoU (mean of per-expression IoU), cIoU (total intersection / total union) and
    precision at IoU 0.5. Predicted masks: PNG, foreground = value > 127 (or > 0 for a
    0/1 mask), resized to the reference mask by nearest neighbour if needed. `tally`
    (`compare.Tally`): filled per expression."""
    entries = list(formats.load(data, "referring", check_files=False))[:limit]
    aligned = _align_by_image_and_text(pred, entries, "image", "expression", "mask",
                                       ("the image", "the referring expression", "the predicted mask PNG"))
    ious, inter, union, missing = [], 0, 0, 0
    by_form: dict[str, list[float]] = defaultdict(list)
    for e, p in zip(entries, aligned):
        gt = _binary(load_ids(e["mask"]))
        if p is None:
            missing += 1
            pm = np.zeros_like(gt)
        else:
            pm = _resize_nearest(_binary(load_ids(p["mask"])), gt.shape)
        i, u = M.mask_stats(pm, gt)
        inter, union = inter + i, union + u
        ious.append(1.0 if u == 0 else i / u)
        by_form[expression_form(e["expression"])].append(ious[-1])
        if tally is not None:
            j = len(ious) - 1
            tally.add("miou", j, ious[-1])
            tally.add("ciou", j, i, u)
            tally.add("precision@0.5", j, ious[-1] >= 0.5)
    if tally is not None:
        tally.n = len(entries)
    out = {"task": "segment", "data": str(data), "expressions": len(entries), "missing": missing,
           "miou": _mean(ious), "ciou": inter / union if union else None,
           "precision@0.5": float(np.mean([x >= 0.5 for x in ious])) if ious else None}
    if set(by_form) != {"other"}:          # the shapes world's expressions: mIoU and count per form
        for form in sorted(by_form):
            out[f"miou/{form}"] = _mean(by_form[form])
            out[f"expressions/{form}"] = len(by_form[form])
    return out


def expression_form(expression: str) -> str:
    """How a shapes-world expression singles its object out: "shape" ("the hexagon"),
    "color" ("the red object"), "color+shape" ("the red hexagon"), "position" ("the leftmost
    red hexagon"); "other" for any other text."""
    from ..data.shapes_world import COLOR_NAMES, SHAPES
    w = expression.lower().strip().rstrip(".").split()
    w = w[1:] if w[:1] == ["the"] else w
    if len(w) == 3 and w[0] in ("leftmost", "rightmost", "topmost", "bottommost") and w[1] in COLOR_NAMES \
            and w[2] in SHAPES:
        return "position"
    if len(w) == 2 and w[0] in COLOR_NAMES and w[1] == "object":
        return "color"
    if len(w) == 2 and w[0] in COLOR_NAMES and w[1] in SHAPES:
        return "color+shape"
    if len(w) == 1 and w[0] in SHAPES:
        return "shape"
    return "other"


# ----------------------------------------------------------------------------- generate / edit

def _norm_text(s: str) -> str:
    return " ".join(str(s).lower().split())


def eval_generate(data: str, pred: str, limit: Optional[int] = None, tally=None) -> dict:
    """Scene-parse accuracy of generated images against their captions: the parser's
    objects are matched one to one with the caption's (colour, shape) objects (positions
    are not in a caption, so not scored). object_recall = matched / true objects,
    object_precision = matched / parsed objects, count_accuracy = the parsed count is
    right, scene_accuracy = all objects right and nothing extra. `tally` (`compare.Tally`):
    filled per image."""
    entries = list(formats.load(data, "pairs", check_files=False))[:limit]
    preds = read_predictions(pred, {"caption": "the prompt", "image": "the generated PNG"},
                             {"caption": ("prompt",)}, paths=("image",), match_keys=("caption",))
    aligned = _index(preds, [_norm_text(e["caption"]) for e in entries], lambda p: _norm_text(p["caption"]))
    return _score_images(entries, aligned, lambda e: _truth_objects(e), None, "generate", data, tally=tally)


def _score_images(entries, aligned, truth_of, pos_tol, task, data, extra=None, tally=None) -> dict:
    from ..data.scene_parser import match_objects, parse_scene

    correct = n_gt = n_pred = 0
    exact, counts, missing = [], [], 0
    for idx, (e, p) in enumerate(zip(entries, aligned)):
        gt = truth_of(e)
        if p is None:
            missing += 1
            parsed = []
        else:
            parsed = parse_scene(load_image(p["image"]))
        m = match_objects(parsed, gt, pos_tol)
        correct, n_gt, n_pred = correct + m["correct"], n_gt + m["n_gt"], n_pred + m["n_pred"]
        exact.append(m["correct"] == m["n_gt"] == m["n_pred"])
        counts.append(m["n_pred"] == m["n_gt"])
        if tally is not None:
            tally.add("scene_accuracy", idx, exact[-1])
            tally.add("object_recall", idx, m["correct"], m["n_gt"])
            tally.add("object_precision", idx, m["correct"], m["n_pred"])
            tally.add("count_accuracy", idx, counts[-1])
        if extra is not None:
            extra(idx, e, p, parsed, gt, m)
    if tally is not None:
        tally.n = len(entries)
    return {"task": task, "data": str(data), "images": len(entries), "missing": missing,
            "scene_accuracy": float(np.mean(exact)) if exact else None,
            "object_recall": correct / n_gt if n_gt else None,
            "object_precision": correct / n_pred if n_pred else None,
            "count_accuracy": float(np.mean(counts)) if counts else None}


def eval_edit(data: str, pred: str, pos_tol: float = 0.1, limit: Optional[int] = None, tally=None) -> dict:
    """Edited images against their targets: scene-parse accuracy with positions (centres
    within `pos_tol` of the image side), L1 to the target image (mean absolute difference
    in [0, 1]) and preservation (the fraction of objects the edit should leave untouched,
    per the entry's "edit.preserved" target ids, that are found unchanged). Entries whose
    "edit" names its `op` (the shapes world's) are also scored per op (`metrics.edit_applied`):
    `applied/{op}` (`applied`: over all), the share whose edit shows, `kept/{op}`, `images/{op}`.
    `tally` (`compare.Tally`): filled per edit."""
    from ..data.scene_parser import parse_scene

    entries = list(formats.load(data, "edits", check_files=False))[:limit]
    aligned = _align_by_image_and_text(pred, entries, "source", "instruction", "image",
                                       ("the source image", "the instruction", "the edited PNG"))
    l1s, kept, keep_total = [], 0, 0
    per_op: dict[str, list] = defaultdict(lambda: [0, 0, 0, 0])      # op -> [images, applied, kept, to keep]

    def truth(e):
        scene = load_scene(e.get("target_scene"))
        return scene["objects"] if scene is not None else parse_scene(load_image(e["target"]))

    def extra(i, e, p, parsed, gt, m):
        nonlocal kept, keep_total
        target = load_image(e["target"])
        if p is not None:
            out = load_image(p["image"])
            if out.shape != target.shape:
                from PIL import Image

                out = np.asarray(Image.fromarray(out).resize(target.shape[1::-1], Image.BILINEAR))
            l1s.append(M.l1(out, target))
        else:
            l1s.append(1.0)
        ed = e.get("edit") or {}
        hit, preserved = {j for _, j in m["pairs"]}, ed.get("preserved")
        k = sum((pid - 1) in hit for pid in preserved or [])
        kept, keep_total = kept + k, keep_total + len(preserved or [])
        scene = load_scene(e.get("source_scene")) if ed.get("op") == "remove" else None
        gone = [o for o in (scene or {}).get("objects", []) if o.get("id") == ed.get("object")] or None
        applied = M.edit_applied(ed, gt, hit, parsed, gone, pos_tol)
        if applied is not None:
            row = per_op[ed["op"]]
            row[:] = [row[0] + 1, row[1] + applied, row[2] + k, row[3] + len(preserved)]
        if tally is not None:
            tally.add("l1", i, l1s[-1])
            tally.add("preservation", i, k, len(preserved or []))
            if applied is not None:
                for m_ in ("applied", f"applied/{ed['op']}"):
                    tally.add(m_, i, applied)
                tally.add(f"kept/{ed['op']}", i, k, len(preserved))

    out = _score_images(entries, aligned, truth, pos_tol, "edit", data, extra, tally=tally)
    out["l1"] = _mean(l1s)
    out["preservation"] = kept / keep_total if keep_total else None
    if per_op:            # "edits right": a copy of the source keeps every object and applies none
        out["applied"] = sum(r[1] for r in per_op.values()) / sum(r[0] for r in per_op.values())
    for op, (n, ok, k, kt) in sorted(per_op.items()):
        out.update({f"applied/{op}": ok / n, f"kept/{op}": k / kt if kt else None, f"images/{op}": n})
    return out
