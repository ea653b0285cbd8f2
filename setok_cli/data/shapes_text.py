"""The words of the shapes world: captions, questions, referring expressions and edit
instructions for a scene graph (see `shapes_world` for the graph)."""
from __future__ import annotations

import re

import numpy as np

from .shapes_world import COLOR_NAMES, MAX_OBJECTS, NUMBER_WORDS, PLURALS, REGIONS, SHAPES, _valid, sample_object

# ----------------------------------------------------------------------------- language

def phrase(o: dict) -> str:
    return f"{o['color']} {o['shape']}"


def count_phrase(k: int, color: str, shape: str) -> str:
    if k == 1:
        art = "an" if color[0] in "aeiou" else "a"
        return f"{art} {color} {shape}"
    return f"{NUMBER_WORDS[k]} {color} {PLURALS[shape]}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _group_phrases(objects: list[dict]) -> list[str]:
    """One counted phrase per (colour, shape), in the order of each group's first object."""
    groups: dict[tuple[str, str], int] = {}
    for o in objects:
        groups[(o["color"], o["shape"])] = groups.get((o["color"], o["shape"]), 0) + 1
    return [count_phrase(k, c, s) for (c, s), k in groups.items()]


def caption(scene: dict, rng: np.random.Generator) -> str:
    parts = _group_phrases(scene["objects"])
    n = len(scene["objects"])
    noun = "object" if n == 1 else "objects"
    t = int(rng.integers(3))
    if t == 0:
        return f"{NUMBER_WORDS[n].capitalize()} {noun}: {_join(parts)}."
    if t == 1:
        return f"A picture of {NUMBER_WORDS[n]} {noun}: {_join(parts)}."
    return f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {noun} in the image: {_join(parts)}."


def reading_order(objects: list[dict], rows: int = 16) -> list[dict]:
    """The objects in reading order: by the row of a `rows`-row grid their centre falls in,
    then left to right. At `rows` = the tokenizer's patch rows this is, for most scenes, the
    order in which Setokim writes an image's tokens (by seed position in raster order)."""
    return sorted(objects, key=lambda o: (min(int(o["center"][1] * rows), rows - 1), o["center"][0]))


def caption_in_reading_order(text: str, objects: list[dict], rows: int = 16) -> str:
    """A world caption ("PREFIX: LIST.") with its list rewritten in reading order: each
    (colour, shape) group where its first object falls in `reading_order`. The facts and the
    prefix are unchanged, so the caption still describes the scene; only the order of its
    phrases now tells where each object goes."""
    head, sep, _ = text.rpartition(": ")
    if not sep:
        raise ValueError(f"not a world caption (no ': ' before its list): {text!r}")
    return f"{head}: {_join(_group_phrases(reading_order(objects, rows)))}."


DESCRIBE_BY_SHAPE = "List the objects by shape."


def describe_by_shape(objects: list[dict]) -> str:
    """The objects named shape first, then their colours: "a diamond in orange; three hexagons
    in green, green and red." (shapes in order of first appearance, each shape's colours grouped
    in order of first appearance). Writing it word by word, each colour is read off an object
    found by its shape, the lookup a colour-first caption never asks for."""
    by_shape: dict[str, list[str]] = {}
    for o in objects:
        by_shape.setdefault(o["shape"], []).append(o["color"])
    parts = []
    for s, colors in by_shape.items():
        k = len(colors)
        head = ("an" if s[0] in "aeiou" else "a") + f" {s}" if k == 1 else f"{NUMBER_WORDS[k]} {PLURALS[s]}"
        order = sorted(colors, key=colors.index)
        parts.append(f"{head} in {_join(order)}")
    text = "; ".join(parts) + "."
    return text[0].upper() + text[1:]


def referring_expression(objects: list[dict], i: int) -> str | None:
    """A unique description of objects[i] (None if none of the templates is unique)."""
    o = objects[i]
    same = [j for j, p in enumerate(objects) if p["color"] == o["color"] and p["shape"] == o["shape"]]
    if len(same) == 1:
        by_shape = sum(p["shape"] == o["shape"] for p in objects)
        by_color = sum(p["color"] == o["color"] for p in objects)
        if by_color == 1 and by_shape > 1:
            return f"the {o['color']} object"
        if by_shape == 1 and by_color > 1:
            return f"the {o['shape']}"
        return f"the {phrase(o)}"
    xs = [objects[j]["center"][0] for j in same]
    ys = [objects[j]["center"][1] for j in same]
    for vals, lo, hi in ((xs, "leftmost", "rightmost"), (ys, "topmost", "bottommost")):
        srt = sorted(vals)
        if srt[1] - srt[0] > 0.08 and objects[i]["center"][0 if vals is xs else 1] == srt[0]:
            return f"the {lo} {phrase(o)}"
        if srt[-1] - srt[-2] > 0.08 and objects[i]["center"][0 if vals is xs else 1] == srt[-1]:
            return f"the {hi} {phrase(o)}"
    return None


def referred_objects(question: str, objects: list[dict]) -> list[int]:
    """The objects a world question is about (indices into `objects`): every noun phrase
    ("the green hexagon", "the red object", "hexagons", "a yellow circle") names the objects of
    its colour and shape; phrases naming neither ("How many objects") name none. Superlatives
    ("the leftmost ...") are not resolved: all objects of that colour and shape count."""
    return sorted({i for p in phrase_objects(question, objects) for i in p})


def phrase_objects(question: str, objects: list[dict], by_shape: bool = False) -> list[list[int]]:
    """Per noun phrase of a world question, in its order, the objects it names (as
    `referred_objects`); `by_shape`: a phrase with a shape names every object of that shape,
    whatever its colour ("a red circle": the circles)."""
    words = question.lower().replace("?", " ").replace(".", " ").replace(",", " ").split()
    singular = {v: k for k, v in PLURALS.items()}
    out: list[list[int]] = []
    for i, w in enumerate(words):
        shape = w if w in SHAPES else singular.get(w)
        if shape is None and w not in ("object", "objects"):
            continue
        color = words[i - 1] if i and words[i - 1] in COLOR_NAMES else None
        if shape is None and color is None:
            continue
        color = None if by_shape and shape is not None else color
        out.append([j for j, o in enumerate(objects)
                    if (shape is None or o["shape"] == shape) and (color is None or o["color"] == color)])
    return out


QUESTION_TYPES = ("color", "shape", "count", "exist", "relation")   # the world's VQA kinds
PLACE_BINS = 7          # an explained relation states each object's place in 0..6 along the compared axis
ANSWER_MARK = ": "      # an explained answer ends in ": <answer>" (`final_answer`)


def place_bin(v: float) -> int:
    """A centre coordinate in [0, 1] -> its bin 0..PLACE_BINS-1 (0: left / top)."""
    return min(PLACE_BINS - 1, max(0, int(v * PLACE_BINS)))


def explained_relation(name_a: str, a: dict, name_b: str, b: dict, rel: str, yes: bool) -> str:
    """The answer of "Is A <rel> B?" with its reasons: each object's place along the axis that
    `rel` compares, then the answer: "the red circle at 2, the blue square at 5: yes". Bins of
    1/7 (`place_bin`); a relation holds for centres more than 0.08 apart, so about 4% of
    them fall in one bin and the reasons do not decide them."""
    axis = 0 if rel in ("to the left of", "to the right of") else 1
    pa, pb = place_bin(a["center"][axis]), place_bin(b["center"][axis])
    return f"{name_a} at {pa}, {name_b} at {pb}{ANSWER_MARK}{'yes' if yes else 'no'}"


def explained_relation_order(objects: list[dict], a: dict, b: dict, rel: str, yes: bool) -> str | None:
    """The answer of "Is A above / below B?" with its reasons: the scene's objects in reading
    order (the order Setokim reads an image's tokens in) up to the first of A and B, then the
    answer: "a green star, a blue square: no" to "Is the red circle above the blue square?".
    A relation holds for centres more than 0.08 apart, more than a row of the 16-row grid, so the
    one met first is always the upper one and the reasons decide every answer. None for left /
    right (reading order does not decide them)."""
    if rel not in ("above", "below"):
        return None
    seen = reading_order(objects)
    upto = min(seen.index(a), seen.index(b))
    return _listed(seen[:upto + 1], "yes" if yes else "no")


def explained_count(objects: list[dict], color: str | None = None, shape: str | None = None,
                    numbered: bool = False, scene: bool = False) -> str:
    """The answer of "How many red objects / circles are there?" with its reasons: the objects counted, in reading
    order, then their number: "a red circle, a red star: 2"; "0" when there are none. `numbered`: each object with
    its running count, so the answer copies the last number: "a red circle 1, a red star 2: 2". `scene`: every
    object of the scene, each counted one with its running count: "a blue star, a red circle 1: 1" ("...: 0")."""
    seen, k, names = reading_order(objects), 0, []
    for o in seen:
        hit = color in (None, o["color"]) and shape in (None, o["shape"])
        k += hit
        if hit or scene:
            names.append(count_phrase(1, o["color"], o["shape"]) + (f" {k}" if hit and (numbered or scene) else ""))
    return ", ".join(names) + ANSWER_MARK + str(k) if names else "0"


def _listed(found: list[dict], answer: str) -> str:
    """Objects listed as a caption names them, then the answer: "a red circle, a red star: 2"."""
    return ", ".join(count_phrase(1, o["color"], o["shape"]) for o in found) + ANSWER_MARK + answer


RELATION_QUESTION = re.compile(r"Is (the .+) (to the left of|to the right of|above|below) (the .+)\?")
COUNT_QUESTION = re.compile(r"How many (?:(\w+) objects|(\w+)) are there\?")
EXIST_QUESTION = re.compile(r"Is there an? (\w+) (\w+)\?")
COLOR_QUESTION = re.compile(r"What color is the (\w+)\?")
EXPLAINED_KINDS = ("relation", "count", "exist", "color")   # the kinds `explained_answer` gives reasons for
# not default kinds (`explained_answer` says what each explains)
EXPLAINED_OPTIONAL = ("exist_shape", "relation_order", "exist_all", "count_all", "exist_echo", "count_numbered",
                      "count_scene")
EXPLAINED_EXCLUSIVE = (("exist", "exist_shape", "exist_all", "exist_echo"), ("relation", "relation_order"),
                       ("count", "count_all", "count_numbered", "count_scene"))   # at most one kind of each group


def explained_exist(objects: list[dict], color: str, shape: str, by: str = "color", echo: bool = False) -> str:
    """The answer of "Is there a red circle?" with its reasons: the objects of that colour (`by` "shape": of that
    shape), in reading order, then yes or no: "a red star, a red circle: yes" ("a blue circle, a red circle: yes");
    "no" when no object has that colour (shape). `echo` writes the other asked word (by shape: the colour) again
    after the list, next to the answer: "a blue circle, a pink circle, red: no"."""
    key, want = ("color", color) if by == "color" else ("shape", shape)
    found = [o for o in reading_order(objects) if o[key] == want]
    hit = any(o["color"] == color and o["shape"] == shape for o in found)
    echoed = f", {color if by == 'shape' else shape}" if echo else ""      # the phrases hold no ": "
    return _listed(found, "yes" if hit else "no").replace(ANSWER_MARK, echoed + ANSWER_MARK, 1) if found else "no"


def explained_by_scene(objects: list[dict], answer: str) -> str:
    """An answer after every object of the scene in reading order, one phrase each: "a red circle, a
    blue star, a red star: 2" to "How many red objects are there?"; the answer is read off the list."""
    return _listed(reading_order(objects), answer)


def explained_color(objects: list[dict], shape: str) -> str:
    """The answer of "What color is the hexagon?" with its reasons: the objects of the scene
    in reading order (the order a caption in reading order names them) up to and including the
    one with that shape, then its colour: "a red circle, a blue hexagon: blue". Each step is a
    caption's step plus one test, "is the shape just written the asked one?", and the answer is
    the colour written two words before. ValueError unless exactly one object has that shape
    (the world asks only those)."""
    found = [o for o in objects if o["shape"] == shape]
    if len(found) != 1:
        raise ValueError(f"{len(found)} objects are {shape}s")
    seen = reading_order(objects)
    return _listed(seen[:seen.index(found[0]) + 1], found[0]["color"])


def explained_answer(question: str, answer: str, objs: list[dict],
                     kinds: tuple[str, ...] = EXPLAINED_KINDS) -> str | None:
    """A world question's answer with its reasons (relations: `explained_relation`, above / below by
    `explained_relation_order` with the kind "relation_order"; counts by colour or shape: `explained_count`, numbered
    with "count_numbered", after the whole scene with "count_scene"; existence: `explained_exist`, by the asked shape
    with "exist_shape", the colour again after the list with "exist_echo"; colour: `explained_color`; existence and
    counts after every object of the scene with "exist_all" and "count_all": `explained_by_scene`), None for the
    other kinds, for kinds not in `kinds` and for the total count unless "count_all"; ValueError if the plain answer is
    not the scene's."""
    m = RELATION_QUESTION.fullmatch(question)
    if m:
        if "relation" not in kinds and "relation_order" not in kinds:
            return None
        names = {referring_expression(objs, i): o for i, o in enumerate(objs)}
        na, rel, nb = m.groups()
        if na not in names or nb not in names or answer not in ("yes", "no"):
            raise ValueError(question)
        if "relation_order" in kinds:
            out = explained_relation_order(objs, names[na], names[nb], rel, answer == "yes")
            a_upper = names[na]["center"][1] < names[nb]["center"][1]
            if out is not None and (a_upper if rel == "above" else not a_upper) != (answer == "yes"):
                raise ValueError(question)
            return out
        return explained_relation(na, names[na], nb, names[nb], rel, answer == "yes")
    color, count = COLOR_QUESTION.fullmatch(question), COUNT_QUESTION.fullmatch(question)
    if color and color.group(1) in SHAPES:
        kind, out = "color", explained_color(objs, color.group(1))
    elif count and (count.group(1) in COLOR_NAMES or count.group(2) in PLURALS.values()
                    or count.group(2) == "objects"):
        shape = {p: s for s, p in PLURALS.items()}.get(count.group(2))
        kind = next((k for k in ("count_numbered", "count_scene", "count_all") if k in kinds), "count")
        out = explained_count(objs, count.group(1), shape, kind == "count_numbered", kind == "count_scene")
        if kind == "count_all":
            out = explained_by_scene(objs, final_answer(out))
        elif count.group(2) == "objects":                          # the total count stays plain
            kind = "total"
    else:
        m = EXIST_QUESTION.fullmatch(question)
        if not m or m.group(1) not in COLOR_NAMES or m.group(2) not in SHAPES:
            return None
        kind = next((k for k in ("exist_shape", "exist_all", "exist_echo") if k in kinds), "exist")
        by = "color" if kind in ("exist", "exist_all") else "shape"
        out = explained_exist(objs, *m.groups(), by, echo=kind == "exist_echo")
        if kind == "exist_all":
            out = explained_by_scene(objs, final_answer(out))
    if final_answer(out) != answer:
        raise ValueError(question)
    return out if kind in kinds else None


def final_answer(text: str) -> str:
    """The answer of an explained answer ("... at 5: yes" -> "yes"); any other text as it is."""
    return text.rsplit(ANSWER_MARK, 1)[-1] if ANSWER_MARK in text else text


def _relation(a: dict, b: dict, rng: np.random.Generator) -> tuple[str, bool] | None:
    dx, dy = b["center"][0] - a["center"][0], b["center"][1] - a["center"][1]
    opts = []
    if abs(dx) > 0.08:
        opts += [("to the left of", dx > 0), ("to the right of", dx < 0)]
    if abs(dy) > 0.08:
        opts += [("above", dy > 0), ("below", dy < 0)]
    return opts[int(rng.integers(len(opts)))] if opts else None


def questions(scene: dict, rng: np.random.Generator, k: int = 5) -> list[tuple[str, str, str]]:
    """(type, question, answer) triples, one of each answerable type, shuffled, first k."""
    objs = scene["objects"]
    qs: list[tuple[str, str, str]] = []
    shapes, colors = [o["shape"] for o in objs], [o["color"] for o in objs]
    uniq_shape = [o for o in objs if shapes.count(o["shape"]) == 1]
    uniq_color = [o for o in objs if colors.count(o["color"]) == 1]
    if uniq_shape:
        o = uniq_shape[int(rng.integers(len(uniq_shape)))]
        qs.append(("color", f"What color is the {o['shape']}?", o["color"]))
    if uniq_color:
        o = uniq_color[int(rng.integers(len(uniq_color)))]
        qs.append(("shape", f"What shape is the {o['color']} object?", o["shape"]))
    t = rng.random()  # the total count is uniform over 1..6; per-colour/shape counts skew to 1
    if t < 0.5:
        qs.append(("count", "How many objects are there?", str(len(objs))))
    elif t < 0.75:
        c = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))] if rng.random() < 0.3 else colors[int(rng.integers(len(objs)))]
        qs.append(("count", f"How many {c} objects are there?", str(colors.count(c))))
    else:
        s = SHAPES[int(rng.integers(len(SHAPES)))] if rng.random() < 0.3 else shapes[int(rng.integers(len(objs)))]
        qs.append(("count", f"How many {PLURALS[s]} are there?", str(shapes.count(s))))
    if rng.random() < 0.5:
        o = objs[int(rng.integers(len(objs)))]
        c, s = o["color"], o["shape"]
    else:
        c, s = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))], SHAPES[int(rng.integers(len(SHAPES)))]
    present = any(o["color"] == c and o["shape"] == s for o in objs)
    qs.append(("exist", f"Is there {count_phrase(1, c, s)}?", "yes" if present else "no"))
    names = [referring_expression(objs, i) for i in range(len(objs))]
    pairs = [(i, j) for i in range(len(objs)) for j in range(len(objs)) if i != j and names[i] and names[j]]
    if pairs:
        i, j = pairs[int(rng.integers(len(pairs)))]
        rel = _relation(objs[i], objs[j], rng)
        if rel is not None:
            q = f"Is {names[i]} {rel[0]} {names[j]}?"
            qs.append(("relation", q[0].upper() + q[1:], "yes" if rel[1] else "no"))
    order = rng.permutation(len(qs))
    return [qs[i] for i in order[:k]]


def _pick(rng: np.random.Generator, xs: list) -> list:
    """[one element of xs drawn by rng], or [] for an empty xs."""
    return [xs[int(rng.integers(len(xs)))]] if xs else []


def _pick_n(rng: np.random.Generator, xs: list, n: int) -> list:
    """n elements of xs drawn by rng without replacement (all of them if fewer), in xs' order;
    n = 1 draws as `_pick` does."""
    return _pick(rng, xs) if n == 1 else [xs[int(i)] for i in sorted(rng.permutation(len(xs))[:n])]


def all_questions(scene: dict, rng: np.random.Generator, absent: int = 1) -> list[tuple[str, str, str]]:
    """Every question of the five types that the scene answers, in `questions`' words, shuffled:
    the colour of each object its shape singles out and the shape of each object its colour
    singles out; the count of all objects, of each colour and shape present and of `absent`
    absent colours and shapes (0); for each (colour, shape) present, "is there" that and a near miss
    (its colour on an absent shape or its shape in an absent colour: "no"); and a relation
    for up to 2n ordered pairs of named objects; each question once. `questions` keeps one per
    type (k=5)."""
    objs = scene["objects"]
    shapes, colors = [o["shape"] for o in objs], [o["color"] for o in objs]
    qs: list[tuple[str, str, str]] = []
    for o in objs:
        if shapes.count(o["shape"]) == 1:
            qs.append(("color", f"What color is the {o['shape']}?", o["color"]))
        if colors.count(o["color"]) == 1:
            qs.append(("shape", f"What shape is the {o['color']} object?", o["shape"]))
    qs.append(("count", "How many objects are there?", str(len(objs))))
    for c in sorted(set(colors), key=colors.index) + _pick_n(rng, [c for c in COLOR_NAMES if c not in colors], absent):
        qs.append(("count", f"How many {c} objects are there?", str(colors.count(c))))
    for s in sorted(set(shapes), key=shapes.index) + _pick_n(rng, [s for s in SHAPES if s not in shapes], absent):
        qs.append(("count", f"How many {PLURALS[s]} are there?", str(shapes.count(s))))
    present = {(o["color"], o["shape"]) for o in objs}
    for c, s in sorted(present, key=lambda cs: (colors.index(cs[0]), cs[1])):
        qs.append(("exist", f"Is there {count_phrase(1, c, s)}?", "yes"))
        misses = [(c, t) for t in SHAPES if (c, t) not in present] if rng.random() < 0.5 else \
            [(d, s) for d in COLOR_NAMES if (d, s) not in present]
        for mc, ms in _pick(rng, misses):
            qs.append(("exist", f"Is there {count_phrase(1, mc, ms)}?", "no"))
    names = [referring_expression(objs, i) for i in range(len(objs))]
    pairs = [(i, j) for i in range(len(objs)) for j in range(len(objs)) if i != j and names[i] and names[j]]
    for k in rng.permutation(len(pairs))[:2 * len(objs)]:
        i, j = pairs[int(k)]
        rel = _relation(objs[i], objs[j], rng)
        if rel is not None:
            q = f"Is {names[i]} {rel[0]} {names[j]}?"
            qs.append(("relation", q[0].upper() + q[1:], "yes" if rel[1] else "no"))
    qs = list({q[1]: q for q in reversed(qs)}.values())[::-1]      # a question asked twice: its first
    return [qs[int(i)] for i in rng.permutation(len(qs))]


# ----------------------------------------------------------------------------- edits

def region_name(center: list[float]) -> str:
    return min(REGIONS, key=lambda k: (REGIONS[k][0] - center[0]) ** 2 + (REGIONS[k][1] - center[1]) ** 2)


def sample_edit(scene: dict, rng: np.random.Generator, tries: int = 40) -> tuple[dict, str, dict] | None:
    """One edit (recolor, remove, add, move) of a scene -> (target scene, instruction,
    info). info = {"op", "object": source instance id or None, "preserved": target ids
    of objects that are unchanged}. None if no valid edit was found."""
    objs = scene["objects"]
    ops = ["recolor", "move"] + (["remove"] if len(objs) > 1 else []) + (["add"] if len(objs) < MAX_OBJECTS else [])
    for _ in range(tries):
        op = ops[int(rng.integers(len(ops)))]
        if op == "add":
            region = list(REGIONS)[int(rng.integers(len(REGIONS)))]
            new = sample_object(rng, center=REGIONS[region], jitter=0.05)
            target = objs + [new]
            if region_name(new["center"]) != region or not _valid(target):
                continue
            prep = "at" if region in ("top", "bottom", "left", "right", "center") else "in"
            instr = f"Add {count_phrase(1, new['color'], new['shape'])} {prep} the {region}."
            return ({**scene, "objects": target}, instr,
                    {"op": op, "object": None, "preserved": list(range(1, len(objs) + 1))})
        i = int(rng.integers(len(objs)))
        name = referring_expression(objs, i)
        if name is None:
            continue
        rest = [k + 1 for k in range(len(objs)) if k != i]
        if op == "remove":
            target = objs[:i] + objs[i + 1:]
            if not _valid(target):
                continue
            return ({**scene, "objects": target}, f"Remove {name}.",
                    {"op": op, "object": i + 1, "preserved": list(range(1, len(target) + 1))})
        if op == "recolor":
            c = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
            if c == objs[i]["color"]:
                continue
            target = [dict(o, color=c) if k == i else dict(o) for k, o in enumerate(objs)]
            if not _valid(target):
                continue
            return ({**scene, "objects": target}, f"Make {name} {c}.",
                    {"op": op, "object": i + 1, "preserved": rest})
        if op == "move":
            region = list(REGIONS)[int(rng.integers(len(REGIONS)))]
            o, r = dict(objs[i]), objs[i]["size"]
            c = np.clip(np.asarray(REGIONS[region]) + rng.uniform(-0.04, 0.04, 2), r, 1 - r)
            if region_name(list(c)) != region or region_name(o["center"]) == region:
                continue
            o["center"] = [round(float(c[0]), 4), round(float(c[1]), 4)]
            target = objs[:i] + [o] + objs[i + 1:]
            if not _valid(target):
                continue
            where = "to the " + region if region != "center" else "to the center"
            return ({**scene, "objects": target}, f"Move {name} {where}.",
                    {"op": op, "object": i + 1, "preserved": rest})
    return None
