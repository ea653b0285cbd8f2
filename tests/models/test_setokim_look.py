"""Answers that look first (models/setokim/look.py): which objects each question type looks up
(hand-made scenes), the answers and the data set over the tiny world, the stage rows' targets
against an independent overlap count, and `setok ask` letting a looking model write tokens."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from setok_cli.data.conversations import ConversationDataset, collate_conversations_batch
from setok_cli.errors import UserError
from setok_cli.models.setokim.attend import object_tokens
from setok_cli.models.setokim.look import (look_answer, look_entry, look_objects, looked_picture, looks_at,
                                           relation_places)

pytestmark = pytest.mark.usefixtures("one_thread")     # tiny models: see tests/conftest.py

SCENE = [{"id": 1, "color": "red", "shape": "circle", "center": [0.2, 0.2]},
         {"id": 2, "color": "blue", "shape": "circle", "center": [0.8, 0.2]},
         {"id": 3, "color": "blue", "shape": "star", "center": [0.5, 0.8]},
         {"id": 4, "color": "green", "shape": "hexagon", "center": [0.1, 0.9]}]


def test_each_question_type_looks_up_its_objects():
    assert look_objects("color", "What color is the hexagon?", SCENE) == [3]
    assert look_objects("shape", "What shape is the red object?", SCENE) == [0]
    assert look_objects("count", "How many circles are there?", SCENE) == [0, 1]
    assert look_objects("count", "How many blue objects are there?", SCENE) == [1, 2]
    assert look_objects("count", "How many objects are there?", SCENE) == [0, 1, 2, 3]
    # existence: the objects of the asked shape, whatever their colour; none of it: nothing
    assert look_objects("exist", "Is there a green circle?", SCENE) == [0, 1]
    assert look_objects("exist", "Is there a yellow square?", SCENE) == []
    assert look_objects("exist", "Is there a green object?", SCENE) == [3]
    # a relation: its two objects in the question's order (not sorted)
    assert look_objects("relation", "Is the blue star below the red circle?", SCENE) == [2, 0]
    assert look_objects("relation", "Is the red circle above the blue star?", SCENE) == [0, 2]
    assert look_answer("blue", 1) == "<image>: blue"
    assert look_answer("a blue circle, a red circle: yes", 2) == "<image> <image> a blue circle, a red circle: yes"
    assert look_answer("no", 0) == "no"


def test_look_entry_rewrites_each_answer_turn(tmp_path):
    (tmp_path / "scenes").mkdir()
    (tmp_path / "instances").mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "scenes" / "000001.json").write_text(json.dumps({"objects": SCENE}))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "instances" / "000001.png")
    e = {"id": "q", "image": str(tmp_path / "images" / "000001.png"), "type": "relation",
         "conversations": [{"from": "human", "value": "<image>\nIs the blue star below the red circle?"},
                           {"from": "gpt", "value": "yes"},
                           {"from": "human", "value": "Is the red circle above the blue star?"},
                           {"from": "gpt", "value": "yes"}]}
    got, look = look_entry(e)
    assert [t["value"] for t in got["conversations"]] == [e["conversations"][0]["value"], "<image> <image>: yes",
                                                          e["conversations"][2]["value"], "<image> <image>: yes"]
    assert look == {"instances": str(tmp_path / "instances" / "000001.png"), "turns": [[3, 1], [1, 3]]}
    assert e["conversations"][1]["value"] == "yes"                      # the entry itself is not changed
    # only the listed question types look; the others keep their answers
    assert look_entry(e, ["color", "count"]) == ({**e, "conversations": [dict(t) for t in e["conversations"]]},
                                                 {"instances": look["instances"], "turns": [[], []]})
    assert look_entry(e, ["relation"])[0] == got
    away = {**e, "image": str(tmp_path / "elsewhere.png")}
    assert look_entry(away) == (away, None)


def test_relation_answers_write_each_objects_place_on_the_compared_axis(tmp_path):
    # two red circles: a superlative picks one (centre x 0.2 is the leftmost; centre y 0.9 the bottommost)
    scene = SCENE + [{"id": 5, "color": "red", "shape": "circle", "center": [0.6, 0.9]}]
    q = "Is the leftmost red circle above the blue star?"
    assert look_objects("relation", q, scene) == [0, 4, 2]                    # unresolved: both circles
    assert look_objects("relation", q, scene, resolve=True) == [0, 2]
    assert look_objects("relation", "Is the bottommost red circle left of the blue star?", scene,
                        resolve=True) == [4, 2]
    assert look_objects("relation", "Is the blue star below the rightmost red circle?", scene,
                        resolve=True) == [2, 4]
    # bins of 1/7 along y for above / below (0.2 -> 1, 0.8 -> 5), along x for left / right (0.6 -> 4, 0.5 -> 3)
    assert relation_places(q, scene, [0, 2]) == [1, 5]
    assert relation_places("Is the red object to the right of the blue star?", scene, [4, 2]) == [4, 3]
    assert relation_places("What color is the star?", scene, [2]) is None
    assert relation_places(q, scene, [0, 4, 2]) is None
    assert look_answer("yes", 2, [1, 5]) == "<image> 1 <image> 5: yes"
    (tmp_path / "scenes").mkdir()
    (tmp_path / "instances").mkdir()
    (tmp_path / "scenes" / "000001.json").write_text(json.dumps({"objects": scene}))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "instances" / "000001.png")
    e = {"id": "q", "image": str(tmp_path / "images" / "000001.png"), "type": "relation",
         "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": "yes"}]}
    got, look = look_entry(e, places=True)
    assert got["conversations"][1]["value"] == "<image> 1 <image> 5: yes" and look["turns"] == [[1, 3]]
    # "chain": the places counted from the first toward where the second must lie, up for above / left of
    assert look_entry(e, places="chain") == ({**got, "conversations": [e["conversations"][0], {
        "from": "gpt", "value": "<image> 1 <image> 5, 1 2 3 4 5: yes"}]}, look)
    below = {**e, "conversations": [{"from": "human", "value": "<image>\nIs the leftmost red circle below the blue "
                                                                "star?"}, {"from": "gpt", "value": "no"}]}
    assert look_entry(below, places="chain")[0]["conversations"][1]["value"] == "<image> 1 <image> 5, 1 0: no"
    right = {**e, "conversations": [{"from": "human", "value": "<image>\nIs the blue star to the right of the green "
                                                                "hexagon?"}, {"from": "gpt", "value": "yes"}]}
    assert look_entry(right, places="chain")[0]["conversations"][1]["value"] == "<image> 3 <image> 0, 3 2 1 0: yes"
    assert look_entry(e)[0]["conversations"][1]["value"] == "<image> <image> <image>: yes"   # as before
    cnt = {**e, "type": "count", "conversations": [{"from": "human", "value": "<image>\nHow many circles are there?"},
                                                    {"from": "gpt", "value": "3"}]}
    assert look_entry(cnt, numbers=True)[0]["conversations"][1]["value"] == "<image> 1 <image> 2 <image> 3: 3"
    assert look_entry(cnt, places=True)[0]["conversations"][1]["value"] == "<image> <image> <image>: 3"
    # "count_by": counts of one colour or shape look, "How many objects" keeps its plain answer
    assert look_entry(cnt, ["count_by"])[0]["conversations"][1]["value"] == "<image> <image> <image>: 3"
    red = {**cnt, "conversations": [{"from": "human", "value": "<image>\nHow many red objects are there?"},
                                    {"from": "gpt", "value": "2"}]}
    two = {"from": "gpt", "value": "<image> <image>: 2"}
    assert look_entry(red, ["count_by"]) == ({**red, "conversations": [red["conversations"][0], two]},
                                             {"instances": look["instances"], "turns": [[1, 5]]})
    pink = {**cnt, "conversations": [{"from": "human", "value": "<image>\nHow many pink objects are there?"},
                                     {"from": "gpt", "value": "0"}]}
    assert look_entry(pink, ["count_by"])[0]["conversations"][1]["value"] == "0"            # nothing to write
    every = {**cnt, "conversations": [{"from": "human", "value": "<image>\nHow many objects are there?"},
                                      {"from": "gpt", "value": "5"}]}
    assert look_entry(every, ["count_by"])[0]["conversations"][1]["value"] == "5"
    assert look_entry(every, ["count"])[0]["conversations"][1]["value"] == "<image> " * 4 + "<image>: 5"
    assert looks_at("count", "How many hexagons are there?", ["count_by"])
    assert not looks_at("count", "How many objects are there?", ["count_by", "color"])
    assert not looks_at("color", "What color is the star?", ["count_by"])
    assert looks_at("color", "What color is the star?", None)
    col = {**e, "type": "color", "conversations": [{"from": "human", "value": "<image>\nWhat color is the star?"},
                                                    {"from": "gpt", "value": "blue"}]}
    assert look_entry(col, places=True, numbers=True)[0]["conversations"][1]["value"] == "<image>: blue"

    # `scan`: a looking count keeps its plain answer and marks its turn with the counted objects (the answer is
    # written per image in the stage rows: tests/models/test_setokim_scan.py)
    colours, shapes = [o["color"] for o in scene], [o["shape"] for o in scene]
    assert look_entry(red, ["count_by"], scan=True) == (red, {"instances": look["instances"],
                                                               "turns": [{"scan": [1, 5], "words": colours}]})
    assert look_entry(pink, ["count_by"], scan=True)[1]["turns"] == [{"scan": [], "words": colours}]
    assert look_entry(cnt, ["count_by"], scan=True)[1]["turns"] == [{"scan": [1, 2, 5], "words": shapes}]
    assert look_entry(every, ["count_by"], scan=True)[1]["turns"] == [[]]               # "objects": plain
    assert look_entry(every, ["count"], scan=True)[1]["turns"] == [{"scan": [1, 2, 3, 4, 5], "words": None}]
    assert look_entry(col, ["color"], scan=True)[1]["turns"] == [[3]]                   # only counts scan


@pytest.fixture(scope="module")
def instruct(stage2_world):
    return stage2_world / "shapes" / "train" / "instruct.json"


@pytest.fixture(scope="module")
def model(place_setokim, instruct):
    return place_setokim(instruct, positions=512, place_input=True)


def test_the_data_set_writes_one_mark_per_looked_up_object(instruct):
    from setok_cli.data.formats import load
    entries = load(instruct, "instruct")
    ds = ConversationDataset(instruct, "instruct", 32, look=True)
    plain = ConversationDataset(instruct, "instruct", 32)
    kinds = set()
    for i in range(len(ds)):
        it, e = ds[i], entries[i]
        scene = Path(ds.looks[i]["instances"].replace("/instances/", "/scenes/")).with_suffix(".json")
        objs = json.loads(scene.read_text())["objects"]
        answers = [t["value"] for t in it["conversations"] if t["from"] == "gpt"]
        assert [a.count("<image>") for a in answers] == [len(ids) for ids in it["look"]["turns"]]
        for ids, a, p in zip(it["look"]["turns"], answers, [t["value"] for t in plain[i]["conversations"]
                                                            if t["from"] == "gpt"]):
            assert a.rsplit(": ", 1)[-1] == p.rsplit(": ", 1)[-1]             # the scored answer is kept
            named = [objs[k - 1] for k in ids]
            q = it["conversations"][0]["value"].lower()
            if e["type"] in ("color", "shape"):                          # the named object(s), of its words
                assert named and all(o["shape"] in q or o["color"] in q for o in named)
            if e["type"] == "count" and ids:
                assert str(len(ids)) == p
            if e["type"] == "exist" and p.endswith("yes"):
                assert named
            kinds.add(e["type"])
    assert {"color", "shape", "count", "exist", "relation"} <= kinds
    chat = ConversationDataset(instruct, "chat", 32, turns=3, look=True)
    for i in range(len(chat)):
        it = chat[i]
        answers = [t["value"] for t in it["conversations"] if t["from"] == "gpt"]
        assert [a.count("<image>") for a in answers] == [len(ids) for ids in it["look"]["turns"]]
        assert sum(t["value"].count("<image>") for t in it["conversations"] if t["from"] == "human") == 1
    counts_plain = ConversationDataset(instruct, "instruct", 32, look=["color", "shape", "exist", "relation"])
    for i in range(len(ds)):
        want = plain[i] if entries[i]["type"] == "count" else ds[i]
        assert counts_plain[i]["conversations"] == want["conversations"]
    by = ConversationDataset(instruct, "instruct", 32, look=["color", "shape", "exist", "relation", "count_by"])
    every = [i for i in range(len(ds)) if entries[i]["conversations"][0]["value"].endswith("many objects are there?")]
    for i in range(len(ds)):                       # counts of a colour or shape look; "How many objects" does not
        want = plain[i] if i in every else ds[i]
        assert by[i]["conversations"] == want["conversations"]
    assert every and len(every) < sum(e["type"] == "count" for e in entries)
    placed = ConversationDataset(instruct, "instruct", 32, look=True, look_places=True)
    rel = [i for i in range(len(ds)) if entries[i]["type"] == "relation"]
    for i in rel:                                  # the same tokens and answer, with a bin 0..6 after each token
        words = placed[i]["conversations"][1]["value"].rsplit(": ", 1)[0].split()
        assert words[0::2] == ["<image>"] * 2 and all(w in "0123456" for w in words[1::2])
        assert placed[i]["conversations"][1]["value"].endswith(plain[i]["conversations"][1]["value"])
    assert rel and all(placed[i]["conversations"] == ds[i]["conversations"] for i in range(len(ds)) if i not in rel)
    chained = ConversationDataset(instruct, "instruct", 32, look=["relation"], look_places="chain")
    for i in rel:                                  # the places counted end at the second one exactly when it holds
        words = chained[i]["conversations"][1]["value"]
        places, counted = words.rsplit(": ", 1)[0].split(", ")
        a, b = (int(w) for w in places.split()[1::2])
        steps = [int(w) for w in counted.split()]
        assert steps[0] == a and all(abs(x - y) == 1 for x, y in zip(steps, steps[1:]))
        assert words.rsplit(": ", 1)[1] == plain[i]["conversations"][1]["value"]
        if a != b:
            assert (steps[-1] == b) == (words.endswith("yes")), words
    assert all(chained[i]["conversations"] == plain[i]["conversations"] for i in range(len(ds)) if i not in rel)
    for bad in ({"look_places": True}, {"look": True, "look_places": "yes"}):
        with pytest.raises(UserError, match="look_places is true, false or chain and needs look"):
            ConversationDataset(instruct, "instruct", 32, **bad)
    numbered = ConversationDataset(instruct, "instruct", 32, look=True, look_numbers=True)
    cnt = [i for i in range(len(ds)) if entries[i]["type"] == "count" and ds[i]["look"]["turns"][0]]
    for i in cnt:                                  # the count is the last of the numbers 1 .. n
        words = numbered[i]["conversations"][1]["value"].rsplit(": ", 1)[0].split()
        assert words[1::2] == [str(k) for k in range(1, len(words) // 2 + 1)] and words[-1] == plain[i][
            "conversations"][1]["value"]
    assert cnt and all(numbered[i]["conversations"] == ds[i]["conversations"] for i in range(len(ds))
                       if entries[i]["type"] != "count")
    with pytest.raises(UserError, match="look_numbers is true or false and needs look"):
        ConversationDataset(instruct, "instruct", 32, look_numbers=True)
    from setok_cli.data.conversations import recipe_mixture                 # the recipe row option
    mix = recipe_mixture([{"task": "instruct", "path": str(instruct), "weight": 1.0, "look": True,
                           "look_places": True}], 32)
    assert [mix.sets[0][i]["conversations"] for i in rel] == [placed[i]["conversations"] for i in rel]
    for task, look in (("segment", True), ("instruct", "yes"), ("instruct", ["colour"]), ("chat", [])):
        path = instruct.parent / "referring.json" if task == "segment" else instruct
        with pytest.raises(UserError, match="look is for the instruct and chat tasks"):
            ConversationDataset(path, task, 32, look=look)


def test_stage_rows_write_the_looked_up_source_tokens(model, instruct, overlap_oracle):
    from setok_cli.train.stage2 import Stage2Model
    ds = ConversationDataset(instruct, "chat", 32, turns=3, look=True)
    items = [ds[i] for i in range(6)]
    batch = collate_conversations_batch(items)
    sm = Stage2Model(model)
    seen = {}
    real = model.collate

    def spy(samples):
        seen["samples"] = samples
        return real(samples)
    model.collate = spy
    try:
        out = sm(batch)
    finally:
        del model.collate
    looked = sum(len(ids) for it in items for ids in it["look"]["turns"])
    assert looked > 0 and out["visual_tokens"].item() == pytest.approx(looked / len(items))
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["visual"])
    out["loss"].backward()
    # each written token is the source token holding most of its object's pixels (oracle: area per token)
    srcs = [np.asarray(Image.open(it["look"]["instances"].replace("/instances/", "/images/")).convert("RGB"))
            for it in items]
    tok = model.setok.tokenize(srcs)
    sets = model.token_sets_of(tok)
    for j, (it, s) in enumerate(zip(items, seen["samples"])):
        inst_map = np.asarray(Image.open(it["look"]["instances"]))
        ids = [k for turn in it["look"]["turns"] for k in turn]
        assert len(s["images"]) == 1 + len(ids) and torch.allclose(s["images"][0].float(), sets[j].float(), atol=1e-5)
        for k, written in zip(ids, s["images"][1:]):
            want = tok.tokens[j, int(overlap_oracle(tok, j, inst_map, k).argmax())]
            assert written.shape == (1, want.shape[0]) and torch.allclose(written[0].float(), want.float())
            assert int(object_tokens(model, tok, j, inst_map)[k]) in range(sets[j].shape[0])
        assert len(s["seeds"]) == len(s["images"])


def test_ask_lets_a_looking_model_write_tokens(stage3_runs, monkeypatch):
    import setok_cli.tasks.setokim as tasks
    from setok_cli.models.setokim.generate import Generated
    m = tasks.load_setokim(stage3_runs["stage3"])
    img = sorted((stage3_runs["world"] / "shapes" / "test" / "images").glob("*.png"))[0]
    seen = []

    def fake(*a, **k):
        seen.append(k)
        return [Generated(text="<image>: blue", ids=[], images=[], seeds=[])]
    monkeypatch.setattr(m, "generate", fake)
    assert m.config.look_answers is False
    tasks.ask(m, [img], ["What color is the hexagon?"])
    m.config.look_answers = True
    assert tasks.ask(m, [img], ["What color is the hexagon?"]) == ["<image>: blue"]
    assert seen[0]["text_only"] is True
    assert seen[1]["text_only"] is False and seen[1]["max_visual_tokens"] == 1 and seen[1]["place"] == "draw"
    K = m.image_token_sets([img])[0].shape[0]          # room for a scan of every token, whatever max_new_tokens
    assert seen[0]["max_new_tokens"] == 48 and seen[1]["max_new_tokens"] == max(48, 3 * K + 4)
    tasks.ask(m, [img], ["How many circles are there?"], tasks.Sampling(max_new_tokens=2))
    assert seen[2]["max_new_tokens"] == 3 * K + 4
    monkeypatch.undo()
    got = tasks.ask(m, [img, img], ["What color is the hexagon?", "How many objects are there?"],
                    tasks.Sampling(max_new_tokens=12))
    assert len(got) == 2 and all(isinstance(a, str) for a in got)


@pytest.mark.parametrize("task,data,option,flag", [("instruct", "instruct.json", "look", "look_answers"),
                                                    ("generate", "pairs.json", "sized", "sized_images")])
def test_a_look_or_sized_row_marks_the_stage3_model(stage3_runs, tmp_path, task, data, option, flag):
    """`setok ask` lets a model a look row trained write tokens; `setok generate` lets a model a
    sized row trained say its image's size (models/setokim/sized.py)."""
    from setok_cli.train.recipe import load_recipe
    from setok_cli.train.stage3 import build_stage3_model
    tr = stage3_runs["world"] / "shapes" / "train"
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "stage3.yaml"
    for extra, want in (("", False), (f", {option}: true", True)):
        r = load_recipe(recipe, [f"model.setokim_from={stage3_runs['stage2']}", f"output_dir={tmp_path}",
                                 "model.text_first=null",
                                 f"data.mixture=[{{task: {task}, path: {tr / data}{extra}}}]"])
        assert getattr(build_stage3_model(r).setokim.config, flag) is want


def test_show_look_tints_the_regions_of_the_written_tokens(stage3_runs, monkeypatch, tmp_path):
    import setok_cli.tasks.setokim as tasks
    from setok_cli.models.setokim.generate import Generated
    from setok_cli.models.setokim.look import looked_masks
    m = tasks.load_setokim(stage3_runs["stage3"])
    img = sorted((stage3_runs["world"] / "shapes" / "test" / "images").glob("*.png"))[0]
    src = m.read_sets([img])[0]
    src = src[0] if isinstance(src, tuple) else src
    written = [src[0:1], src[-1:]]
    monkeypatch.setattr(m, "generate", lambda *a, **k: [Generated(text="<image> <image>: 2", ids=[], images=written,
                                                                   seeds=[torch.zeros(1), torch.zeros(1)])])
    with pytest.raises(UserError, match="answers without looking"):
        tasks.show_look(m, img, "How many circles are there?", None, tmp_path / "x.png")
    m.config.look_answers = True
    answer, path = tasks.show_look(m, img, "How many circles are there?", None, tmp_path / "sub" / "look.png")
    assert answer == "<image> <image>: 2" and path == tmp_path / "sub" / "look.png"
    pic = np.asarray(Image.open(path))
    base = np.asarray(Image.open(img).convert("RGB"))
    masks = looked_masks(m, img, [w[0] for w in written])
    assert len(masks) == 2 and all(k.shape == base.shape[:2] and k.dtype == bool for k in masks)
    assert np.array_equal(pic, looked_picture(base, masks))


def test_chat_shows_a_looking_reply_as_regions_not_pictures(stage3_runs, monkeypatch, tmp_path):
    import setok_cli.tasks.setokim as tasks
    from setok_cli.models.setokim.generate import Generated
    from setok_cli.models.setokim.look import looked_masks
    from setok_cli.tasks.chat import ChatSession, is_look
    assert is_look("<image>: blue") and is_look("<image> <image> a red circle: yes")
    assert not is_look("<image>") and not is_look("a red star: <image>") and not is_look("blue")
    m = tasks.load_setokim(stage3_runs["stage3"])
    m.config.look_answers = True
    img = sorted((stage3_runs["world"] / "shapes" / "test" / "images").glob("*.png"))[0]
    src = m.read_sets([img])[0]
    src = src[0] if isinstance(src, tuple) else src
    replies = iter([("<image>: blue", [src[-1:]]), ("<image>", [src])])     # a look, then a picture
    seen = []

    def fake(*a, **k):
        seen.append(k)
        text, ims = next(replies)
        return [Generated(text=text, ids=[], images=ims, seeds=[torch.zeros(len(t)) for t in ims])]
    monkeypatch.setattr(m, "generate", fake)
    chat = ChatSession(m, str(img), tasks.Sampling(), tmp_path, size=16)
    r = chat.reply("What color is the hexagon?")
    assert seen[0]["place"] == "draw" and seen[0]["place_temperature"] == 0.0    # as `setok ask` looks
    assert r.text == "<image>: blue" and r.images == [] and r.looks == [tmp_path / "chat_001_look.png"]
    base = np.asarray(Image.open(img).convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(r.looks[0])), looked_picture(base, looked_masks(m, img, [src[-1]])))
    assert len(chat.images) == 2 and chat.pixels[1] is None                      # the looked token stays read
    assert chat.turns[-1]["value"] == "<image>: blue"
    r = chat.reply("Generate an image: a red circle")
    assert r.looks == [] and r.images == [tmp_path / "chat_002.png"]
    assert np.asarray(Image.open(r.images[0])).shape == (16, 16, 3) and chat.pixels[2].shape == (16, 16, 3)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["chat_001_look.png", "chat_002.png"]


def test_looked_picture_tints_each_region_in_its_colour():
    from setok_cli.models.setokim.look import COLOURS
    base = np.full((6, 6, 3), 100, np.uint8)
    a, b = np.zeros((6, 6), bool), np.zeros((6, 6), bool)
    a[:, :3], b[:, 4:] = True, True
    out = looked_picture(base, [a, b]).astype(int)
    assert (out[:, 3] == 100).all()                                          # outside both: untouched
    assert (out[:, 2] == COLOURS[0]).all() and (out[:, 4] == COLOURS[1]).all()     # outlines in each colour
    inner = np.zeros((6, 6), bool)
    inner[1:5, 1] = True                                                   # a region's inside: a 0.4 tint
    assert np.abs(out[inner] - (0.6 * 100 + 0.4 * np.asarray(COLOURS[0]))).max() <= 1


def _before_full_weight(rows: list) -> list:
    """The recipe's rows as the recipes derived from it were measured: `generate` 0.5 and `caption` 0.25, where the
    recipe trains both at 1.0 since README "Stage II's rows at full weight"."""
    old = {"generate": 0.5, "caption": 0.25}
    assert [r["weight"] for r in rows if r["task"] in old] == [1.0, 1.0]
    return [{**r, "weight": old[r["task"]]} if r["task"] in old else r for r in rows]


def test_the_look_recipe_is_the_stage3_recipe_with_looking_question_rows():
    import dataclasses

    from setok_cli.train.recipe import load_recipe
    tiny = Path(__file__).resolve().parents[2] / "recipes" / "tiny"
    base, look = (dataclasses.asdict(load_recipe(tiny / f)) for f in ("stage3.yaml", "stage3_look.yaml"))
    assert look["output_dir"] == "runs/tiny-stage3-look"
    # the recipe as it was before its echoed existence answers and its text-only phase (README: "Where the list
    # is, and a "no" after it")
    assert base["model"].pop("text_first")["path"].endswith("instruct_list_drills_echo.json")
    assert look["model"].pop("text_first") is None
    base["data"]["mixture"] = _before_full_weight(base["data"]["mixture"])
    for row in base["data"]["mixture"]:
        row["path"] = row["path"].replace("exist_echo", "exist_shape")
    rows = look["data"].pop("mixture")
    assert [{k: v for k, v in r.items() if k != "look"} for r in rows] == base["data"].pop("mixture")
    assert [r.get("look") for r in rows] == [["color", "shape", "exist", "relation"]] * 3 + [None] * (len(rows) - 3)
    assert {k: v for k, v in look.items() if k != "output_dir"} == {k: v for k, v in base.items() if k != "output_dir"}


def test_the_chain_recipe_is_the_stage3_recipe_with_counting_relations_and_looking_shapes():
    import dataclasses

    from setok_cli.train.recipe import load_recipe
    tiny = Path(__file__).resolve().parents[2] / "recipes" / "tiny"
    base, chain = (dataclasses.asdict(load_recipe(tiny / f)) for f in ("stage3.yaml", "stage3_chain.yaml"))
    assert chain["output_dir"] == "runs/tiny-stage3-chain"
    # the text phase drills relations that count beside the existence drills (README: "Relations that count")
    assert base["model"].pop("text_first")["path"] == "data/shapes/train/instruct_list_drills_echo.json"
    assert chain["model"].pop("text_first")["path"] == "data/shapes/train/instruct_list_drills_echo_relation.json"
    rows, base_rows = chain["data"].pop("mixture"), _before_full_weight(base["data"].pop("mixture"))
    assert rows == [{**r, **({"look": ["shape", "relation"], "look_places": "chain"} if i < 3 else {})}
                    for i, r in enumerate(base_rows)]
    assert [r["path"].rsplit("/", 1)[1] for r in rows[:3]] == ["instruct_explained_exist_echo.json"] * 2 + [
        "instruct_color_shape.json"]
    assert {k: v for k, v in chain.items() if k != "output_dir"} == {k: v for k, v in base.items() if k != "output_dir"}


def test_the_relations_recipe_is_the_look_recipe_with_relation_and_existence_rows():
    import dataclasses

    from setok_cli.train.recipe import load_recipe
    tiny = Path(__file__).resolve().parents[2] / "recipes" / "tiny"
    look, rel = (dataclasses.asdict(load_recipe(tiny / f)) for f in ("stage3_look.yaml", "stage3_relations.yaml"))
    assert rel["output_dir"] == "runs/tiny-stage3-relations" and rel["train"]["max_steps"] == 3000
    rows = rel["data"].pop("mixture")
    # the look recipe's rows, every looking row writing a relation's places, the edit diffs their names
    want = [{**m, **({"look_places": True} if m.get("look") else {}),
             **({"names": True} if m["task"] == "edit_diff" else {})} for m in look["data"].pop("mixture")]
    assert rows[:-2] == want
    assert {k: rows[-2][k] for k in ("task", "path", "weight", "look", "look_places", "text_weight")} == {
        "task": "instruct", "path": "data/shapes/train/instruct_relation.json", "weight": 1.0, "look": True,
        "look_places": True, "text_weight": 2.0}
    # every existence question, explained by shape as the question rows' existence answers are
    assert rows[-1] == {"task": "instruct", "path": "data/shapes/train/instruct_exist_explained_shape.json",
                        "weight": 0.5, "look": True, "text_weight": 2}
    assert want[0]["path"] == "data/shapes/train/instruct_explained_exist_shape.json"
    rel["train"]["max_steps"] = look["train"]["max_steps"]
    assert {k: v for k, v in rel.items() if k != "output_dir"} == {k: v for k, v in look.items() if k != "output_dir"}


def test_existence_cases_sort_each_question_and_score_its_answer(instruct, benchmark_script):
    ec = benchmark_script("existence_cases")
    from setok_cli.data.formats import load
    entries = load(instruct, "instruct")
    truths = {e["id"]: look_entry(e)[0]["conversations"][1]["value"] for e in entries if e["type"] == "exist"}
    assert truths and ec.case_of("<image> <image>: no") == "other colour" and ec.case_of("no") == "shape absent"
    right = ec.score(entries, [{"question_id": i, "answer": t.rsplit(": ", 1)[-1], "reasons": t}
                               for i, t in truths.items()])
    n = {c: sum(ec.case_of(t) == c for t in truths.values()) for c in ec.CASES}
    assert {c: right[c]["questions"] for c in ec.CASES} == n
    assert all(r["right"] == r["tokens_as_truth"] == r["questions"] for r in right.values())
    assert right["shape absent"]["wrote_nothing"] == n["shape absent"]
    # the shape-absent questions whose asked colour is on another object, read from each scene here; and each
    # shape-absent question asked again in the colour of its image's first object (still "no"), which must count there
    there, extra = 0, []
    for e in entries:
        if e["type"] == "exist" and ec.case_of(truths[e["id"]]) == "shape absent":
            words = e["conversations"][0]["value"].split("Is there ")[1].rstrip("?").split()
            scene = json.loads(Path(str(e["image"]).replace("images", "scenes")).with_suffix(".json").read_text())
            there += words[1] in {o["color"] for o in scene["objects"]}
            c = scene["objects"][0]["color"]
            q = f"<image>\nIs there {'an' if c[0] in 'aeiou' else 'a'} {c} {words[2]}?"
            extra.append({**e, "id": f"{e['id']}_c", "conversations": [{"from": "human", "value": q},
                                                                       {"from": "gpt", "value": "no"}]})
    assert right[ec.COLOUR_THERE]["questions"] == right[ec.COLOUR_THERE]["right"] == there and extra
    both = ec.score(entries + extra, [{"question_id": x["id"], "answer": "no", "reasons": "no"}
                                      for x in entries + extra if x["type"] == "exist"])
    assert both["shape absent"]["questions"] == n["shape absent"] + len(extra)
    assert both[ec.COLOUR_THERE]["questions"] == both[ec.COLOUR_THERE]["right"] == there + len(extra)
    # always one token and "yes": right only where the answer is yes, never writing nothing
    yes = ec.score(entries, [{"question_id": i, "answer": "yes", "reasons": "<image>: yes"} for i in truths])
    assert yes["present"]["right"] == n["present"] and yes["other colour"]["right"] == 0
    assert yes["shape absent"]["right"] == yes["shape absent"]["wrote_nothing"] == 0
    assert yes[ec.COLOUR_THERE]["right"] == 0 and yes[ec.COLOUR_THERE]["questions"] == there


def test_count_cases_sort_each_count_and_score_its_answer(instruct, benchmark_script):
    cc = benchmark_script("count_cases")
    from setok_cli.data.formats import load
    entries = load(instruct, "instruct")
    assert [cc.kind_of(q) for q in ("How many objects are there?", "How many red objects are there?",
                                    "How many hexagons are there?")] == ["objects", "colour", "shape"]
    # looking answers as the count_by rows train them: right, and as many tokens as the truth
    truths = {e["id"]: (e, look_entry(e, ["count_by"])[0]["conversations"][1]["value"]) for e in entries
              if e["type"] == "count"}
    assert truths
    right = cc.score(entries, [{"question_id": i, "answer": t.rsplit(": ", 1)[-1], "reasons": t}
                               for i, (_, t) in truths.items()])
    n = {k: sum(cc.kind_of(e["conversations"][0]["value"]) == k for e, _ in truths.values()) for k in cc.KINDS}
    assert {k: sum(r["questions"] for r in rows.values()) for k, rows in right.items()} == n
    for kind, rows in right.items():
        for truth, r in rows.items():
            assert r["right"] == r["questions"] and r["said_1"] == (r["questions"] if truth == "1" else 0)
            # "How many objects" answers plainly (no token written); the others write one per object
            assert r["tokens_as_truth"] == (r["questions"] if kind != "objects" else 0)
            assert r["says_its_tokens"] == (r["questions"] if kind != "objects" else 0)
    # numbered word lists ("a red circle 1, a red star 2: 2"), one object short where the truth is 2 or more
    def listed(e, short):
        t = int(e["conversations"][1]["value"])
        k = t - (short and t >= 2)
        return ", ".join(f"a red circle {j}" for j in range(1, k + 1)) + f": {k}" if k else "0"
    for short in (False, True):
        said = cc.score(entries, [{"question_id": i, "answer": listed(e, short).rsplit(": ", 1)[-1],
                                   "reasons": listed(e, short)} for i, (e, _) in truths.items()])
        for rows in said.values():
            for truth, r in rows.items():
                good = r["questions"] if not short or truth in ("0", "1") else 0
                assert r["right"] == r["tokens_as_truth"] == good and r["says_its_tokens"] == r["questions"]
    # always "1": right exactly where the truth is 1
    ones = cc.score(entries, [{"question_id": i, "answer": "1"} for i in truths])
    assert all(r["right"] == r["questions"] * (t == "1") and r["said_1"] == r["questions"] for rows in ones.values()
               for t, r in rows.items())
