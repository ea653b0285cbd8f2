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
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..files import atomic_write_json
from .shapes_text import count_phrase
from .shapes_world import COLOR_NAMES, SHAPES

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


FORMS = ("question", "answer", "echo")


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


def list_drills(split: str | Path, per_image: int = 2, seed: int = 0, form: str = "question") -> tuple[Path, int]:
    """A written split -> `instruct_list_drills.json` (`_<form>` before `.json` unless form is "question")
    beside its other files: `per_image` drills (`list_drill`, turns as `drill_turns` writes them in `form`) on
    each image, the image attached as every instruct entry has one. Drill j of image i depends on (seed, i)
    only, whatever the form. Returns (path, number of drills)."""
    from ..errors import UserError
    from .shapes import _world_pairs
    if per_image < 1:
        raise UserError(f"--per-image must be at least 1, got {per_image}")
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
    path = d / ("instruct_list_drills.json" if form == "question" else f"instruct_list_drills_{form}.json")
    atomic_write_json(path, out, indent=None)
    return path, len(out)
