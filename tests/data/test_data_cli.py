import json

import pytest
from click.testing import CliRunner

from setok_cli.cli.main import cli


def test_setok_data_shapes(tmp_path):
    out = tmp_path / "w"
    r = CliRunner().invoke(cli, ["data", "shapes", "--out", str(out), "--n", "5", "--size", "64",
                                 "--seed", "1", "--splits", "0.6,0.2,0.2", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["splits"]["train"]["pairs"] == 3 and summary["splits"]["test"]["objects"] == 1
    assert (out / "train" / "scenes" / "000000.json").exists()
    r = CliRunner().invoke(cli, ["data", "shapes", "--out", str(out), "--n", "5"])
    assert r.exit_code == 0 and "train" in r.output


def test_setok_data_shapes_user_errors(tmp_path):
    for args in (["--splits", "0.9,0.9"], ["--n", "0"], ["--size", "8"]):
        r = CliRunner().invoke(cli, ["data", "shapes", "--out", str(tmp_path / "x"), *args])
        assert r.exit_code == 2, (args, r.output)
        assert "Traceback" not in r.output
    f = tmp_path / "file"
    f.write_text("")
    r = CliRunner().invoke(cli, ["data", "shapes", "--out", str(f), "--n", "2"])
    assert r.exit_code == 2


def _error_lines(output):
    return [x for x in output.splitlines() if x.startswith("error:")]


def test_setok_data_shapes_unwritable_out_is_one_line():
    """/proc refuses new folders even to root: one `error:` line naming the folder, exit 2."""
    r = CliRunner().invoke(cli, ["data", "shapes", "--out", "/proc/setok-x", "--n", "2"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.strip().splitlines() == ["error: cannot create folder /proc/setok-x: No such file or directory"]


def test_setok_data_shapes_failing_midway_keeps_what_was_written(tmp_path):
    """A write that fails half-way (here a file where the instances folder should be) is one
    line, and the data set already there is not lost: files are replaced atomically and the
    JSON lists only after a split's images."""
    out = tmp_path / "w"
    args = ["data", "shapes", "--out", str(out), "--n", "10", "--seed", "1"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    blocker = out / "train" / "instances"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and blocker not in p.parents}
    for p in blocker.iterdir():
        p.unlink()
    blocker.rmdir()
    blocker.write_text("not a folder")
    r = CliRunner().invoke(cli, [*args[:-1], "2"])      # another seed: every file would change
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert _error_lines(r.output) == [f"error: cannot create folder {blocker}: File exists"]
    first = out / "train" / "images" / "000000.png"     # the one file written before the failure
    assert [p for p, data in before.items() if p.read_bytes() != data] == [first]
    from PIL import Image
    with Image.open(first) as im:
        assert im.size == (64, 64)                      # replaced whole, not half-written
    assert not [p for p in out.rglob(".*")]             # no temporary file left behind


def _split_copy(world, tmp_path, *args):
    """A copy of the world's train split (the commands write beside its files), and the
    result of `setok data ARGS... SPLIT` run on it (None without args)."""
    import shutil
    split = tmp_path / "train"
    shutil.copytree(world / "train", split)
    if not args:
        return split, None
    r = CliRunner().invoke(cli, ["data", *args, str(split)])
    assert r.exit_code == 0, r.output
    return split, r


def test_setok_data_referring_by_shape_and_colour(world, tmp_path):
    import numpy as np
    from PIL import Image

    from setok_cli.data.formats import load
    split, _ = _split_copy(world, tmp_path)
    for by in ("shape", "color"):
        r = CliRunner().invoke(cli, ["data", "referring", str(split), "--by", by])
        assert r.exit_code == 0, r.output
        entries = load(split / f"referring_{by}.json", "referring")     # a valid SPEC referring file
        want = 0
        for p in load(split / "pairs.json", "pairs"):                   # brute force: objects `by` singles out
            objs = json.loads(open(p["scene"]).read())["objects"]
            want += sum(len(objs) > 1 and sum(q[by] == o[by] for q in objs) == 1 for o in objs)
        assert len(entries) == want > 0
        for e in entries:
            objs = {o["id"]: o for o in json.loads(open(e["scene"]).read())["objects"]}
            o = objs[e["object"]]
            assert e["expression"] == (f"the {o['shape']}" if by == "shape" else f"the {o['color']} object")
            assert sum(q[by] == o[by] for q in objs.values()) == 1
            inst = np.asarray(Image.open(str(e["image"]).replace("/images/", "/instances/")))
            assert np.array_equal(np.asarray(Image.open(e["mask"])) > 127, inst == e["object"])
    r = CliRunner().invoke(cli, ["data", "referring", str(tmp_path / "nope")])
    assert r.exit_code == 2 and _error_lines(r.output) and "pairs.json" in r.output


def test_describe_by_shape_known_text():
    from setok_cli.data.shapes_text import describe_by_shape
    objs = [{"shape": s, "color": c} for s, c in (("diamond", "orange"), ("hexagon", "red"), ("ellipse", "blue"),
                                                   ("hexagon", "green"), ("hexagon", "red"))]
    assert describe_by_shape(objs) == "A diamond in orange; three hexagons in red, red and green; an ellipse in blue."
    assert describe_by_shape([{"shape": "cross", "color": "pink"}]) == "A cross in pink."


def test_setok_data_describe_by_shape(world, tmp_path):
    import re

    from setok_cli.data.formats import load
    from setok_cli.data.shapes import NUMBER_WORDS, PLURALS
    split, _ = _split_copy(world, tmp_path, "describe")
    entries = load(split / "describe_shape.json", "instruct")           # a valid SPEC instruct file
    pairs = load(split / "pairs.json", "pairs")
    assert [e["image"] for e in entries] == [p["image"] for p in pairs]
    singular = {p: s for s, p in PLURALS.items()}
    for e, p in zip(entries, pairs):
        (human, gpt) = e["conversations"]
        assert human["value"] == "<image>\nList the objects by shape." and e["type"] == "describe"
        got = []                                                        # read the text back: (shape, colour) each
        for part in gpt["value"].rstrip(".").split("; "):
            m = re.fullmatch(r"(\w+) (\w+) in (.+)", part)
            count = 1 if m.group(1).lower() in ("a", "an") else NUMBER_WORDS.index(m.group(1).lower())
            shape = singular.get(m.group(2), m.group(2))
            colors = re.split(r", | and ", m.group(3))
            assert len(colors) == count
            got += [(shape, c) for c in colors]
        objs = json.loads(open(p["scene"]).read())["objects"]
        assert sorted(got) == sorted((o["shape"], o["color"]) for o in objs)
    r = CliRunner().invoke(cli, ["data", "describe", str(tmp_path / "nope")])
    assert r.exit_code == 2 and _error_lines(r.output) and "pairs.json" in r.output


def _answer(objs: list[dict], kind: str, q: str) -> str:
    """The scene's answer to a question of the world's words, worked out independently of
    `all_questions` (the oracle of the dense question set)."""
    import re

    from setok_cli.data.shapes import PLURALS
    from setok_cli.data.shapes_text import referring_expression
    singular = {p: s for s, p in PLURALS.items()}
    if kind == "color":
        (o,) = [o for o in objs if o["shape"] == re.fullmatch(r"What color is the (\w+)\?", q).group(1)]
        return o["color"]
    if kind == "shape":
        (o,) = [o for o in objs if o["color"] == re.fullmatch(r"What shape is the (\w+) object\?", q).group(1)]
        return o["shape"]
    if kind == "count":
        if q == "How many objects are there?":
            return str(len(objs))
        m = re.fullmatch(r"How many (?:(\w+) objects|(\w+)) are there\?", q)
        if m.group(1):
            return str(sum(o["color"] == m.group(1) for o in objs))
        return str(sum(o["shape"] == singular[m.group(2)] for o in objs))
    if kind == "exist":
        c, s = re.fullmatch(r"Is there an? (\w+) (\w+)\?", q).groups()
        return "yes" if any(o["color"] == c and o["shape"] == s for o in objs) else "no"
    names = {referring_expression(objs, i): o for i, o in enumerate(objs)}
    m = re.fullmatch(r"Is (the .+) (to the left of|to the right of|above|below) (the .+)\?", q)
    a, b = names[m.group(1)], names[m.group(3)]
    dx, dy = b["center"][0] - a["center"][0], b["center"][1] - a["center"][1]
    truth = {"to the left of": dx > 0, "to the right of": dx < 0, "above": dy > 0, "below": dy < 0}[m.group(2)]
    return "yes" if truth else "no"


def test_setok_data_questions_every_answer_is_the_scenes(world, tmp_path):
    from collections import Counter

    from setok_cli.data.formats import load
    split, _ = _split_copy(world, tmp_path, "questions")
    entries = load(split / "instruct_all.json", "instruct")             # a valid SPEC instruct file
    few = Counter(e["image"] for e in load(split / "instruct.json", "instruct"))
    many = Counter(e["image"] for e in entries)
    assert set(many) == set(few) and all(many[k] > few[k] for k in few)
    scenes = {p["image"]: json.loads(open(p["scene"]).read())["objects"] for p in load(split / "pairs.json", "pairs")}
    seen = Counter()
    for e in entries:
        (human, gpt) = e["conversations"]
        q = human["value"].removeprefix("<image>\n")
        assert gpt["value"] == _answer(scenes[e["image"]], e["type"], q), (e, scenes[e["image"]])
        seen[e["type"], gpt["value"] in ("no", "0")] += 1
    for kind in ("color", "shape"):                   # every object its shape (colour) singles out is asked about
        key = "shape" if kind == "color" else "color"
        want = sum(sum(p[key] == o[key] for p in objs) == 1 for objs in scenes.values() for o in objs)
        assert seen[kind, False] == want
    assert seen["exist", True] and seen["exist", False] and seen["count", True]      # negatives and zeros too
    first = (split / "instruct_all.json").read_bytes()
    assert CliRunner().invoke(cli, ["data", "questions", str(split)]).exit_code == 0
    assert (split / "instruct_all.json").read_bytes() == first                      # seeded
    r = CliRunner().invoke(cli, ["data", "questions", str(tmp_path / "nope")])
    assert r.exit_code == 2 and _error_lines(r.output) and "pairs.json" in r.output


def test_setok_data_questions_types_keeps_those_kinds(world, tmp_path):
    split, _ = _split_copy(world, tmp_path, "questions")
    every = json.loads((split / "instruct_all.json").read_text())
    r = CliRunner().invoke(cli, ["data", "questions", str(split), "--types", "relation, count"])
    assert r.exit_code == 0, r.output
    some = json.loads((split / "instruct_count_relation.json").read_text())
    assert some == [e for e in every if e["type"] in ("count", "relation")] and some
    assert json.loads((split / "instruct_all.json").read_text()) == every            # left as it was
    r = CliRunner().invoke(cli, ["data", "questions", str(split), "--types", "count,size"])
    assert r.exit_code != 0 and _error_lines(r.output) and "'size'" in r.output
    assert not (split / "instruct_count_size.json").exists() and not (split / "instruct_count.json").exists()


def test_setok_data_questions_absent_asks_every_missing_colour_and_shape(world, tmp_path):
    """--absent N: count questions about N absent colours and N absent shapes per image (all of
    them when fewer are missing), each answered 0 by the scene (the oracle above)."""
    import re

    from setok_cli.data.shapes import COLOR_NAMES, PLURALS, SHAPES
    split, _ = _split_copy(world, tmp_path, "questions")
    r = CliRunner().invoke(cli, ["data", "questions", str(split), "--types", "count", "--absent", "20"])
    assert r.exit_code == 0, r.output
    from setok_cli.data.formats import load
    entries = load(split / "instruct_count_absent20.json", "instruct")
    pairs = {p["image"]: json.loads(open(p["scene"]).read())["objects"] for p in load(split / "pairs.json", "pairs")}
    singular = {p: s for s, p in PLURALS.items()}
    by_image: dict[str, list[str]] = {}
    for e in entries:
        q = e["conversations"][0]["value"].removeprefix("<image>\n")
        objs = pairs[e["image"]]
        assert e["type"] == "count" and e["conversations"][1]["value"] == _answer(objs, "count", q)
        by_image.setdefault(e["image"], []).append(q)
    for name, qs in by_image.items():          # every colour and every shape asked once, and the total
        colours = {m.group(1) for q in qs if (m := re.fullmatch(r"How many (\w+) objects are there\?", q))}
        shapes = {singular[m.group(1)] for q in qs if (m := re.fullmatch(r"How many (\w+) are there\?", q))
                  and m.group(1) != "objects"}
        assert colours == set(COLOR_NAMES) and shapes == set(SHAPES) and len(qs) == len(COLOR_NAMES) + len(SHAPES) + 1
    assert len(by_image) == len(pairs)
    r = CliRunner().invoke(cli, ["data", "questions", str(split), "--types", "count", "--absent", "-1"])
    assert r.exit_code == 2 and "'--absent': -1 is not in the range x>=0" in r.output
    assert not (split / "instruct_count_absent-1.json").exists()


def _explained_one_kind(split, plain, tmp_path, kind, qtype):
    """`setok data explain --kinds KIND` of the split's instruct_all.json: its entries, checked
    to leave every question type but `qtype` as `plain` has it."""
    r = CliRunner().invoke(cli, ["data", "explain", str(split / "instruct_all.json"), "--kinds", kind,
                                 "--out", str(tmp_path / f"{kind}.json")])
    assert r.exit_code == 0, r.output
    out = json.loads((tmp_path / f"{kind}.json").read_text())
    assert [e for e in out if e["type"] != qtype] == [e for e in plain if e["type"] != qtype]
    return out


def test_setok_data_explain_states_both_places(world, tmp_path):
    """`setok data explain`: the same entries, each relation answer the two objects' place bins
    (checked against the scenes by hand, not by `place_bin`) and then the plain answer, each
    count by colour or shape and each existence question the objects of the asked colour, each
    colour question the objects in reading order up to the asked one; the other answers as
    they were; --kinds keeps the others plain; a file outside a split is one line and writes
    nothing."""
    import re

    from setok_cli.data.formats import load
    from setok_cli.data.shapes_text import final_answer, referring_expression
    from setok_cli.data.shapes_world import PLURALS
    split, _ = _split_copy(world, tmp_path, "questions")
    for src in ("instruct_all.json", "instruct.json"):
        r = CliRunner().invoke(cli, ["data", "explain", str(split / src)])
        assert r.exit_code == 0, r.output
    plain = json.loads((split / "instruct_all.json").read_text())
    said = load(split / "instruct_all_explained.json", "instruct")
    assert len(said) == len(plain) and any(e["type"] == "relation" for e in said)
    assert any(e["type"] == "count" and ", " in e["conversations"][1]["value"] for e in said)
    assert any(e["type"] == "exist" and e["conversations"][1]["value"].endswith(": no") for e in said)
    assert any(e["type"] == "color" and e["conversations"][1]["value"].count(", ") >= 2 for e in said)
    assert any(e["type"] == "color" and ", " not in e["conversations"][1]["value"] for e in said)
    scenes = {p["image"]: json.loads(open(p["scene"]).read())["objects"] for p in load(split / "pairs.json", "pairs")}
    for e, p in zip(said, plain):
        assert e["conversations"][0] == p["conversations"][0] and e["id"] == p["id"]
        a, q = e["conversations"][1]["value"], e["conversations"][0]["value"]
        assert final_answer(a) == p["conversations"][1]["value"]
        objs = scenes[e["image"]]
        counted = re.fullmatch(r"<image>\nHow many (?:(\w+) objects|(\w+)) are there\?", q)
        if e["type"] == "count" and counted.group(2) != "objects" and a != "0":
            listed = [tuple(x.split()[1:]) for x in a.rsplit(": ", 1)[0].split(", ")]  # "a red circle" -> (red, circle)
            want = [(o["color"], o["shape"]) for o in objs if counted.group(1) in (None, o["color"])
                    and counted.group(2) in (None, o["shape"] + "s", "crosses" if o["shape"] == "cross" else "")]
            assert sorted(listed) == sorted(want) and a.endswith(f": {len(want)}"), (q, a, objs)
            continue
        exists = re.fullmatch(r"<image>\nIs there an? (\w+) (\w+)\?", q)
        if e["type"] == "exist" and a != "no":
            listed = [tuple(x.split()[1:]) for x in a.rsplit(": ", 1)[0].split(", ")]
            assert sorted(listed) == sorted((o["color"], o["shape"]) for o in objs if o["color"] == exists.group(1))
            continue
        if e["type"] == "color":                         # top row first, then left to right, up to the asked one
            listed = [tuple(x.split()[1:]) for x in a.rsplit(": ", 1)[0].split(", ")]
            rows = sorted(objs, key=lambda o: (int(o["center"][1] * 16), o["center"][0]))
            asked = re.fullmatch(r"<image>\nWhat color is the (\w+)\?", q).group(1)
            upto = next(i for i, o in enumerate(rows) if o["shape"] == asked)
            assert listed == [(o["color"], o["shape"]) for o in rows[:upto + 1]], (a, objs)
            assert a.endswith(": " + rows[upto]["color"])
            continue
        if e["type"] == "exist":                         # a plain "no": no object of that colour
            assert all(o["color"] != exists.group(1) for o in objs)
            continue
        if e["type"] != "relation":
            assert a == p["conversations"][1]["value"]
            continue
        na, rel, nb = re.fullmatch(r"<image>\nIs (the .+) (to the left of|to the right of|above|below) (the .+)\?",
                                   q).groups()
        m = re.fullmatch(r"(the .+) at (\d), (the .+) at (\d): (yes|no)", a)
        assert m and (m.group(1), m.group(3)) == (na, nb), a
        names = {referring_expression(objs, i): o for i, o in enumerate(objs)}
        axis = 0 if "of" in rel else 1
        for name, digit in ((na, m.group(2)), (nb, m.group(4))):
            v = names[name]["center"][axis]
            assert int(digit) / 7 <= v < (int(digit) + 1) / 7, (name, v, digit)
    assert (split / "instruct_explained.json").is_file()
    r = CliRunner().invoke(cli, ["data", "explain", str(split / "instruct_all.json"), "--kinds", "relation",
                                 "--out", str(tmp_path / "rel.json")])
    assert r.exit_code == 0, r.output
    only = json.loads((tmp_path / "rel.json").read_text())
    assert [e for e in only if e["type"] != "relation"] == [e for e in plain if e["type"] != "relation"]
    every = json.loads((split / "instruct_all_explained.json").read_text())
    assert [e for e in only if e["type"] == "relation"] == [e for e in every if e["type"] == "relation"]
    # exist_shape: existence by the objects of the asked shape, in reading order, the other kinds plain
    by_shape = _explained_one_kind(split, plain, tmp_path, "exist_shape", "exist")
    n_listed = 0
    for e, p in zip(by_shape, plain):
        if e["type"] != "exist":
            continue
        a = e["conversations"][1]["value"]
        c, sh = re.fullmatch(r"<image>\nIs there an? (\w+) (\w+)\?", e["conversations"][0]["value"]).groups()
        objs = next(v for k, v in scenes.items() if k.endswith("/" + e["image"]))
        rows = sorted(objs, key=lambda o: (int(o["center"][1] * 16), o["center"][0]))
        want = [(o["color"], o["shape"]) for o in rows if o["shape"] == sh]
        truth = "yes" if (c, sh) in want else "no"
        assert p["conversations"][1]["value"] == truth
        if not want:
            assert a == "no"
            continue
        listed = [tuple(x.split()[1:]) for x in a.rsplit(": ", 1)[0].split(", ")]
        assert listed == want and a.endswith(": " + truth), (a, want)
        n_listed += 1
    assert n_listed and any(e["conversations"][1]["value"] == "no" for e in by_shape if e["type"] == "exist")
    r = CliRunner().invoke(cli, ["data", "explain", str(split / "instruct_all.json"), "--kinds", "exist,exist_shape"])
    assert r.exit_code != 0 and _error_lines(r.output) and "choose one" in r.output
    # exist_echo: the same lists, then the asked colour once more before the answer; a plain "no" stays plain
    by_echo = _explained_one_kind(split, plain, tmp_path, "exist_echo", "exist")
    n_echo = 0
    for e, s in zip(by_echo, by_shape):
        a, listed = e["conversations"][1]["value"], s["conversations"][1]["value"]
        if e["type"] != "exist" or listed == "no":
            assert a == listed
            continue
        c = re.fullmatch(r"<image>\nIs there an? (\w+) (\w+)\?", e["conversations"][0]["value"]).group(1)
        head, word = listed.rsplit(": ", 1)
        assert a == f"{head}, {c}: {word}", (a, listed)
        n_echo += 1
    assert n_echo
    # relation_order: above / below by the objects in reading order up to the first of the two; left / right plain
    by_order = _explained_one_kind(split, plain, tmp_path, "relation_order", "relation")
    n_vertical = 0
    for e, p in zip(by_order, plain):
        if e["type"] != "relation":
            continue
        a, truth = e["conversations"][1]["value"], p["conversations"][1]["value"]
        na, rel, nb = re.fullmatch(r"<image>\nIs (the .+) (to the left of|to the right of|above|below) (the .+)\?",
                                   e["conversations"][0]["value"]).groups()
        if "of" in rel:
            assert a == truth
            continue
        objs = next(v for k, v in scenes.items() if k.endswith("/" + e["image"]))
        names = {referring_expression(objs, i): o for i, o in enumerate(objs)}
        rows = sorted(objs, key=lambda o: (int(o["center"][1] * 16), o["center"][0]))
        first = min(rows.index(names[na]), rows.index(names[nb]))
        listed = [tuple(x.split()[1:]) for x in a.rsplit(": ", 1)[0].split(", ")]
        assert listed == [(o["color"], o["shape"]) for o in rows[:first + 1]] and a.endswith(": " + truth), a
        upper = names[na] if names[na]["center"][1] < names[nb]["center"][1] else names[nb]
        assert rows[first] is upper                     # the one met first is the upper one
        n_vertical += 1
    assert n_vertical
    r = CliRunner().invoke(cli, ["data", "explain", str(split / "instruct_all.json"), "--kinds",
                                 "relation,relation_order"])
    assert r.exit_code != 0 and _error_lines(r.output) and "choose one" in r.output
    # exist_all, count_all: existence and every count (the total too) after the scene's objects in reading order
    for kind, qtype in (("exist_all", "exist"), ("count_all", "count")):
        by_scene = _explained_one_kind(split, plain, tmp_path, kind, qtype)
        n_no = 0
        for e, p in zip(by_scene, plain):
            if e["type"] != qtype:
                continue
            a, truth = e["conversations"][1]["value"], p["conversations"][1]["value"]
            objs = next(v for k, v in scenes.items() if k.endswith("/" + e["image"]))
            rows = sorted(objs, key=lambda o: (int(o["center"][1] * 16), o["center"][0]))
            listed = [tuple(x.split()[1:]) for x in a.rsplit(": ", 1)[0].split(", ")]
            assert listed == [(o["color"], o["shape"]) for o in rows] and a.endswith(": " + truth), a
            n_no += truth in ("no", "0")
        assert n_no and any(": 0" in e["conversations"][1]["value"] or ": no" in e["conversations"][1]["value"]
                            for e in by_scene)
    r = CliRunner().invoke(cli, ["data", "explain", str(split / "instruct_all.json"), "--kinds",
                                 "exist_shape,exist_all"])
    assert r.exit_code != 0 and _error_lines(r.output) and "choose one" in r.output
    r = CliRunner().invoke(cli, ["data", "explain", str(split / "instruct_all.json"), "--kinds", "count,count_all"])
    assert r.exit_code != 0 and _error_lines(r.output) and "choose one" in r.output
    # count_numbered: a count of a colour or shape numbers the objects it lists, in reading order; the total stays
    by_number = _explained_one_kind(split, plain, tmp_path, "count_numbered", "count")
    n_two = 0
    for e, p in zip(by_number, plain):
        if e["type"] != "count":
            continue
        a, truth = e["conversations"][1]["value"], p["conversations"][1]["value"]
        m = re.fullmatch(r"<image>\nHow many (?:(\w+) objects|(\w+)) are there\?", e["conversations"][0]["value"])
        if m.group(2) == "objects" or truth == "0":
            assert a == truth
            continue
        objs = next(v for k, v in scenes.items() if k.endswith("/" + e["image"]))
        rows = sorted(objs, key=lambda o: (int(o["center"][1] * 16), o["center"][0]))
        want = [f"{o['color']} {o['shape']} {k}" for k, o in enumerate(
            (o for o in rows if o["color"] == m.group(1) or PLURALS[o["shape"]] == m.group(2)), 1)]
        assert [x.split(" ", 1)[1] for x in a.rsplit(": ", 1)[0].split(", ")] == want and a.endswith(": " + truth), a
        n_two += int(truth) >= 2
    assert n_two
    # count_scene: every object of the scene in reading order, a running count after each counted one
    by_scene = _explained_one_kind(split, plain, tmp_path, "count_scene", "count")
    n_zero = 0
    for e, p in zip(by_scene, plain):
        a, truth = e["conversations"][1]["value"], p["conversations"][1]["value"]
        m = re.fullmatch(r"<image>\nHow many (?:(\w+) objects|(\w+)) are there\?", e["conversations"][0]["value"])
        if e["type"] != "count" or m.group(2) == "objects":
            assert a == truth
            continue
        objs = next(v for k, v in scenes.items() if k.endswith("/" + e["image"]))
        rows = sorted(objs, key=lambda o: (int(o["center"][1] * 16), o["center"][0]))
        k, want = 0, []
        for o in rows:
            hit = o["color"] == m.group(1) or PLURALS[o["shape"]] == m.group(2)
            k += hit
            want.append(f"{o['color']} {o['shape']}" + (f" {k}" if hit else ""))
        assert [x.split(" ", 1)[1] for x in a.rsplit(": ", 1)[0].split(", ")] == want and a.endswith(": " + truth), a
        n_zero += truth == "0"
    assert n_zero
    r = CliRunner().invoke(cli, ["data", "explain", str(split / "instruct_all.json"), "--kinds",
                                 "count,count_numbered"])
    assert r.exit_code != 0 and _error_lines(r.output) and "choose one" in r.output
    r = CliRunner().invoke(cli, ["data", "explain", str(split / "instruct_all.json"), "--kinds", "size"])
    assert r.exit_code != 0 and _error_lines(r.output) and "'size'" in r.output
    r = CliRunner().invoke(cli, ["data", "explain", str(tmp_path / "nope.json")])
    assert r.exit_code != 0 and _error_lines(r.output)
    (tmp_path / "loose.json").write_text(json.dumps(plain[:3]))
    r = CliRunner().invoke(cli, ["data", "explain", str(tmp_path / "loose.json")])
    assert r.exit_code != 0 and _error_lines(r.output) and not (tmp_path / "loose_explained.json").exists()


def test_caption_in_reading_order_known_text():
    from setok_cli.data.shapes_text import caption_in_reading_order
    o = lambda c, s, x, y: {"color": c, "shape": s, "center": [x, y]}               # noqa: E731
    objs = [o("red", "circle", 0.8, 0.9), o("blue", "star", 0.7, 0.1), o("red", "circle", 0.1, 0.5),
            o("green", "cross", 0.2, 0.12)]        # rows of 16: 14, 1, 8, 1 -> star (x 0.7) after cross (x 0.2)
    text = "A picture of four objects: two red circles, a blue star and a green cross."
    assert caption_in_reading_order(text, objs) == \
        "A picture of four objects: a green cross, a blue star and two red circles."
    assert caption_in_reading_order(text, objs, rows=1) == \
        "A picture of four objects: two red circles, a green cross and a blue star."
    with pytest.raises(ValueError):
        caption_in_reading_order("no list here", objs)


def test_setok_data_reading(world, tmp_path):
    import re

    from setok_cli.data.formats import load
    from setok_cli.data.shapes import NUMBER_WORDS, PLURALS
    split, _ = _split_copy(world, tmp_path, "reading")
    pairs, reading = load(split / "pairs.json", "pairs"), load(split / "pairs_reading.json", "pairs")   # valid SPEC
    assert [p["image"] for p in pairs] == [p["image"] for p in reading]
    singular = {p: s for s, p in PLURALS.items()}
    moved = 0
    for p, q in zip(pairs, reading):
        assert p["caption"].rpartition(": ")[0] == q["caption"].rpartition(": ")[0]          # the same prefix
        objs = json.loads(open(p["scene"]).read())["objects"]
        firsts, got = [], []                    # each phrase: the reading-order rank of its group's first object
        rank = sorted(range(len(objs)), key=lambda i: (int(objs[i]["center"][1] * 16), objs[i]["center"][0]))
        for part in re.split(r", | and ", q["caption"].rpartition(": ")[2].rstrip(".")):
            k, c, s = part.split(" ")
            n = 1 if k in ("a", "an") else NUMBER_WORDS.index(k)
            s = singular.get(s, s)
            got += [(c, s)] * n
            firsts.append(min(rank.index(i) for i in range(len(objs))
                              if (objs[i]["color"], objs[i]["shape"]) == (c, s)))
        assert sorted(got) == sorted((o["color"], o["shape"]) for o in objs)                 # the same facts
        assert firsts == sorted(firsts)                                                        # in reading order
        assert q["phrases"] == [f"{objs[i]['color']} {objs[i]['shape']}" for i in rank]
        moved += p["caption"] != q["caption"]
    assert moved > 0
    for args in (["reading", str(tmp_path / "nope")], ["reading", str(split), "--rows", "0"]):
        r = CliRunner().invoke(cli, ["data", *args])
        assert r.exit_code == 2 and _error_lines(r.output), r.output


def test_setok_data_edits_each_target_is_its_instruction(world, tmp_path):
    """Every added edit: its target scene is the source's with exactly the named change, its
    PNG is that scene rendered, the world's own edits come first, and the file is seeded."""
    import numpy as np
    from PIL import Image

    from setok_cli.data.formats import load
    from setok_cli.data.shapes import render
    split, r = _split_copy(world, tmp_path, "edits", "--per-image", "2")
    own = load(split / "edits.json", "edits")
    entries = load(split / "edits_all.json", "edits")                   # a valid SPEC edits file
    n_images = len(load(split / "pairs.json", "pairs"))
    assert entries[:len(own)] == own and len(entries) == len(own) + 2 * n_images and f"{len(entries)} edits" in r.output
    ops = set()
    for e in entries[len(own):]:
        src = json.loads((split / e["source_scene"]).read_text())["objects"]
        tgt_rec = json.loads((split / e["target_scene"]).read_text())
        tgt, op, words = tgt_rec["objects"], e["edit"]["op"], e["instruction"].rstrip(".").split()
        key = lambda o: (o["shape"], o["color"], tuple(o["center"]))            # noqa: E731
        ops.add(op)
        if op == "remove":
            assert len(tgt) == len(src) - 1 and words[0] == "Remove"
            gone = src[e["edit"]["object"] - 1]
            assert sorted(map(key, tgt)) == sorted(key(o) for o in src if o is not gone)
        elif op == "add":
            assert len(tgt) == len(src) + 1 and words[0] == "Add"
            assert tgt[-1]["shape"] in words and tgt[-1]["color"] in words
        elif op == "recolor":
            i = e["edit"]["object"] - 1
            assert [key(o) for k, o in enumerate(tgt) if k != i] == [key(o) for k, o in enumerate(src) if k != i]
            assert tgt[i]["color"] != src[i]["color"] and words[-1] == tgt[i]["color"] and words[0] == "Make"
        else:
            i = e["edit"]["object"] - 1
            assert op == "move" and words[0] == "Move" and tgt[i]["center"] != src[i]["center"]
            assert [(o["shape"], o["color"]) for o in tgt] == [(o["shape"], o["color"]) for o in src]
        scene = {"background": tgt_rec["background"],
                 "objects": [{k: o[k] for k in ("shape", "color", "center", "size")} for o in tgt]}
        png = np.asarray(Image.open(split / e["target"]).convert("RGB"))
        assert np.array_equal(png, render(scene, tgt_rec["size"]).image)
    assert len(ops) >= 3
    first = (split / "edits_all.json").read_bytes()
    assert CliRunner().invoke(cli, ["data", "edits", str(split), "--per-image", "2"]).exit_code == 0
    assert (split / "edits_all.json").read_bytes() == first                          # seeded
    for args in ([str(tmp_path / "nope")], [str(split), "--per-image", "0"]):
        r = CliRunner().invoke(cli, ["data", "edits", *args])
        assert r.exit_code == 2 and len(_error_lines(r.output)) == 1 and "Traceback" not in r.output


def test_setok_data_drills_answer_from_the_list(world, tmp_path):
    """`setok data drills`: every answer is whether the asked colour is in the question's list (of the
    asked shape, one to three objects), both answers occur, each "no" is a near miss; the entries load as
    instruct training items with their split's images; the same seed writes the same file; bad input is
    one line and writes nothing."""
    import re

    from setok_cli.data.conversations import ConversationDataset
    from setok_cli.data.formats import load
    from setok_cli.data.shapes_world import COLOR_NAMES, SHAPES
    split, r = _split_copy(world, tmp_path, "drills", "--per-image", "3")
    path = split / "instruct_list_drills.json"
    assert f"-> {path}" in r.output
    drills = json.loads(path.read_text())
    images = {p["image"] for p in json.loads((split / "pairs.json").read_text())}
    assert len(drills) == 3 * len(images) and {e["image"] for e in drills} == images
    answers = []
    for e in drills:
        q, a = (t["value"] for t in e["conversations"])
        c, s, listed = re.fullmatch(r"<image>\nIs there an? (\w+) (\w+)\? (.+)", q).groups()
        items = [tuple(x.split()) for x in listed.split(", ")]
        assert 1 <= len(items) <= 3 and c in COLOR_NAMES and s in SHAPES
        assert all(art in ("a", "an") and col in COLOR_NAMES and sh == s for art, col, sh in items), q
        assert a == ("yes" if c in [col for _, col, _ in items] else "no"), (q, a)
        answers.append(a)
    assert set(answers) == {"yes", "no"}
    ds = ConversationDataset(path, task="instruct", image_size=32)
    assert len(ds) == len(drills) and ds[0]["conversations"][1]["value"] in ("yes", "no")
    assert len(load(path, "instruct")) == len(drills)
    first = path.read_bytes()
    assert CliRunner().invoke(cli, ["data", "drills", str(split), "--per-image", "3"]).exit_code == 0
    assert path.read_bytes() == first
    r = CliRunner().invoke(cli, ["data", "drills", str(split), "--per-image", "3", "--seed", "1"])
    assert r.exit_code == 0 and path.read_bytes() != first
    path.unlink()
    r = CliRunner().invoke(cli, ["data", "drills", str(split), "--per-image", "0"])
    assert r.exit_code == 2 and not path.exists()
    r = CliRunner().invoke(cli, ["data", "drills", str(tmp_path / "nope")])
    assert r.exit_code != 0 and _error_lines(r.output) and not (tmp_path / "nope").exists()


def test_setok_data_drills_relations_compare_the_written_places(world, tmp_path):
    """`setok data drills --relations N`: the same existence drills, then N relation drills per image whose answer is
    the asked relation between the two written places (0: left / top), never a tie, both answers and all four
    relations occurring; the words are those a looking answer with places writes, the visual tokens left out between
    `[Img]` and `[/Img]`; the chain form counts from A's place toward B's."""
    import re

    from setok_cli.data.shapes_text import PLACE_BINS
    from setok_cli.data.shapes_world import COLOR_NAMES, SHAPES
    split, _ = _split_copy(world, tmp_path, "drills", "--per-image", "2", "--form", "echo")
    plain = json.loads((split / "instruct_list_drills_echo.json").read_text())
    r = CliRunner().invoke(cli, ["data", "drills", str(split), "--per-image", "2", "--form", "echo",
                                 "--relations", "40", "--relation-form", "places"])
    path = split / "instruct_list_drills_echo_relation_places.json"
    assert r.exit_code == 0 and f"-> {path}" in r.output
    rows = json.loads(path.read_text())
    assert [e for e in rows if e["type"] == "drill"] == plain
    rel = [e for e in rows if e["type"] == "drill_relation"]
    assert len(rel) == 40 * len({e["image"] for e in plain})
    seen, answers = set(), []
    for e in rel:
        q, a = (t["value"] for t in e["conversations"])
        ca, sa, how, cb, sb = re.fullmatch(r"<image>\nIs the (\w+) (\w+) (to the left of|to the right of|above|"
                                           r"below) the (\w+) (\w+)\?", q).groups()
        assert {ca, cb} <= set(COLOR_NAMES) and {sa, sb} <= set(SHAPES) and (ca, sa) != (cb, sb)
        pa, pb, word = re.fullmatch(r"\[Img\] \[/Img\] (\d) \[Img\] \[/Img\] (\d): (yes|no)", a).groups()
        pa, pb = int(pa), int(pb)
        assert pa != pb and max(pa, pb) < PLACE_BINS
        holds = pa < pb if how in ("to the left of", "above") else pa > pb
        assert word == ("yes" if holds else "no"), (q, a)
        seen.add(how)
        answers.append(word)
    assert seen == {"to the left of", "to the right of", "above", "below"}
    assert 0.35 < answers.count("yes") / len(answers) < 0.65
    r = CliRunner().invoke(cli, ["data", "drills", str(split), "--per-image", "2", "--form", "echo",
                                 "--relations", "40"])                 # the default form: counted from A's place
    chained = json.loads((split / "instruct_list_drills_echo_relation.json").read_text())
    assert [e for e in chained if e["type"] == "drill"] == plain
    assert [e["conversations"][0] for e in chained] == [e["conversations"][0] for e in rows]
    assert r.exit_code == 0
    for e, p in zip([e for e in chained if e["type"] == "drill_relation"], rel):
        q, a = (t["value"] for t in e["conversations"])
        assert a.startswith(p["conversations"][1]["value"].rsplit(": ", 1)[0] + ", ")
        pa, pb, counted, word = re.fullmatch(r"\[Img\] \[/Img\] (\d) \[Img\] \[/Img\] (\d), ([\d ]+): (yes|no)",
                                             a).groups()
        steps = [int(x) for x in counted.split()]
        up = " above " in q or " to the left of " in q
        assert steps == list(range(int(pa), int(pb) + 1) if word == "yes" and up else range(
            int(pa), int(pb) - 1, -1) if word == "yes" else range(int(pa), 7) if up else range(int(pa), -1, -1))
    r = CliRunner().invoke(cli, ["data", "drills", str(split), "--per-image", "2", "--form", "echo",
                                 "--relations", "40", "--counts", "3"])   # then 3 count drills per image
    counted = json.loads((split / "instruct_list_drills_echo_relation_count.json").read_text())
    assert r.exit_code == 0 and [e for e in counted if e["type"] != "drill_count"] == chained
    cnt = [e for e in counted if e["type"] == "drill_count"]
    assert len(cnt) == 3 * len(plain) // 2 and all(
        re.fullmatch(r"<image>\nHow many \w+( objects)? are there\?", e["conversations"][0]["value"]) for e in cnt)
    r = CliRunner().invoke(cli, ["data", "drills", str(split), "--relations", "-1"])
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_setok_data_drills_forms_write_the_same_drills_elsewhere(world, tmp_path):
    """`setok data drills --form answer|echo`: the same drills (same seed) with the list written first in the answer
    (echo: then the asked colour again), to its own file; the question form's file is untouched."""
    import re
    split, _ = _split_copy(world, tmp_path, "drills", "--per-image", "2")
    plain = json.loads((split / "instruct_list_drills.json").read_text())
    for form in ("answer", "echo"):
        r = CliRunner().invoke(cli, ["data", "drills", str(split), "--per-image", "2", "--form", form])
        path = split / f"instruct_list_drills_{form}.json"
        assert r.exit_code == 0 and f"-> {path}" in r.output
        rows = json.loads(path.read_text())
        assert [e["id"] for e in rows] == [e["id"] for e in plain] and [e["image"] for e in rows] == \
            [e["image"] for e in plain]
        for e, p in zip(rows, plain):
            q, a = (t["value"] for t in e["conversations"])
            pq, pa = (t["value"] for t in p["conversations"])
            asked, listed = re.fullmatch(r"(<image>\nIs there an? \w+ \w+\?) (.+)", pq).groups()
            colour = asked.split()[-2]
            assert q == asked and a == (f"{listed}: {pa}" if form == "answer" else f"{listed}, {colour}: {pa}")
    assert json.loads((split / "instruct_list_drills.json").read_text()) == plain
    r = CliRunner().invoke(cli, ["data", "drills", str(split), "--form", "list"])
    assert r.exit_code == 2 and "Traceback" not in r.output
