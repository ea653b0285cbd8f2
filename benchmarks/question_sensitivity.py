"""Does Setokim's answer depend on the word that names the asked object?

    python benchmarks/question_sensitivity.py --model runs/tiny-stage3 --data data/shapes/val \\
        [--images 100] [--min-objects 3] [--kinds color,shape,exist,relation] \\
        [--out benchmarks/results/question_sensitivity.json]

For each of the first --images val images with at least --min-objects objects, every question
of each kind that the world could ask about it (`setok data questions`' set): colour questions
("What color is the hexagon?" for each shape that one object has: a lookup by shape), shape
questions ("What shape is the blue object?": a lookup by colour), existence ("Is there a red
star?" for each (colour, shape) present, and near misses answered "no"), relations between
named objects, and counts (`--kinds count`), answered greedily by `setok ask`'s
pipeline. Per kind:

- accuracy (the part after the last ": " of explained answers, as `setok eval vqa` scores);
- how often all of an image's questions of that kind get the same answer although their right
  answers differ ("blind": the asked word changed nothing), out of the images with two or more
  such questions and at least two different right answers;
- the number of distinct answers per image against the number of distinct right ones.

A model that reads the asked word has "blind" near 0; one that answers from the image alone
has it near 1 (then its accuracy is the share of questions whose answer is that one object's).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

KINDS = ("color", "shape", "count", "exist", "relation")


def question_sets(objects: list[dict], kinds: tuple[str, ...] = KINDS) -> dict[str, list[tuple[str, str]]]:
    """A scene's objects -> {kind: [(question, answer)]}: every question of each kind that the
    world asks about the scene (`shapes_text.all_questions`, its own seeded draws fixed), e.g.
    the colour of each object its shape singles out, or "is there" each (colour, shape) present
    and its near misses."""
    import numpy as np
    from setok_cli.data.shapes_text import all_questions
    out: dict[str, list[tuple[str, str]]] = {k: [] for k in kinds}
    for kind, q, a in all_questions({"objects": objects}, np.random.default_rng(0)):
        if kind in out:
            out[kind].append((q, a))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="a split folder written by `setok data shapes`")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--min-objects", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kinds", default="color,shape,exist,relation", help="comma-separated, of " + ",".join(KINDS))
    ap.add_argument("--out", default="benchmarks/results/question_sensitivity.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from setok_cli.data.shapes import _world_pairs
    from setok_cli.data.shapes_text import final_answer
    from setok_cli.tasks.setokim import Sampling, ask, load_setokim

    d, pairs = _world_pairs(a.data, ("scene",))
    chosen = [(d / e["image"], objs) for e, objs in pairs if len(objs) >= a.min_objects][:a.images]
    model = load_setokim(a.model)
    per_kind: dict[str, dict] = {}
    for kind in a.kinds.split(","):
        if kind not in KINDS:
            ap.error(f"--kinds: {kind!r} is not one of {', '.join(KINDS)}")
        right = total = blind = judged = 0
        spread, want_spread = [], []
        for image, objs in chosen:
            qa = question_sets(objs, (kind,))[kind]
            if not qa:
                continue
            said = [final_answer(x) for x in ask(model, [str(image)] * len(qa), [q for q, _ in qa],
                                                  Sampling(temperature=0.0))]
            right += sum(s == w for s, (_, w) in zip(said, qa))
            total += len(qa)
            if len(qa) >= 2 and len({w for _, w in qa}) >= 2:
                judged += 1
                blind += len(set(said)) == 1
                spread.append(len(set(said)))
                want_spread.append(len({w for _, w in qa}))
        per_kind[kind] = {"questions": total, "accuracy": right / max(total, 1), "images_judged": judged,
                          "blind": blind / max(judged, 1),
                          "distinct_answers_per_image": sum(spread) / max(len(spread), 1),
                          "distinct_right_answers_per_image": sum(want_spread) / max(len(want_spread), 1)}
        k = per_kind[kind]
        print(f"{kind:8s}: accuracy {k['accuracy']:.3f} on {total} questions; blind {k['blind']:.3f} of "
              f"{judged} images; distinct answers per image {k['distinct_answers_per_image']:.2f} "
              f"(right: {k['distinct_right_answers_per_image']:.2f})")
    result = {"model": a.model, "data": a.data, "images": len(chosen), "min_objects": a.min_objects, **per_kind}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")
    return result


if __name__ == "__main__":
    main()
