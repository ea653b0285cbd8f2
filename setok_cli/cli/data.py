"""`setok data ...`: data set generators."""
from __future__ import annotations

import click


@click.group()
def data():
    """Generate data sets in the SPEC formats."""


@data.command("shapes")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--n", "n", default=1000, show_default=True, type=int, help="Number of images over all splits.")
@click.option("--size", default=64, show_default=True, type=click.IntRange(32, 1024),
              help="Image side in pixels (64 and 128 are the tested sizes).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed; image i depends on (seed, i) only.")
@click.option("--splits", default="0.8,0.1,0.1", show_default=True, help="train,val,test fractions.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def shapes(out, n, size, seed, splits, as_json):
    """Render the synthetic multi-object world into OUT/{train,val,test}/."""
    import json
    import time

    from rich.console import Console
    from rich.table import Table

    from ..data.shapes import generate

    t = time.perf_counter()
    summary = generate(out, n=n, size=size, seed=seed, splits=splits, progress=not as_json and n >= 200)
    dt = time.perf_counter() - t
    if as_json:
        click.echo(json.dumps({**summary, "seconds": round(dt, 3)}))
        return
    table = Table(title=f"setok data shapes -> {out}  ({n} images, {size}px, seed {seed}, {dt:.1f}s)")
    table.add_column("split")
    kinds = ("pairs", "instruct", "referring", "edits", "objects")
    for k in kinds:
        table.add_column(k, justify="right")
    for name, counts in summary["splits"].items():
        table.add_row(name, *(str(counts[k]) for k in kinds))
    Console().print(table)


@data.command("referring")
@click.argument("split", type=click.Path(file_okay=False))
@click.option("--by", "by", default="shape", show_default=True, type=click.Choice(["shape", "color"]),
              help="Name each object by this alone, wherever it alone singles the object out.")
def referring(split, by):
    """Write SPLIT/referring_<by>.json: referring expressions that name an object by its
    shape (or colour) alone, for every object it singles out (a stage-III segmentation set)."""
    from ..data.shapes import referring_by
    path, n = referring_by(split, by)
    click.echo(f"{n} expressions -> {path}")


@data.command("describe")
@click.argument("split", type=click.Path(file_okay=False))
@click.option("--by", "by", default="shape", show_default=True, type=click.Choice(["shape"]),
              help="Name each object by this first, then the rest.")
def describe(split, by):
    """Write SPLIT/describe_<by>.json: per image, "List the objects by shape." answered shape
    first ("a diamond in orange; two hexagons in green and red."), an instruct set for stage II."""
    from ..data.shapes import describe_by
    path, n = describe_by(split, by)
    click.echo(f"{n} descriptions -> {path}")


@data.command("edits")
@click.argument("split", type=click.Path(file_okay=False))
@click.option("--per-image", default=3, show_default=True, type=int, help="Edits added to each image.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the added edits.")
def edits(split, per_image, seed):
    """Write SPLIT/edits_all.json: the world's edits.json plus PER_IMAGE more edits of each
    image (recolour, move, add, remove), re-rendered from its scene graph; a stage-II set."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from ..data.shapes import edits_all
    with Progress("edits", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task("edits", total=None)
        path, n = edits_all(split, per_image, seed, advance=lambda: bar.advance(task))
    click.echo(f"{n} edits -> {path}")


@data.command("questions")
@click.argument("split", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of each image's question order.")
@click.option("--types", default="", help="Only these kinds, comma-separated (color, shape, count, exist, "
              "relation), written to instruct_<kinds>.json, e.g. instruct_count_relation.json.")
@click.option("--absent", default=1, show_default=True, type=click.IntRange(min=0),
              help="Count questions about this many absent colours and as many absent shapes per image "
                   "(answer 0); other than 1, the file name ends in _absent<N>.")
def questions(split, seed, types, absent):
    """Write SPLIT/instruct_all.json: every question of the five VQA types that each image
    answers (instruct.json keeps one per type), a denser stage-III set on the same images."""
    from ..data.shapes import questions_all
    path, n = questions_all(split, seed, tuple(t.strip() for t in types.split(",") if t.strip()), absent)
    click.echo(f"{n} questions -> {path}")


@data.command("drills")
@click.argument("split", type=click.Path(file_okay=False))
@click.option("--per-image", default=2, show_default=True, type=click.IntRange(min=1), help="Drills per image.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed; image i's drills depend on (seed, i) only.")
@click.option("--form", default="question", show_default=True, type=click.Choice(["question", "answer", "echo"]),
              help="Where the list is: in the question; first in the answer (\"a pink cross, a blue cross: no\"); "
                   "or there with the asked colour again (\"a pink cross, a blue cross, red: no\"). Not question: "
                   "instruct_list_drills_<form>.json.")
@click.option("--relations", default=0, show_default=True, type=click.IntRange(min=0),
              help="Relation drills per image too (\"Is the red circle above the blue star?\" \"[Img] [/Img] 1 "
                   "[Img] [/Img] 5, 1 2 3 4 5: yes\": a relation answer with places, its visual tokens left out, "
                   "counted from the first place); the file's name ends in _relation.json.")
@click.option("--relation-form", default="chain", show_default=True, type=click.Choice(["chain", "places"]),
              help="places: the relation drills without the count (\"... 5: yes\"; _relation_places.json).")
@click.option("--counts", default=0, show_default=True, type=click.IntRange(min=0),
              help="Count drills per image too (\"How many red objects are there?\" \"a blue star, a red circle 1, a "
                   "red cross 2: 2\": random objects, the running count after each counted one); _count.json.")
def drills(split, per_image, seed, form, relations, relation_form, counts):
    """Write SPLIT/instruct_list_drills.json: existence questions whose answer is read from a list in the
    question, unrelated to the image ("Is there a red cross? a pink cross, a blue cross" "no"): the last
    step of the recipe's existence answers, alone (a stage-III row; with --form echo, the rows of the tiny
    stage-III recipe's text-only first phase, `model.text_first`)."""
    from ..data.drills import list_drills
    path, n = list_drills(split, per_image, seed, form, relations, relation_form, counts)
    click.echo(f"{n} drills -> {path}")


@data.command("explain")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--kinds", default="relation,count,exist,color", show_default=True,
              help="The question kinds whose answers give reasons (comma-separated); exist_shape in place of "
                   "exist lists the objects of the asked shape instead: \"a blue circle, a red circle: yes\" "
                   "(exist_echo: the same, then the asked colour again, \"a blue circle, a pink circle, red: no\"); "
                   "relation_order in place of relation answers above / below by the objects in reading order "
                   "up to the first of the two: \"a green star, a blue square: no\"; exist_all and count_all "
                   "answer existence and counts (the total count too) after every object of the scene in reading "
                   "order: \"a red circle, a blue star, a red star: 2\"; count_numbered in place of count numbers "
                   "each object counted: \"a red circle 1, a red star 2: 2\"; count_scene lists every object of "
                   "the scene, a running count after each counted one: \"a blue star, a red circle 1: 1\".")
@click.option("--out", type=click.Path(dir_okay=False), help="Write here instead of <name>_explained.json.")
def explain(file, kinds, out):
    """Write FILE's instruct entries to <name>_explained.json with reasons before the answers:
    relations give both objects' places (0-6 along the compared axis), "the red circle at 2,
    the blue square at 5: yes"; counts by colour or shape the objects counted, "a red circle,
    a red star: 2"; existence the objects of that colour, "a red star, a red circle: yes";
    colour questions the objects in reading order up to the asked one, "a red circle, a blue
    hexagon: blue".
    `setok ask --data` and `setok eval vqa` score the part after the last ": "."""
    from ..data.shapes import explain_answers
    path, n = explain_answers(file, tuple(k.strip() for k in kinds.split(",") if k.strip()), out)
    click.echo(f"{n} answers explained -> {path}")


@data.command("reading")
@click.argument("split", type=click.Path(file_okay=False))
@click.option("--rows", default=16, show_default=True, type=int,
              help="Rows of the grid that orders the objects (the tokenizer's patch rows).")
def reading(split, rows):
    """Write SPLIT/pairs_reading.json: pairs.json with each caption listing its objects in
    reading order, the order in which Setokim writes an image's tokens (a stage-II generation set)."""
    from ..data.shapes import captions_reading
    path, n = captions_reading(split, rows)
    click.echo(f"{n} captions -> {path}")
