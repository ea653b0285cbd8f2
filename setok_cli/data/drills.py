"""Reading drills: existence questions answered from a list given in the question, not from the image.

    setok data drills data/shapes/train --per-image 2     # data/shapes/train/instruct_list_drills.json
    setok data drills data/shapes/train --per-image 10 --form echo   # instruct_list_drills_echo.json

The recipe's existence answers list the objects of the asked shape, then say yes or no ("Is there a
red cross?" "a pink cross, a blue cross: no"). The list is mostly right; the word after it is
where many of the errors are (README: "Saying that something is not there", "Existence read from a
list"). A drill isolates that word: the question carries a list of objects of the asked shape,
drawn at random and unrelated to the image, and the answer is whether the asked colour is among
them,

    USER: <image>\\nIs there a red cross? a pink cross, a blue cross   ASSISTANT: no

so only reading the list answers it. Half the answers are "yes"; every "no" is a near miss (the
asked shape is listed in other colours). `--form answer` writes the list first in the answer instead, as
the recipe's existence answers do, and `--form echo` adds the asked colour again before the word:

    USER: <image>\nIs there a red cross?   ASSISTANT: a pink cross, a blue cross, red: no

the rows of the tiny stage-III recipe's text-only first phase (`model.text_first`, train/text_first.py).

Relation drills (`--relations N`, `relation_drill`) do the same for the last step of a relation answer with places
(`look_places`: "Is the red circle above the blue star?" "<image> 1 <image> 5: yes", each `<image>` one written
visual token): two places drawn at random, the words a looking answer writes around them with no visual token
between the markers, and the answer that the comparison gives,

    USER: Is the red circle above the blue star?   ASSISTANT: [Img] [/Img] 1 [Img] [/Img] 5: yes

so only comparing the two written numbers under the asked relation answers it. That form stays at chance on text
alone (0.51 held out after 1000 steps of the recipe's phase), so the drills count instead (`--relation-form chain`,
the default; `look_places: chain` in stage III): from A's place toward where B's must lie, one bin a step, until
B's place or the last bin, "[Img] [/Img] 1 [Img] [/Img] 5, 1 2 3 4 5: yes", where each step is a successor and
an equality (README: "Relations that count").
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..files import atomic_write_json
from .shapes_text import PLACE_BINS, count_phrase, explained_count
from .shapes_world import COLOR_NAMES, PLURALS, SHAPES

LIST_LENGTHS = (1, 2, 3)
LIST_LENGTH_P = (0.5, 0.3, 0.2)


def list_drill(rng: np.random.Generator) -> tuple[str, str]:
    """One drill -> (question with its list, "yes" or "no")."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    k = int(rng.choice(LIST_LENGTHS, p=LIST_LENGTH_P))
    colors = [COLOR_NAMES[i] for i in rng.integers(len(COLOR_NAMES), size=k)]
    if rng.random() < 0.5:
        asked, answer = colors[rng.integers(k)], "yes"
    else:
        others = [c for c in COLOR_NAMES if c not in colors]
        asked, answer = others[rng.integers(len(others))], "no"
    listed = ", ".join(count_phrase(1, c, shape) for c in colors)
    return f"Is there {count_phrase(1, asked, shape)}? {listed}", answer


RELATIONS = ("to the left of", "to the right of", "above", "below")


def relation_holds(rel: str, a: int, b: int) -> bool:
    """Whether A `rel` B holds for places a != b along the compared axis (0: left / top)."""
    return a < b if rel in ("to the left of", "above") else a > b


def relation_chain(rel: str, a: int, b: int) -> list[int]:
    """The places counted from A's toward where B must lie for A `rel` B to hold (up for "to the left of" and
    "above", down for the others), one bin a step, until B's place or the last bin: [1, 2, 3, 4, 5] for "above"
    from 1 to 5 (it holds: the chain ends at B's place), [5, 6] from 5 to 1 (it does not). Every step is a
    successor (or predecessor) and one test, "is this B's place?", an equality; no step compares two numbers."""
    step, out = (1 if rel in ("to the left of", "above") else -1), [a]
    while out[-1] != b and 0 <= out[-1] + step < PLACE_BINS:
        out.append(out[-1] + step)
    return out


def relation_drill(rng: np.random.Generator, chain: bool = False) -> tuple[str, str]:
    """One relation drill -> (question, answer as a looking answer with places writes it, without its visual
    tokens): ("Is the red circle above the blue star?", "[Img] [/Img] 1 [Img] [/Img] 5: yes"); `chain`: the places
    counted from A's (`relation_chain`) before the word, "[Img] [/Img] 1 [Img] [/Img] 5, 1 2 3 4 5: yes". Two
    objects that differ in colour or shape, two different places in 0..PLACE_BINS-1, the relation drawn so that
    half the answers are "yes"."""
    from ..models.setokim.text import IMG_END, IMG_START
    while True:
        (ca, cb), (sa, sb) = rng.integers(len(COLOR_NAMES), size=2), rng.integers(len(SHAPES), size=2)
        if (ca, sa) != (cb, sb):
            break
    pa, pb = (int(x) for x in rng.choice(PLACE_BINS, size=2, replace=False))
    rel = RELATIONS[rng.integers(len(RELATIONS))]
    if relation_holds(rel, pa, pb) != (rng.random() < 0.5):      # flip to the opposite relation
        rel = {"to the left of": "to the right of", "to the right of": "to the left of",
               "above": "below", "below": "above"}[rel]
    q = f"Is the {COLOR_NAMES[ca]} {SHAPES[sa]} {rel} the {COLOR_NAMES[cb]} {SHAPES[sb]}?"
    mark = f"{IMG_START} {IMG_END}"
    counted = ", " + " ".join(map(str, relation_chain(rel, pa, pb))) if chain else ""
    return q, f"{mark} {pa} {mark} {pb}{counted}: {'yes' if relation_holds(rel, pa, pb) else 'no'}"


def count_drill(rng: np.random.Generator) -> tuple[str, str]:
    """One count drill -> (question, answer as a count after the whole scene writes it, `explained_count(...,
    scene=True)`, with no image): ("How many red objects are there?", "a blue star, a red circle 1, a red cross 2: 2").
    One to five objects drawn at random, each of the asked colour (shape) with probability 0.4, so that counts of 0, 1,
    2 and more all occur; the running count grows by one after each counted object. Every step is a phrase, an
    equality ("is this word the asked one?") and a successor, as a relation drill's chain is."""
    by_color, n = rng.random() < 0.5, int(rng.integers(1, 6))
    names, key = (COLOR_NAMES, "color") if by_color else (SHAPES, "shape")
    want = names[rng.integers(len(names))]
    objs = []
    for k in range(n):
        o = {"color": COLOR_NAMES[rng.integers(len(COLOR_NAMES))], "shape": SHAPES[rng.integers(len(SHAPES))],
             "center": [0.05 + 0.15 * k, 0.5]}                    # one row: reading order is the drawn order
        objs.append({**o, key: want} if rng.random() < 0.4 else o)
    q = f"How many {want} objects are there?" if by_color else f"How many {PLURALS[want]} are there?"
    return q, explained_count(objs, want if by_color else None, None if by_color else want, scene=True)


FORMS = ("question", "answer", "echo")
RELATION_FORMS = ("chain", "places")


def drill_turns(q: str, a: str, form: str = "question") -> tuple[str, str]:
    """A drill (`list_drill`: question with its list, yes / no) -> (user turn, assistant turn) in `form`:
    "question", the list in the question ("Is there a red cross? a pink cross" / "no"); "answer", the list
    written first in the answer, as the recipe's existence answers do ("Is there a red cross?" / "a pink cross:
    no"); "echo", the same with the asked colour written again just before the word ("a pink cross, red: no")."""
    if form == "question":
        return q, a
    asked, listed = q.split("? ", 1)
    if form == "answer":
        return asked + "?", f"{listed}: {a}"
    if form == "echo":
        return asked + "?", f"{listed}, {asked.split()[-2]}: {a}"
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def list_drills(split: str | Path, per_image: int = 2, seed: int = 0, form: str = "question",
                relations: int = 0, relation_form: str = "chain", counts: int = 0) -> tuple[Path, int]:
    """A written split -> `instruct_list_drills.json` (`_<form>` before `.json` unless form is "question";
    `_relation` too with relation drills, `_relation_places` with those of `relation_form` "places") beside its other
    files: `per_image` drills (`list_drill`, turns as `drill_turns` writes them in `form`) on each image, then
    `relations` relation drills (`relation_drill`, the places counted unless `relation_form` is "places"), the
    image attached as every instruct entry has one. Drill j of image i depends on (seed, i) only, whatever the
    form; its relation drills on (seed, i, 1); then `counts` count drills (`count_drill`, `_count` in the name), on
    (seed, i, 2). Returns (path, number of drills)."""
    from ..errors import UserError
    from .shapes import _world_pairs
    if per_image < 1:
        raise UserError(f"--per-image must be at least 1, got {per_image}")
    if relations < 0 or counts < 0:
        raise UserError(f"--relations and --counts must be at least 0, got {relations} and {counts}")
    if relation_form not in RELATION_FORMS:
        raise UserError(f"--relation-form must be one of {', '.join(RELATION_FORMS)}, got {relation_form!r}")
    if form not in FORMS:
        raise UserError(f"--form must be one of {', '.join(FORMS)}, got {form!r}")
    d, entries = _world_pairs(split, ())
    out = []
    for i, (e, _) in enumerate(entries):
        rng = np.random.default_rng([seed, i])
        image = Path(e["image"]).relative_to(d.resolve()).as_posix()
        for j in range(per_image):
            q, a = drill_turns(*list_drill(rng), form)
            out.append({"id": f"{Path(image).stem}_d{j}", "image": image, "type": "drill",
                        "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]})
        rel_rng = np.random.default_rng([seed, i, 1])
        for j in range(relations):
            q, a = relation_drill(rel_rng, chain=relation_form == "chain")
            out.append({"id": f"{Path(image).stem}_r{j}", "image": image, "type": "drill_relation",
                        "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]})
        count_rng = np.random.default_rng([seed, i, 2])
        for j in range(counts):
            q, a = count_drill(count_rng)
            out.append({"id": f"{Path(image).stem}_c{j}", "image": image, "type": "drill_count",
                        "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]})
    stem = "instruct_list_drills" + ("" if form == "question" else f"_{form}") + (
        "" if not relations else "_relation" if relation_form == "chain" else "_relation_places") + (
        "_count" if counts else "")
    path = d / f"{stem}.json"
    atomic_write_json(path, out, indent=None)
    return path, len(out)
