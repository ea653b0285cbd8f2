"""Edits as token diffs (not in the paper; the stage-III task `edit_diff` and `setok edit --diff`).

An edit of the shapes world changes one object: it removes one, adds one, recolours or moves
one, and keeps the rest. Written as a whole image (the paper's way, task `edit`), the tiny
Setokim copies its source token for token, including the object it should change (README,
"Are the edits done?"): nothing in its training ties the instruction to one token. Written as
a diff, the answer names that token, as a segmentation answer does, and writes its new form:

    USER: <image>\\n{instruction} Segment the object.
    ASSISTANT: Remove <image>                 old: the source's token of the object
               Add at X Y <image>             new: the target's token of the added object
               Make <image> to <image>        old, new (a recolouring)
               Move <image> to X Y <image>    old, new (a move)

(each `<image>` one visual token; the first word is the instruction's own; every word is in
the tiny vocabulary). With `names` (the mixture row's `names: true`) the answer first copies
the instruction's words for each token: "Remove yellow triangle <image>", "Add red circle at X
Y <image>", "Make cyan object <image> to pink <image>" (the referring expression without "the",
an added object's colour and shape, a recolouring's new colour), so that each token is looked
up by the words just written, as a segmentation answer is by its expression (README: "Names
before tokens").
X Y is where the new object's centre lies, its column and row in PLACE_BINS bins (0: left /
top), written in words as Shikra writes coordinates: the instruction says "at the right", and a
word is what the LM learns to write best; the place head, asked for one of 256 seed cells, drew
the right one for 4 in 52 val additions (README). Training
targets (`diff_tokens`): old is the source token holding most of the object's pixels (the
world's instance map), new the target token holding most of the edited or added object's
pixels (the target scene rendered again), both in generation order, with their seeds for a
place head. At inference (`apply_diff`) the written old token picks the nearest source token,
which is dropped, the new token is appended, and every other source token is copied exactly,
so `--keep-pixels` pastes their pixels back. With a bank, `snap_new` takes the new token from
the bank: near the written place (a move or an addition), or over the old token's region (a
recolouring).

Shapes: source tokens (K, T); old, new (T,) or None; instance maps (H, W) int.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ...data.conversations import world_files
from ...data.shapes_text import phrase, referring_expression
from ...errors import UserError
from .attend import object_tokens

__all__ = ["DIFF_PROMPT", "DIFF_OPS", "PLACE_BINS", "diff_conversation", "diff_spec", "object_token", "diff_tokens",
           "parse_diff", "written_place", "apply_diff", "snap_new", "diff_samples", "referred_object"]

DIFF_PROMPT = "<image>\n{instruction} Segment the object."
# op -> (answer word, writes old, writes new)
DIFF_OPS = {"remove": ("Remove", True, False), "add": ("Add", False, True),
            "recolor": ("Make", True, True), "move": ("Move", True, True)}
PLACED = ("add", "move")       # the ops whose answer writes the new object's place
PLACE_BINS = 7                 # bins per side of a written place (as `setok data explain` bins places)
NEAR = 0.07                    # a placed new token's bank region centre within this of the written place (val)
SAME_REGION = 0.4              # a recoloured token's bank region's IoU with the old token's at least this (val)


def diff_conversation(entry: dict, spec: Optional[dict] = None, names: bool = False) -> tuple[list[dict], list[str]]:
    """An edits entry with its `edit` record and its two scenes (or its `diff_spec` already
    read) -> (conversation, [source, target]): the target image is read only for its tokens
    (the answer's new token). `names`: the instruction's words before each token (the mixture
    row's `names: true`)."""
    op = _op(entry)
    words = spec if spec is not None else _answer_words(op, *_changed(entry))
    where = (words["place"] + " ") if op in PLACED else ""
    old, new = ((f"{words[k]} " if names and words[k] else "") for k in ("old_name", "new_name"))
    answer = {"remove": f"{old}<image>", "add": f"{new}at {where}<image>", "recolor": f"{old}<image> to {new}<image>",
              "move": f"{old}<image> to {where}<image>"}[op]
    conv = [{"from": "human", "value": DIFF_PROMPT.format(instruction=entry["instruction"].strip())},
            {"from": "gpt", "value": f"{DIFF_OPS[op][0]} {answer}"}]
    return conv, [entry["source"], entry["target"]]


def _answer_words(op: str, s_objs: list[dict], t_objs: list[dict], obj: int) -> dict:
    """The words a diff answer writes before its tokens, copied from what the instruction says:
    the changed object's referring expression without "the" (`old_name`: "yellow triangle",
    "green object", "leftmost red circle"; None for an addition), the added object's colour and
    shape or a recolouring's new colour (`new_name`; None otherwise), and the new `place`
    (`place_words`; None unless an addition or a move)."""
    i = next((k for k, o in enumerate(s_objs) if o["id"] == obj), None)
    t = next((o for o in t_objs if o["id"] == obj), None)
    old = None
    if op != "add":
        old = (referring_expression(s_objs, i) or f"the {phrase(s_objs[i])}").removeprefix("the ")
    new = {"add": phrase(t) if t else None, "recolor": t["color"] if t else None}.get(op)
    return {"old_name": old, "new_name": new, "place": place_words(t["center"]) if op in PLACED else None}


def place_words(center) -> str:
    """An object's centre (x, y) in [0, 1] -> "X Y", its column and row in PLACE_BINS bins."""
    return " ".join(str(min(max(int(float(c) * PLACE_BINS), 0), PLACE_BINS - 1)) for c in center[:2])


def written_place(text: str) -> Optional[tuple[float, float]]:
    """A diff answer's text -> the centre (x, y) in [0, 1] of the bins it wrote ("Move <image>
    to 5 3 <image>": (0.786, 0.5)), or None where it wrote none (a recolouring, a removal, or a
    model trained without places)."""
    m = re.search(r"(?<!\S)(\d+) (\d+)(?!\S)", text)
    if m is None:
        return None
    b = [min(int(g), PLACE_BINS - 1) for g in m.groups()]
    return ((b[0] + 0.5) / PLACE_BINS, (b[1] + 0.5) / PLACE_BINS)


def _op(entry: dict) -> str:
    """An entry's edit op; one UserError line where it is not one of the shapes world's."""
    op = (entry.get("edit") or {}).get("op")
    if op not in DIFF_OPS:
        raise UserError(f"edit_diff needs edits of the shapes world (an 'edit' record with op in "
                        f"{', '.join(DIFF_OPS)}); entry {entry.get('source', '?')} has {op!r}")
    return op


def _changed(entry: dict) -> tuple[list[dict], list[dict], int]:
    """An edit's (source objects, target objects, the changed object's id: for an addition, the
    target's new one); one UserError line without the scenes."""
    if not (entry.get("source_scene") and entry.get("target_scene")):
        raise UserError(f"edit_diff needs the shapes world's scenes beside each edit (source_scene, "
                        f"target_scene); {entry.get('source', '?')} lacks them")
    s_objs = json.loads(Path(entry["source_scene"]).read_text())["objects"]
    t_objs = json.loads(Path(entry["target_scene"]).read_text())["objects"]
    obj = entry["edit"].get("object")
    if entry["edit"]["op"] == "add":
        known = {o["id"] for o in s_objs}
        obj = next(o["id"] for o in t_objs if o["id"] not in known)
    return s_objs, t_objs, obj


def diff_spec(entry: dict) -> dict:
    """What `diff_tokens` needs of an entry (paths as the data file resolved them): the op,
    the source's instance map, the target's scene and the instance ids (list index + 1) of the
    changed object in the source (`old`) and the target (`new`), and the answer's `place` words
    (`place_words`, an addition or a move); None where the op has none."""
    op = _op(entry)
    src, tgt = Path(entry["source"]), Path(entry["target"])
    _, inst = world_files(src)
    if not inst.is_file():
        raise UserError(f"edit_diff needs the shapes world's instance maps beside each edit ({inst}); "
                        f"{entry.get('source', '?')} lacks them")
    s_objs, t_objs, obj = _changed(entry)
    _, has_old, has_new = DIFF_OPS[op]
    pos = lambda objs: next(i + 1 for i, o in enumerate(objs) if o["id"] == obj)     # noqa: E731
    return {"op": op, "source_instances": str(inst),
            "target_scene": str(entry["target_scene"]), "old": pos(s_objs) if has_old else None,
            "new": pos(t_objs) if has_new else None, "key": f"{tgt.resolve()}",
            **_answer_words(op, s_objs, t_objs, obj)}


def object_token(model, out, i: int, instances: np.ndarray, inst: int) -> int:
    """Image i of a TokenizerOutput -> the index, in generation order, of the token holding
    most of instance `inst`'s pixels (ties: the first; `attend.object_tokens`)."""
    tokens = object_tokens(model, out, i, instances)
    return int(tokens[inst]) if inst < tokens.shape[0] else 0


def _per_image(model, images: list) -> list[tuple]:
    """uint8 images (tokenized here, as one batch) or each image's own SeTok output (a batch of
    one, `TokenizerOutput.light`) -> per image (output, row)."""
    from ..setok import TokenizerOutput
    if images and all(isinstance(x, TokenizerOutput) for x in images):
        return [(x, 0) for x in images]
    out = model.setok.tokenize(list(images))
    return [(out, i) for i in range(len(images))]


@torch.no_grad()
def diff_tokens(model, specs: list[dict], sources: list, targets: list) -> list[tuple]:
    """Per edit (spec, source and target images (S, S, 3) uint8, or their SeTok outputs of one
    image each) -> (old index into the source's token set or None, new index into the target's
    or None), both in generation order."""
    from PIL import Image

    from ...data.shapes_world import render
    src, tgt = _per_image(model, sources), _per_image(model, targets)
    res = []
    for sp, (out_s, i), (out_t, k) in zip(specs, src, tgt):
        old = new = None
        if sp["old"] is not None:
            with Image.open(sp["source_instances"]) as im:
                old = object_token(model, out_s, i, np.asarray(im), sp["old"])
        if sp["new"] is not None:
            scene = json.loads(Path(sp["target_scene"]).read_text())
            new = object_token(model, out_t, k, render(scene, int(scene.get("size", 64))).instances, sp["new"])
        res.append((old, new))
    return res


def referred_object(instruction: str) -> Optional[tuple[str, str]]:
    """An edit instruction -> (its answer's first word, the referring expression of the object
    it changes), or None where it names none (an addition) or is not of the forms a diff answer
    knows. English edit instructions put the object right after the verb: "Remove the red
    circle." -> ("Remove", "the red circle"); "Make the yellow triangle blue." -> ("Make", "the
    yellow triangle"): the last word is the new colour; "Move the cross to the left." -> ("Move",
    "the cross"): up to " to " (`setok edit --diff --lookup segment` segments that expression)."""
    words = instruction.strip().rstrip(".").split()
    if len(words) < 2:
        return None
    verb, rest = words[0].capitalize(), words[1:]
    if verb == "Remove":
        expr = rest
    elif verb == "Make" and len(rest) >= 2:
        expr = rest[:-1]
    elif verb == "Move" and "to" in rest[1:]:
        expr = rest[:rest.index("to", 1)]
    else:
        return None
    return verb, " ".join(expr)


def parse_diff(text: str, images: list[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """A diff answer's text and written images -> (old token, new token): the first word names
    the op; a missing image is None."""
    word = (text.split() or [""])[0]
    first = images[0][0] if images and images[0].shape[0] else None
    second = images[1][0] if len(images) > 1 and images[1].shape[0] else None
    if word == "Remove":
        return first, None
    if word == "Add":
        return None, first
    return first, second


def apply_diff(source: Tensor, old: Optional[Tensor], new: Optional[Tensor],
               norm=lambda t: t) -> tuple[Tensor, Optional[int]]:
    """source (K, T) + the written old and new tokens (T,) -> (the edited token set, the index
    of the source token dropped or None): the source token nearest to `old` (L2 after `norm`,
    the model's standardising) dropped, `new` appended; the others copied exactly."""
    keep = torch.ones(source.shape[0], dtype=torch.bool)
    dropped = None
    if old is not None and source.shape[0]:
        d = torch.cdist(norm(old.float()).view(1, -1), norm(source.float()))[0]
        dropped = int(d.argmin())
        keep[dropped] = False
    parts = [source[keep]] + ([new.view(1, -1).to(source.dtype)] if new is not None else [])
    return torch.cat(parts, 0), dropped


def snap_new(model, new: Tensor, layouts: Tensor, dropped: Optional[int], bank: Tensor,
             bank_layouts: Optional[Tensor], seed: Optional[Tensor] = None,
             place: Optional[tuple[float, float]] = None, recolour: bool = False, metric: str = "cos",
             max_overlap: float = 0.25, like: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """An edit diff's written new token (T,) -> (its bank token, that token's object cells (P,)
    bool: none without bank layouts). With layouts it is snapped as generation snaps
    (`bank.snap_placed`: apart from the source's kept objects), among the bank tokens whose
    region is centred within NEAR of the written `place` (x, y), or, for a recolouring, those
    whose region overlaps the dropped token's by SAME_REGION IoU (each where there are any),
    else over the cell of `seed` (1,) (the place head's drawn seed). like (T,): a move's old
    token; the bank token is then the one nearest the sum of both tokens' directions
    (standardised): the token most like both what the answer wrote and the object it moves
    (README: "The old token by its mask, ..., and a move that keeps its object").
    layouts (K, P) bool: the source tokens' regions; bank (M, T), bank_layouts (M, P)."""
    from .bank import OBJECT_SHARE, layout_cell, near_centre, nearest, same_region, snap_placed
    b = model.normalize(bank.to(new.device).float())
    x = model.normalize(new.float().view(1, -1))
    if like is not None:           # a move: like the moved object too (val: 31 -> 35 of 49 moves right)
        x = F.normalize(x, dim=-1) + F.normalize(model.normalize(like.float().view(1, -1)), dim=-1)
    if bank_layouts is None:
        return model.denormalize(nearest(x, b, metric=metric))[0], torch.zeros(layouts.shape[1], dtype=torch.bool)
    bl = bank_layouts.to(x.device).bool()
    kept = torch.ones(layouts.shape[0], dtype=torch.bool)
    if dropped is not None:
        kept[dropped] = False
    obj = layouts[kept] & (layouts[kept].float().mean(1, keepdim=True) <= OBJECT_SHARE)
    at = allowed = None
    if recolour and dropped is not None:
        allowed = same_region(bl, layouts[dropped:dropped + 1].to(x.device), SAME_REGION)
    elif place is not None:
        allowed = near_centre(bl, torch.tensor([place], device=x.device), NEAR)
    elif model.place_head is not None and seed is not None and seed.numel():
        at = layout_cell(seed.long().view(-1)[:1].to(x.device), model.place_head.cells)
    tok, placed = snap_placed(x, b, bl, obj.any(0, keepdim=True).to(x.device), max_overlap=max_overlap,
                              metric=metric, at=at, allowed=allowed)
    return model.denormalize(tok)[0], placed[0].cpu()


def diff_samples(model, batch: dict, samples: list[dict], cache: dict, outputs) -> None:
    """Stage II/III: each `edit_diff` row's sample images [source, target] (and their seeds) ->
    [source, its old token, the target's new token] as its answer writes them, in place.
    The token indices are computed once per edit (`cache`); `outputs(rows)` gives the SeTok
    output of each of those batch images (one image each: the stage model keeps them from
    computing its token sets, so no image is tokenized twice)."""
    specs = batch.get("edit_diff") or []
    first = [0] + torch.as_tensor(batch["image_counts"]).cumsum(0).tolist()[:-1]
    items = [(j, sp) for j, sp in enumerate(specs) if sp is not None]
    todo = [(j, sp) for j, sp in items if sp["key"] not in cache]
    if todo:
        got = diff_tokens(model, [sp for _, sp in todo], outputs([first[j] for j, _ in todo]),
                          outputs([first[j] + 1 for j, _ in todo]))
        cache.update({sp["key"]: t for (_, sp), t in zip(todo, got)})
    for j, sp in items:
        old, new = cache[sp["key"]]

        def pick(xs):
            return ([xs[0]] + ([xs[0][old:old + 1]] if old is not None else [])
                    + ([xs[1][new:new + 1]] if new is not None else []))
        samples[j]["images"] = pick(samples[j]["images"])
        if "seeds" in samples[j]:
            samples[j]["seeds"] = pick(samples[j]["seeds"])
