"""Answers that look first (not in the paper; the mixture row option `look` on instruct / chat rows:
`true` for every question type, or a list of types, where "count_by" names the counts of one colour or
shape only, "How many objects" left plain; recipes/tiny/stage3_look.yaml).

A question about the world names objects ("What color is the hexagon?"). Answered in one word,
the LM must find the hexagon among the image's tokens and read its colour in one step, a
lookup that stage III learns late or not at all depending on the seed (README: "The
minimal-pair chats at twice the weight"). Segmentation ("Segment the hexagon." -> `<image>`, one
token) learns the same lookup in every seed, because its answer is the token itself, trained
by the visual loss. A looking answer writes the tokens of the objects the question is about
first, then the answer, so the lookup is a segmentation answer and the answer reads the
tokens just written:

    What color is the hexagon?                 <image>: blue                the hexagon
    What shape is the blue object?             <image>: triangle            the blue objects
    How many circles are there?                <image> <image>: 2           the circles (all objects
                                                                            for "How many objects")
    Is there a red circle?                     <image> <image> a blue circle, a red circle: yes
                                                                            the objects of the asked shape
    Is the red circle left of the blue star?   <image> <image>: yes         the red circle, then the star
    (with `look_places`)                       <image> 1 <image> 4: yes     and each one's place on the axis
    (`look_places: chain`)                     <image> 1 <image> 4, 1 2 3 4: yes   and the places counted from
                                                                            the first toward the second
    How many circles are there? (`look_numbers`) <image> 1 <image> 2: 2     counted as they are written
    How many circles are there? (`look_scan`)  <image> star 0 <image> circle 1 <image> no 1 <image> circle 2: 2
                                                                            every token of the image, in
                                                                            order: the shapes it holds
                                                                            ("no": none), the running count

(each `<image>` one visual token: the source token holding most of the object's pixels, as an
edit diff's old token, `attend.object_tokens`; a turn about no object keeps its answer;
`setok ask` and `setok eval vqa` score the part after the last ": "). The tokens are written in
generation order, a relation's in the question's order. With `look_places` (a row option) a
relation's answer writes each object's centre along the compared axis after its token, in
`shapes_text.PLACE_BINS` bins (0: left / top), so the answer compares two words just written; `look_places: chain`
then counts from the first place toward where the second must lie, one bin a step, until the second place or the
last bin (`drills.relation_chain`), so that no step compares two numbers: each is a successor and an equality
("is this the second place?"), and the answer says whether the count reached it. With
`look_numbers` a count's answer numbers its tokens as it writes them, so the count is the last number.
With `look_scan` a count's answer goes through all of the image's tokens in generation order and writes after each
one the colours (a count of a colour) or shapes (of a shape) of the objects it holds ("no" for none; each object at
the token holding most of its pixels), then how many of the counted objects the tokens so far hold. So every step
copies the next token, reads its colour or shape (as a colour question's `<image>: blue` does), compares that word
with the question's and adds; the count is the last number ("How many objects", scanned where `count` is in the
look list, writes the numbers alone). The image's tokens are known only once SeTok has read it, so a scanning
turn's answer is written in `look_samples` (the data set keeps the plain answer and marks the turn
`{"scan": counted instance ids, "words": each object's word}`).

Shapes: instance maps (H, W) int, 0 background, object j + 1.
"""
from __future__ import annotations

import json
from typing import Optional, Sequence

import numpy as np
import torch

from ...data.conversations import world_files
from ...data.drills import relation_chain
from ...data.shapes_text import (ANSWER_MARK, COUNT_QUESTION, QUESTION_TYPES, RELATION_QUESTION, phrase_objects,
                                 place_bin)
from .attend import object_tokens
from .text import IMAGE_TOKEN

__all__ = ["LOOK_TYPES", "looks_at", "look_objects", "superlative_object", "look_answer", "relation_places",
           "chained_answer", "look_entry", "scan_answer", "look_samples", "looked_masks", "looked_picture"]


LOOK_TYPES = QUESTION_TYPES + ("count_by",)   # a row's `look` list: question types, or "count_by"


def looks_at(qtype: Optional[str], question: str, types: Optional[Sequence[str]]) -> bool:
    """Whether a question of type `qtype` looks under a row's `look` list (None: every type).
    "count_by" in the list: counts of one colour or shape ("How many circles are there?") look,
    "How many objects are there?" does not (unless "count" is in the list too)."""
    if types is None or qtype in types:
        return True
    m = COUNT_QUESTION.fullmatch(question.strip()) if qtype == "count" and "count_by" in types else None
    return m is not None and (m.group(1) is not None or m.group(2) != "objects")


def look_objects(qtype: Optional[str], question: str, objects: list[dict], resolve: bool = False) -> list[int]:
    """The objects (indices into `objects`) a looking answer writes for a question of type
    `qtype`: a relation's two phrases' objects in the question's order; existence, the objects
    of the asked shape (of the asked colour for "a red object"); a count of "objects", all of
    them; otherwise those the question names (`shapes_text.phrase_objects`). [] for none.
    `resolve`: a relation phrase with a superlative ("the leftmost red circle") names only its
    one object (`superlative_object`), else every object of its colour and shape."""
    phrases = phrase_objects(question, objects, by_shape=qtype == "exist")
    if qtype == "relation":
        if resolve:
            words = question.lower().split()
            sup = [w for w in words if w in SUPERLATIVES]
            if len(sup) == sum(len(p) > 1 for p in phrases):       # one superlative per ambiguous phrase
                it = iter(sup)
                phrases = [superlative_object(p, next(it), objects) if len(p) > 1 else p for p in phrases]
        return [i for p in phrases for i in p]
    if qtype == "count" and not phrases:
        return list(range(len(objects)))
    return sorted({i for p in phrases for i in p})


SUPERLATIVES = {"leftmost": (0, min), "rightmost": (0, max), "topmost": (1, min), "bottommost": (1, max)}


def superlative_object(ids: Sequence[int], word: str, objects: list[dict]) -> list[int]:
    """The one object of `ids` that a superlative picks ("leftmost": the least centre x)."""
    axis, pick = SUPERLATIVES[word]
    return [pick(ids, key=lambda i: float(objects[i]["center"][axis]))]


def look_answer(answer: str, n: int, places: Optional[Sequence[int | str]] = None) -> str:
    """An answer with `n` looked-up tokens before it ("<image> <image>: 2"; n = 0: as it is);
    `places` (n,): a word after each token ("<image> 1 <image> 4: yes")."""
    if n == 0:
        return answer
    words = [IMAGE_TOKEN] * n if places is None else [f"{IMAGE_TOKEN} {p if isinstance(p, str) else int(p)}"
                                                      for p in places]
    return " ".join(words) + (" " if ANSWER_MARK in answer else ANSWER_MARK) + answer


def relation_places(question: str, objects: list[dict], ids: Sequence[int]) -> Optional[list[int]]:
    """A relation question and its two looked objects (indices) -> each one's centre bin along
    the axis the relation compares (x for left / right, y for above / below); None for any other
    question or another number of objects."""
    m = RELATION_QUESTION.search(question)
    if m is None or len(ids) != 2:
        return None
    axis = 0 if m.group(2) in ("to the left of", "to the right of") else 1
    return [place_bin(float(objects[i]["center"][axis])) for i in ids]


def chained_answer(answer: str, question: str, places: Sequence[int]) -> str:
    """A relation's looking answer with places ("<image> 1 <image> 5: yes") -> the same with the places counted
    from the first toward the second before the answer ("<image> 1 <image> 5, 1 2 3 4 5: yes"; `relation_chain`)."""
    rel = RELATION_QUESTION.search(question).group(2)
    head, _, tail = answer.rpartition(ANSWER_MARK)
    return f"{head}, {' '.join(map(str, relation_chain(rel, *places)))}{ANSWER_MARK}{tail}"


def scan_answer(answer: str, holds: Sequence[int], words: Optional[Sequence[Sequence[str]]] = None) -> str:
    """A scanning count's answer: `holds` (K,) how many counted objects each of the image's tokens holds, in
    generation order, and `words` (K,) the words of the objects each holds (None: no words) -> "<image> red 0
    <image> no 0 <image> blue 1 ...: answer", each token followed by its words ("no" for none) and the running count."""
    runs = np.cumsum(np.asarray(holds, dtype=np.int64)).tolist()
    if words is None:
        return look_answer(answer, len(runs), runs)
    return look_answer(answer, len(runs), [" ".join(list(w) or ["no"]) + f" {n}" for w, n in zip(words, runs)])


def look_entry(entry: dict, types: Optional[Sequence[str]] = None, places: bool = False,
               numbers: bool = False, scan: bool = False) -> tuple[dict, Optional[dict]]:
    """An instruct entry of the world -> (the entry with looking answers, {"instances": its image's
    instance map, "turns": per answer turn the instance ids (object index + 1) its tokens are of, in
    writing order}); (the entry, None) where the world wrote no scene beside its image. `types`:
    only entries of these question types look (the others keep their answers, with turns of []).
    `places`: a relation's answer writes each object's place after its token (`relation_places`), its
    superlatives resolved (`look_objects(resolve=True)`); "chain": the places counted too (`chained_answer`);
    "count_by" in `types`: `looks_at`. `numbers`: a count's answer writes the running number after each token
    ("<image> 1 <image> 2: 2"). `scan`: a looking count's turn is {"scan": the counted instance ids, "words": each
    object's colour (a count of a colour) or shape (of a shape), None for "How many objects"} and keeps its plain
    answer (`scan_answer`, written by `look_samples`)."""
    scene, inst = world_files(entry["image"])
    if not (scene.is_file() and inst.is_file()):
        return entry, None
    objects = json.loads(scene.read_text())["objects"]
    conv, turns, question = [], [], ""
    for t in entry["conversations"]:
        if t["from"] in ("human", "user"):
            question = str(t["value"]).replace(IMAGE_TOKEN, " ")
            conv.append(dict(t))
            continue
        looks = looks_at(entry.get("type"), question, types)
        idx = look_objects(entry.get("type"), question, objects, resolve=places) if looks else []
        at = relation_places(question, objects, idx) if places and entry.get("type") == "relation" else None
        if numbers and entry.get("type") == "count":
            at = list(range(1, len(idx) + 1))
        if scan and looks and entry.get("type") == "count":
            m = COUNT_QUESTION.fullmatch(question.strip())
            key = None if m is None or (m.group(1) is None and m.group(2) == "objects") else (
                "color" if m.group(1) is not None else "shape")
            turns.append({"scan": [i + 1 for i in idx], "words": None if key is None else [o[key] for o in objects]})
            conv.append(dict(t))
            continue
        turns.append([i + 1 for i in idx])
        value = look_answer(str(t["value"]), len(idx), at)
        if places == "chain" and at is not None and entry.get("type") == "relation":
            value = chained_answer(value, question, at)
        conv.append({**t, "value": value})
    return {**entry, "conversations": conv}, {"instances": str(inst), "turns": turns}


@torch.no_grad()
def look_samples(model, batch: dict, samples: list[dict], cache: dict, outputs) -> None:
    """Stage II/III: each looking row's sample images [source] (and seeds) -> [source, then one
    source token per looked-up object, as its answers write them], in place; a scanning turn
    (`look_entry(scan=True)`) writes every source token in order, and its answer becomes
    `scan_answer`'s (the sample's conversation is replaced, never the batch's). Each image's
    object tokens are computed once (`cache`, by image key); `outputs(rows)` gives the SeTok
    output of each of those batch images (one image each, as `diff_samples` takes them)."""
    from PIL import Image
    looks = batch.get("look") or []
    first = [0] + torch.as_tensor(batch["image_counts"]).cumsum(0).tolist()[:-1]
    items = [(j, lk) for j, lk in enumerate(looks) if lk is not None and any(lk["turns"])]
    todo = {batch["image_keys"][first[j]]: (first[j], lk["instances"]) for j, lk in items
            if batch["image_keys"][first[j]] not in cache}
    if todo:
        keys = list(todo)
        for k, out in zip(keys, outputs([todo[k][0] for k in keys])):
            with Image.open(todo[k][1]) as im:
                cache[k] = object_tokens(model, out, 0, np.asarray(im))
    for j, lk in items:
        tokens = cache[batch["image_keys"][first[j]]]
        at = lambda i: int(tokens[i]) if i < len(tokens) else 0                     # noqa: E731
        K = samples[j]["images"][0].shape[0]
        idx, turns, conv = [], iter(lk["turns"]), []
        for t in samples[j]["conversations"]:
            turn = None if t["from"] in ("human", "user") else next(turns)
            if isinstance(turn, dict):                                       # a scan: every token, in order
                holds = np.bincount([at(i) for i in turn["scan"]], minlength=K)[:K]
                words = None if turn["words"] is None else [
                    [w for i, w in enumerate(turn["words"], 1) if at(i) == k] for k in range(K)]
                idx += range(K)
                t = {**t, "value": scan_answer(str(t["value"]), holds, words)}
            elif turn is not None:
                idx += [at(i) for i in turn]
            conv.append(t)
        samples[j]["conversations"] = conv
        pick = lambda xs: [xs[0]] + [xs[0][k:k + 1] for k in idx]                  # noqa: E731
        samples[j]["images"] = pick(samples[j]["images"])
        if "seeds" in samples[j]:
            samples[j]["seeds"] = pick(samples[j]["seeds"])


def look_turns(groups: Sequence[Optional[dict]]) -> Optional[dict]:
    """The looks of a chat's entries -> one look of the whole chat (their turns in order)."""
    if not groups or any(g is None for g in groups):
        return None
    return {"instances": groups[0]["instances"], "turns": [t for g in groups for t in g["turns"]]}


@torch.no_grad()
def looked_masks(model, image, tokens: Sequence, threshold: float = 0.5) -> list[np.ndarray]:
    """An image and the tokens a looking answer wrote (each (T,)) -> each token's region (H, W)
    bool on the image's own pixels, through the stage-1 mask decoder (as `setok segment`)."""
    from .regions import read_images, region_probs, to_original
    if not len(tokens):
        return []
    seen = read_images(model, [image])
    x = torch.stack([t.reshape(-1) for t in tokens]).to(model.device)[None]            # (1, n, T)
    probs = region_probs(model, seen, x)[0]                                                # (n, S, S)
    return list((to_original(probs, seen, 0) > threshold).cpu().numpy())


COLOURS = [(255, 40, 40), (40, 120, 255), (40, 200, 80), (255, 170, 0), (200, 60, 220), (0, 200, 200)]


def looked_picture(image: np.ndarray, masks: Sequence[np.ndarray]) -> np.ndarray:
    """image (H, W, 3) uint8 with each looked-up region tinted in its own colour, in writing order."""
    from ...tasks.setokim import overlay
    out = image
    for k, m in enumerate(masks):
        out = overlay(out, m, COLOURS[k % len(COLOURS)], alpha=0.4)
    return out
