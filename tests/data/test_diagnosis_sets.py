"""The question sets of the relation diagnosis (benchmarks/side_questions.py, relation_probe.py)."""
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _module(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_side_questions_answer_each_scene(world, tmp_path):
    import shutil

    from setok_cli.data.formats import load
    from setok_cli.data.shapes_text import referring_expression
    split = tmp_path / "train"                                   # the script writes beside the split's files
    shutil.copytree(world / "train", split)
    r = subprocess.run([sys.executable, str(BENCH / "side_questions.py"), str(split)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    entries = load(split / "instruct_side.json", "instruct")           # a valid SPEC instruct file
    assert entries and {e["conversations"][1]["value"] for e in entries} == {"yes", "no"}
    for e in entries:
        stem, k = re.fullmatch(r"(\d+)_s(\d+)", e["id"]).groups()
        objs = json.loads((split / "scenes" / f"{stem}.json").read_text())["objects"]
        name, side = re.fullmatch(r"<image>\nIs (.+) at the (\w+)\?", e["conversations"][0]["value"]).groups()
        assert referring_expression(objs, int(k)) == name
        x, y = objs[int(k)]["center"]
        v, low = (y, "top") if side in ("top", "bottom") else (x, "left")
        assert abs(v - 0.5) > 0.1
        assert e["conversations"][1]["value"] == ("yes" if (v < 0.5) == (side == low) else "no"), (e, objs[int(k)])
    r = subprocess.run([sys.executable, str(BENCH / "side_questions.py"), str(world / "nope")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def test_relation_probe_questions_known_scene():
    from setok_cli.data.shapes import COLOR_NAMES, SHAPES
    probe = _module("relation_probe")
    red = {"color": "red", "shape": "circle", "center": [0.2, 0.3]}
    blue = {"color": "blue", "shape": "square", "center": [0.8, 0.32]}      # level with red: no above / below
    twin = [{"color": "green", "shape": "star", "center": [0.5, 0.9]}] * 2  # named twice: never asked about
    qs = probe.questions([{"objects": [red, blue, *twin]}])
    C, S = len(COLOR_NAMES), len(SHAPES)
    got = {(q[0], q[1], q[2 + 0] - C - S, q[3]): yes for _, q, yes, _ in qs}
    r, c, b, s = COLOR_NAMES.index("red"), SHAPES.index("circle"), COLOR_NAMES.index("blue"), SHAPES.index("square")
    assert got == {(r, C + c, 0, b): 1, (r, C + c, 1, b): 0, (b, C + s, 0, r): 0, (b, C + s, 1, r): 1}
    side = probe.questions([{"objects": [red, blue]}], "side")
    # red: left (x 0.2) and top (y 0.3); blue: right; its y 0.32 is 0.18 from the middle, so top too
    assert {(q[0], q[2] - C - S - 4, yes) for _, q, yes, _ in side} == {
        (r, 0, 1), (r, 1, 0), (r, 2, 1), (r, 3, 0), (b, 0, 0), (b, 1, 1), (b, 2, 1), (b, 3, 0)}


def test_question_sensitivity_sets_known_scene():
    """The benchmark asks the world's own questions: a lookup by shape for each shape one
    object has, by colour for each colour one object has, and "is there" with near misses."""
    qs = _module("question_sensitivity")
    objs = [{"color": "red", "shape": "circle", "center": [0.2, 0.3]},
            {"color": "blue", "shape": "circle", "center": [0.8, 0.7]},
            {"color": "red", "shape": "star", "center": [0.5, 0.5]}]
    sets = qs.question_sets(objs, ("color", "shape", "exist"))
    assert sets["color"] == [("What color is the star?", "red")]          # two circles: never asked by shape
    assert sets["shape"] == [("What shape is the blue object?", "circle")]
    exist = dict(sets["exist"])
    assert {q for q, a in exist.items() if a == "yes"} == {"Is there a red circle?", "Is there a blue circle?",
                                                            "Is there a red star?"}
    for q, a in exist.items():
        if a == "no":                                                      # a near miss: one word off a present object
            c, s = re.fullmatch(r"Is there an? (\w+) (\w+)\?", q).groups()
            assert (c, s) not in {(o["color"], o["shape"]) for o in objs}
            assert any(o["color"] == c or o["shape"] == s for o in objs)
    assert qs.question_sets(objs, ("color",)) == {"color": sets["color"]}


def test_relation_places_scores_the_written_places(world):
    from setok_cli.data.formats import load
    from setok_cli.data.shapes_text import RELATION_QUESTION
    from setok_cli.models.setokim.look import look_objects, relation_places
    mod = _module("relation_places")
    path = world / "train" / "instruct.json"
    entries = [e for e in load(path, "instruct") if e["type"] == "relation"]
    assert entries
    preds, untied = [], 0
    for k, e in enumerate(entries):               # every other question: the true places, else the first one off
        objs = json.loads((world / "train" / "scenes" / Path(e["image"]).with_suffix(".json").name).read_text())[
            "objects"]
        q = e["conversations"][0]["value"].replace("<image>", " ")
        a, b = relation_places(q, objs, look_objects("relation", q, objs, resolve=True))
        a = a if k % 2 == 0 else (a + 3) % 7
        holds = {"to the left of": a < b, "to the right of": a > b, "above": a < b, "below": a > b}[
            RELATION_QUESTION.search(q).group(2)]
        untied += a != b
        preds.append({"question_id": e["id"], "answer": "yes" if holds else "no",
                      "reasons": f"<image> {a} <image> {b}: {'yes' if holds else 'no'}"})
    c = mod.score(load(path, "instruct"), preds, path.parent)
    n = len(entries)
    assert c["questions"] == c["places_given"] == n
    assert c["first_place"] == (n + 1) // 2 and c["second_place"] == n and c["first_within_1"] == (n + 1) // 2
    assert c["untied"] == untied and c["follows_places"] == untied                 # each answer as its places say
    truth = sum(p["answer"] == e["conversations"][1]["value"] for p, e in zip(preds, entries))
    assert c["right"] == truth and c["answered_yes"] == sum(p["answer"] == "yes" for p in preds)
    assert c["chained"] == c["chain_follows"] == 0
    # `look_places: chain`: the places before the ", ", then the count; every third count written one step short
    from setok_cli.data.drills import relation_chain
    chained = []
    for k, (e, p) in enumerate(zip(entries, preds)):
        head, word = p["reasons"].rsplit(": ", 1)
        a, b = (int(w) for w in head.split()[1::2])
        steps = relation_chain(RELATION_QUESTION.search(e["conversations"][0]["value"]).group(2), a, b)
        steps = steps[:-1] if k % 3 == 0 and len(steps) > 1 else steps
        chained.append({**p, "reasons": f"{head}, {' '.join(map(str, steps))}: {word}"})
    short = sum(1 for k, e in enumerate(entries) if k % 3 == 0 and len(relation_chain(RELATION_QUESTION.search(
        e["conversations"][0]["value"]).group(2), *(int(w) for w in preds[k]["reasons"].rsplit(": ", 1)[0].split()[
            1::2]))) > 1)
    d = mod.score(load(path, "instruct"), chained, path.parent)
    assert {k: d[k] for k in c} == {**c, "chained": n, "chain_follows": n - short} and short


def test_drill_lr_probe_scores_relation_drills_after_their_places():
    """benchmarks/drill_lr_probe.py `exact`: a model that writes every answer token but the two random places right
    scores 1, one that misses one token of the count scores 0 on that row; `relation_batch` labels the chain."""
    import numpy as np
    import torch

    from setok_cli.data.shapes_world import COLOR_NAMES, SHAPES
    from setok_cli.models.setokim import build_word_tokenizer
    from setok_cli.models.setokim.text import IGNORE_INDEX
    mod = _module("drill_lr_probe")
    tok = build_word_tokenizer(extra_texts=["Is the to of left right above below yes no , : 0 1 2 3 4 5 6"] + [
        f"{c} {s}" for c in COLOR_NAMES for s in SHAPES])
    tok.add_tokens(["[Img]", "[/Img]"], special_tokens=True)
    batch = mod.relation_batch(np.random.default_rng(0), 8, tok, chain=True)
    ids, att, lab = batch
    assert ((lab != IGNORE_INDEX).sum(1) > mod.PLACES + 3).all()

    class Oracle(torch.nn.Module):          # the next input token, except at the places (and at `miss`)
        def __init__(self, miss=None):
            super().__init__()
            self.miss = miss

        def forward(self, input_ids, attention_mask):
            logits = torch.zeros(*input_ids.shape, len(tok))
            logits[:, :-1].scatter_(-1, input_ids[:, 1:, None], 1.0)
            counted = (lab[:, 1:] != IGNORE_INDEX).long().cumsum(1)
            places = (counted >= 1) & (counted <= mod.PLACES) & (lab[:, 1:] != IGNORE_INDEX)
            logits[:, :-1][places] = torch.roll(logits[:, :-1][places], 1, -1)      # every place wrong
            if self.miss is not None:
                r, t = self.miss
                logits[r, t] = torch.roll(logits[r, t], 1, -1)
            return type("Out", (), {"logits": logits})()
    assert mod.exact(Oracle(), batch) == 1.0
    assert mod.exact(Oracle(), batch, skip=0) == 0.0
    last = int((lab[0] != IGNORE_INDEX).nonzero().max()) - 2               # a token of the count: not a place
    assert mod.exact(Oracle((0, last)), batch) == 7 / 8


def test_count_drills_and_the_probe_scoring_them():
    """`count_drill`: the running count after each object of the asked colour or shape, the final number the count;
    benchmarks/drill_lr_probe.py `count_scores`: a model that writes every step right scores 1 whatever it writes for
    the random objects; one that writes a number where no object is counted (or misses the final number) fails."""
    import re

    import numpy as np
    import torch

    from setok_cli.data.drills import count_drill
    from setok_cli.data.shapes_world import COLOR_NAMES, PLURALS, SHAPES
    from setok_cli.models.setokim import build_word_tokenizer
    from setok_cli.models.setokim.text import IGNORE_INDEX
    rng, finals = np.random.default_rng(0), []
    for _ in range(300):
        q, a = count_drill(rng)
        m = re.fullmatch(r"How many (?:(\w+) objects|(\w+)) are there\?", q)
        head, final = a.rsplit(": ", 1)
        k = 0
        for ph in head.split(", "):
            words = ph.split()                       # "a red circle" or "a red circle 2"
            hit = words[1] == m.group(1) if m.group(1) else PLURALS[words[2]] == m.group(2)
            k += hit
            assert (len(words) == 4) == hit and (not hit or words[3] == str(k)), (q, a)
        finals.append(int(final))
        assert int(final) == k
    assert {0, 1, 2, 3} <= set(finals)

    mod = _module("drill_lr_probe")
    tok = build_word_tokenizer(extra_texts=["How many objects are there , : 0 1 2 3 4 5 6 7 8 9"] + [
        f"{c} {s} {PLURALS[s]}" for c in COLOR_NAMES for s in SHAPES])
    batch = mod.count_batch(np.random.default_rng(1), 16, tok)
    ids, att, lab = batch
    digits = torch.tensor([tok.convert_tokens_to_ids(tok.tokenize(w))[0] for w in "0123456789"])
    shapes = torch.tensor([tok.convert_tokens_to_ids(tok.tokenize(w))[0] for w in SHAPES])

    class Model(torch.nn.Module):          # the next input token; the objects' words wrong; optionally one slip
        def __init__(self, slip=None):
            super().__init__()
            self.slip = slip

        def forward(self, input_ids, attention_mask):
            logits = torch.zeros(*input_ids.shape, len(tok))
            logits[:, :-1].scatter_(-1, input_ids[:, 1:, None], 1.0)
            words = ~torch.isin(input_ids[:, 1:], digits) & ~torch.isin(input_ids[:, :-1], shapes)
            logits[:, :-1][words & (lab[:, 1:] != IGNORE_INDEX)] = 0.0
            logits[:, :-1][words & (lab[:, 1:] != IGNORE_INDEX), 0] = 1.0       # some other word
            if self.slip is not None:
                r, t, tid = self.slip
                logits[r, t] = 0.0
                logits[r, t, tid] = 1.0
            return type("Out", (), {"logits": logits})()
    assert mod.count_scores(Model(), batch, digits, shapes) == (1.0, 1.0)
    row = next(r for r in range(16) if not torch.isin(ids[r, 1:][lab[r, 1:] != IGNORE_INDEX][:-3], digits).all())
    pos = (lab[row, 1:] != IGNORE_INDEX).nonzero().flatten()
    after = [int(t) for t in pos if ids[row, t] in shapes and not torch.isin(lab[row, t + 1], digits)]
    final, steps = mod.count_scores(Model((row, after[0], int(digits[7]))), batch, digits, shapes)
    assert final == 1.0 and steps == 15 / 16           # a number where no object is counted
    last = int(pos.max()) - 1
    final, steps = mod.count_scores(Model((row, last, int(digits[9]))), batch, digits, shapes)
    assert final == 15 / 16 and steps == 15 / 16


def test_scene_list_cases_splits_seeing_from_reading():
    """benchmarks/scene_list_cases.py: a right list with a wrong answer, a wrong list read right, the same
    objects in another order, and a plain answer with no list, each counted where it belongs."""
    mod = _module("scene_list_cases")
    scene = "a red circle, a blue star, a red star"

    def entry(i, q, a):
        return {"id": str(i), "image": "x.png", "type": "exist" if q.startswith("Is") else "count",
                "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]}
    entries = [entry(0, "Is there a blue star?", scene + ": yes"),
               entry(1, "How many red objects are there?", scene + ": 2"),
               entry(2, "How many stars are there?", scene + ": 2"),
               entry(3, "How many objects are there?", scene + ": 3"),
               entry(4, "Is there a red star?", scene + ": yes")]
    said = ["a red circle, a blue star, a red star: no",          # the list right, the answer not read from it
            "a red circle, a blue star: 1",                        # an object missed, the answer read from the list
            "a red star, a red circle, a blue star: 2",            # the same objects in another order, right
            "a red circle, a blue star, a red star: 3",            # exact and right
            "yes"]                                                 # no list
    preds = [{"question_id": str(i), "answer": s.rsplit(": ", 1)[-1], "reasons": s} for i, s in enumerate(said)]
    got = mod.score(entries, preds)
    assert got["exist"] == {"questions": 2, "right": 1, "list_exact": 1, "list_as_set": 1, "follows_list": 0,
                            "right_if_exact": 0}
    assert got["colour"] == {"questions": 1, "right": 0, "list_exact": 0, "list_as_set": 0, "follows_list": 1,
                             "right_if_exact": 0}
    assert got["shape"] == {"questions": 1, "right": 1, "list_exact": 0, "list_as_set": 1, "follows_list": 1,
                            "right_if_exact": 0}
    assert got["objects"] == {"questions": 1, "right": 1, "list_exact": 1, "list_as_set": 1, "follows_list": 1,
                              "right_if_exact": 1}


def test_drill_lr_probe_batches_and_scores(tmp_path):
    """benchmarks/drill_lr_probe.py: the answer position holds the drill's yes / no, the score follows a model that
    always says one of them, and a two-step run over a tiny LM folder writes its table."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from setok_cli.data.drills import list_drill
    from setok_cli.data.shapes_world import COLOR_NAMES, SHAPES
    from setok_cli.models.setokim import build_word_tokenizer
    from setok_cli.models.setokim.text import IGNORE_INDEX
    mod = _module("drill_lr_probe")
    tok = build_word_tokenizer(extra_texts=["Is there a an yes no , ?"] + [f"{c} {s}s" for c in COLOR_NAMES
                                                                           for s in SHAPES])
    yes, no = (tok.convert_tokens_to_ids(tok.tokenize(w))[0] for w in ("yes", "no"))
    ids, att, lab = mod.drill_batch(np.random.default_rng(3), 16, tok)
    answers = [list_drill(np.random.default_rng(3))[1]]        # the first drill, drawn again
    first = (lab != IGNORE_INDEX).float().argmax(1)
    assert lab[0, first[0]].item() == (yes if answers[0] == "yes" else no)
    assert set(lab[torch.arange(16), first].tolist()) <= {yes, no}
    assert (att.sum(1) > first).all() and ids[0, first[0]].item() == lab[0, first[0]].item()
    n_yes = (lab[torch.arange(16), first] == yes).sum().item()

    class Always(torch.nn.Module):
        def __init__(self, word):
            super().__init__()
            self.word = word

        def forward(self, input_ids, attention_mask):
            logits = torch.zeros(*input_ids.shape, len(tok))
            logits[..., self.word] = 1.0
            return type("Out", (), {"logits": logits})()

    assert mod.accuracy(Always(yes), (ids, att, lab), yes, no) == n_yes / 16
    assert mod.accuracy(Always(no), (ids, att, lab), yes, no) == 1 - n_yes / 16

    folder = tmp_path / "setokim"
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder / "lm")
    tok.save_pretrained(folder / "tokenizer")
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, str(BENCH / "drill_lr_probe.py"), "--model", str(folder), "--recipe",
                        str(BENCH.parent / "recipes/tiny/stage3.yaml"), "--lr", "1e-3", "--steps", "2", "--every",
                        "1", "--batch", "4"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "| 0.001 |" in r.stdout and "held-out accuracy" in r.stdout
    r = subprocess.run([sys.executable, str(BENCH / "drill_lr_probe.py"), "--model", str(folder), "--full",
                        "--no-system", "--lr", "1e-3", "--steps", "2", "--batch", "4", "--out", str(out),
                        "--save", str(tmp_path / "drilled")], capture_output=True, text=True, cwd=BENCH.parent)
    assert r.returncode == 0, r.stderr
    saved = json.loads(out.read_text())
    assert saved["full"] and not saved["system"] and [s["step"] for s in saved["results"]["0.001"]] == [0, 2]
    drilled = LlamaForCausalLM.from_pretrained(tmp_path / "drilled" / "lm")     # the drilled LM, the rest copied
    before = LlamaForCausalLM.from_pretrained(folder / "lm")
    assert (tmp_path / "drilled" / "tokenizer").is_dir()
    assert any(not torch.equal(a, b) for a, b in zip(drilled.parameters(), before.parameters()))


def test_drill_lr_probe_scores_the_recipe_phase(tmp_path):
    """drill_lr_probe --recipe-phase: the recipe's model.text_first (its rows file, steps, lr, batch) trained by setok's
    own train_text_first, scored on the held-out drills at step 0, every --every steps and at the last."""
    import argparse

    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from setok_cli.data.drills import drill_turns, list_drill
    from setok_cli.data.shapes_world import COLOR_NAMES, SHAPES
    from setok_cli.models.setokim import build_word_tokenizer
    from setok_cli.train.recipe import load_recipe
    mod = _module("drill_lr_probe")
    tok = build_word_tokenizer(extra_texts=["Is there a an yes no , ? :"] + [f"{c} {s}s" for c in COLOR_NAMES
                                                                             for s in SHAPES])
    rng = np.random.default_rng(0)
    rows = [dict(zip(("q", "a"), drill_turns(*list_drill(rng), "echo"))) for _ in range(20)]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"id": str(i), "conversations": [{"from": "human", "value": r["q"]},
                                                                 {"from": "gpt", "value": r["a"]}]}
                                for i, r in enumerate(rows)]))
    recipe = load_recipe(BENCH.parent / "recipes/tiny/stage3.yaml",
                         [f"model.text_first={{path: {path}, steps: 5, lr: 1.0e-3, batch_size: 4}}"])
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128))
    held = mod.drill_batch(np.random.default_rng(1), 16, tok, form="echo")
    args = argparse.Namespace(every=2, seed=0, system="", recipe=None)
    out = mod.recipe_phase(lm, tok, recipe, args, held)
    assert [r["step"] for r in out] == [0, 2, 4, 5] and all(0 <= r["accuracy"] <= 1 for r in out)
    with pytest.raises(SystemExit):
        mod.recipe_phase(lm, tok, load_recipe(BENCH.parent / "recipes/tiny/stage3.yaml", ["model.text_first=null"]),
                         args, held)


def test_drill_lr_probe_forms_put_the_list_where_named():
    """drill_lr_probe's --form: the same drill with its list in the question, first in the answer, or in the answer
    with the asked colour again; the scored position is the yes / no in each."""
    import numpy as np
    import torch

    from setok_cli.data.drills import FORMS, drill_turns, list_drill
    from setok_cli.data.shapes_world import COLOR_NAMES, SHAPES
    from setok_cli.models.setokim import build_word_tokenizer
    from setok_cli.models.setokim.text import IGNORE_INDEX
    mod = _module("drill_lr_probe")
    q, a = "Is there a red cross? a pink cross, a blue cross", "no"
    assert drill_turns(q, a, "question") == (q, a)
    assert drill_turns(q, a, "answer") == ("Is there a red cross?", "a pink cross, a blue cross: no")
    assert drill_turns(q, a, "echo") == ("Is there a red cross?", "a pink cross, a blue cross, red: no")
    tok = build_word_tokenizer(extra_texts=["Is there a an yes no , ? :"] + [f"{c} {s}s" for c in COLOR_NAMES
                                                                             for s in SHAPES])
    yes, no = (tok.convert_tokens_to_ids(tok.tokenize(w))[0] for w in ("yes", "no"))
    for form in FORMS:
        ids, att, lab = mod.drill_batch(np.random.default_rng(5), 8, tok, form=form)
        truth = [list_drill(np.random.default_rng(5))[1]]
        L = lab.shape[1]
        last = L - 1 - (lab != IGNORE_INDEX).flip(1).float().argmax(1)
        assert lab[0, last[0] - 1].item() == (yes if truth[0] == "yes" else no)
        assert set(lab[torch.arange(8), last - 1].tolist()) <= {yes, no}
        assert ((lab != IGNORE_INDEX).sum(1) > 2).all() == (form != "question")


def test_near_miss_rows_balance_the_answers_after_a_list():
    """benchmarks/near_miss_rows.py: every "no" after a list kept, as many "yes" after a list, plain answers dropped."""
    mod = _module("near_miss_rows")

    def entry(i, a):
        return {"id": f"{i:03d}", "image": "x.png", "type": "exist",
                "conversations": [{"from": "human", "value": "<image>\nIs there a red cross?"},
                                  {"from": "gpt", "value": a}]}
    entries = ([entry(i, "a pink cross, red: no") for i in range(3)] + [entry(10 + i, "a red cross, red: yes")
                                                                      for i in range(7)] + [entry(20, "no")])
    rows = mod.near_miss_rows(entries, seed=1)
    answers = [r["conversations"][1]["value"] for r in rows]
    assert answers.count("a pink cross, red: no") == 3 and answers.count("a red cross, red: yes") == 3
    assert "no" not in answers and [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    assert mod.near_miss_rows(entries, seed=1) == rows
