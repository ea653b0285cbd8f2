"""Edits as token diffs (models/setokim/edit_diff.py): the conversations, the training targets
against the world's scenes and an independent overlap count, the stage model's rows, and the
inference side's parse and apply."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from setok_cli.data.conversations import ConversationDataset, collate_conversations_batch
from setok_cli.errors import UserError
from setok_cli.models.setokim.edit_diff import (DIFF_OPS, PLACE_BINS, apply_diff, diff_conversation, diff_spec,
                                                diff_tokens, object_token, parse_diff, snap_new, written_place)

pytestmark = pytest.mark.usefixtures("one_thread")     # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def edits(stage2_world):
    return stage2_world / "shapes" / "train" / "edits.json"


@pytest.fixture(scope="module")
def model(place_setokim, edits):
    return place_setokim(edits)


def _entries(edits):
    from setok_cli.data.formats import load
    return load(edits, "edits")


def test_conversations_name_the_op_the_objects_the_place_and_count_the_images(tmp_path):
    scene = lambda *objs: {"objects": [{"id": i + 1, "center": c, "color": col, "shape": sh}   # noqa: E731
                                       for i, (c, col, sh) in enumerate(objs)]}
    (tmp_path / "s.json").write_text(json.dumps(scene(([0.5, 0.5], "red", "circle"))))
    (tmp_path / "t.json").write_text(json.dumps(scene(([0.9, 0.1], "blue", "circle"), ([0.2, 0.75], "green", "star"))))
    e = {"source": "s.png", "target": "t.png", "instruction": " Make the red circle blue. ",
         "source_scene": str(tmp_path / "s.json"), "target_scene": str(tmp_path / "t.json")}
    answers, named = {}, {}
    for op, (word, old, new) in DIFF_OPS.items():
        conv, paths = diff_conversation({**e, "edit": {"op": op, "object": 1}})
        assert conv[0]["value"] == "<image>\nMake the red circle blue. Segment the object."
        assert conv[1]["value"].split()[0] == word and conv[1]["value"].count("<image>") == old + new
        assert paths == ["s.png", "t.png"]
        answers[op] = conv[1]["value"]
        named[op] = diff_conversation({**e, "edit": {"op": op, "object": 1}}, names=True)[0][1]["value"]
    # 7 bins: x 0.9 -> 6, y 0.1 -> 0 (the moved object 1); the added object 2 at (0.2, 0.75) -> 1 5
    assert answers == {"remove": "Remove <image>", "recolor": "Make <image> to <image>",
                       "move": "Move <image> to 6 0 <image>", "add": "Add at 1 5 <image>"}
    # names: the instruction's words before each token (object 1, alone, is "the red circle",
    # recoloured blue; the added object 2 is a green star)
    assert named == {"remove": "Remove red circle <image>", "recolor": "Make red circle <image> to blue <image>",
                     "move": "Move red circle <image> to 6 0 <image>", "add": "Add green star at 1 5 <image>"}
    assert written_place(answers["move"]) == (6.5 / PLACE_BINS, 0.5 / PLACE_BINS)
    assert written_place(answers["add"]) == (1.5 / PLACE_BINS, 5.5 / PLACE_BINS)
    assert written_place(answers["recolor"]) is None and written_place("Move <image> to <image>") is None
    with pytest.raises(UserError, match="edit_diff needs edits of the shapes world"):
        diff_conversation({**e, "source_scene": None})
    with pytest.raises(UserError, match="scenes beside each edit"):
        diff_conversation({**e, "source_scene": None, "edit": {"op": "move", "object": 1}})


def test_specs_name_the_changed_object_in_both_scenes(edits):
    seen = set()
    for e in _entries(edits):
        sp = diff_spec(e)
        src = json.loads(open(e["source_scene"]).read())["objects"]
        tgt = json.loads(open(e["target_scene"]).read())["objects"]
        op = e["edit"]["op"]
        seen.add(op)
        if sp["old"] is not None:
            assert src[sp["old"] - 1]["id"] == e["edit"]["object"]
        if sp["new"] is not None:
            o = tgt[sp["new"] - 1]
            if op == "add":
                assert o["id"] not in {x["id"] for x in src}
            else:
                before = src[sp["old"] - 1]
                assert o["id"] == before["id"]
                assert (o["color"] != before["color"]) if op == "recolor" else (o["center"] != before["center"])
        assert (sp["old"] is None) == (op == "add") and (sp["new"] is None) == (op == "remove")
        # the words written before the tokens are the instruction's own: its referring expression
        # ("Remove the cyan object." -> "Remove cyan object <image>"), a recolouring's new colour,
        # an addition's colour and shape
        answer = diff_conversation(e, sp, names=True)[0][1]["value"]
        assert answer == diff_conversation(e, names=True)[0][1]["value"]
        said = e["instruction"].rstrip(".")
        if op != "add":
            word = DIFF_OPS[op][0]
            assert f"{word} the {sp['old_name']}" in said and answer.startswith(f"{word} {sp['old_name']} <image>")
        if op == "recolor":
            assert sp["new_name"] == tgt[sp["new"] - 1]["color"] == said.split()[-1]
            assert answer.endswith(f"to {sp['new_name']} <image>")
        if op == "add":
            assert sp["new_name"] == f"{tgt[sp['new'] - 1]['color']} {tgt[sp['new'] - 1]['shape']}" in said
    assert seen == set(DIFF_OPS)
    with pytest.raises(UserError, match="scenes beside each edit"):
        diff_spec({**e, "source_scene": None})
    from setok_cli.data.conversations import ConversationDataset
    ds = ConversationDataset(edits, "edit_diff", 32, names=True)
    assert [ds[i]["conversations"][1]["value"] for i in range(len(ds))] == [
        diff_conversation(e, names=True)[0][1]["value"] for e in _entries(edits)]
    for task, names in (("edit", True), ("edit_diff", "yes")):
        with pytest.raises(UserError, match="names is for the edit_diff task"):
            ConversationDataset(edits, task, 32, names=names)


def test_object_token_is_the_token_holding_most_of_the_object(model, edits, overlap_oracle):
    entries = [e for e in _entries(edits)][:12]
    srcs = [np.asarray(Image.open(e["source"]).convert("RGB")) for e in entries]
    out = model.setok.tokenize(srcs)
    sets = model.token_sets_of(out)
    checked = 0
    for i, e in enumerate(entries):
        sp = diff_spec(e)
        if sp["old"] is None:
            continue
        inst_map = np.asarray(Image.open(sp["source_instances"]))
        H, W = inst_map.shape
        gh, gw = out.image_labels(i).shape
        assert H % gh == 0 and W % gw == 0
        area = overlap_oracle(out, i, inst_map, sp["old"])
        want = out.tokens[i, int(area.argmax())]
        got = object_token(model, out, i, inst_map, sp["old"])
        assert torch.equal(sets[i][got], want)
        assert object_token(model, out.light(i), 0, inst_map, sp["old"]) == got      # the image alone, kept light
        checked += 1
    assert checked >= 5
    # diff_tokens: the same indices, the new one from the target scene rendered again
    tgts = [np.asarray(Image.open(e["target"]).convert("RGB")) for e in entries]
    got = diff_tokens(model, [diff_spec(e) for e in entries], srcs, tgts)
    out_t = model.setok.tokenize(tgts)
    assert diff_tokens(model, [diff_spec(e) for e in entries], [out.light(i) for i in range(len(srcs))],
                       [out_t.light(i) for i in range(len(tgts))]) == got
    for i, (e, (old, new)) in enumerate(zip(entries, got)):
        assert (old is None) == (e["edit"]["op"] == "add") and (new is None) == (e["edit"]["op"] == "remove")
        if old is not None:
            inst_map = np.asarray(Image.open(diff_spec(e)["source_instances"]))
            assert old == object_token(model, out, i, inst_map, diff_spec(e)["old"])


def test_stage_rows_write_the_old_and_new_tokens_only(model, edits):
    from setok_cli.train.stage2 import Stage2Model
    ds = ConversationDataset(edits, "edit_diff", image_size=32)
    items = [ds[i] for i in range(8)]
    ops = [it["edit_diff"]["op"] for it in items]
    batch = collate_conversations_batch(items)
    sm = Stage2Model(model)
    out = sm(batch)
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["visual"]) and torch.isfinite(out["place"])
    written = sum(DIFF_OPS[op][1] + DIFF_OPS[op][2] for op in ops)
    assert out["visual_tokens"].item() == pytest.approx(written / len(items))
    out["loss"].backward()
    # each row's answer tokens are its source's old token and its target's new token, with their seeds
    sets = sm.image_token_sets(batch["pixel_values"], batch["image_keys"])
    seeds = sm.image_token_seeds(batch["image_keys"])
    for j, it in enumerate(items):
        old, new = sm._diffs[it["edit_diff"]["key"]]
        src, tgt = sets[2 * j], sets[2 * j + 1]
        assert (old is None or 0 <= old < src.shape[0]) and (new is None or 0 <= new < tgt.shape[0])
        assert seeds[2 * j].shape[0] == src.shape[0]
    # the stage reads the outputs it kept from its token cache: the same indices as tokenizing the images again
    arr = sm._arrays(batch["pixel_values"])
    fresh = diff_tokens(model, [it["edit_diff"] for it in items], arr[0::2], arr[1::2])
    assert [sm._diffs[it["edit_diff"]["key"]] for it in items] == fresh
    assert len(sm._outs) == len(set(batch["image_keys"]))


def test_stage_tokens_benchmark_reuses_outputs_for_the_same_samples(model, edits):
    """benchmarks/stage_tokens.py: both ways give the same samples; reusing sends fewer images through SeTok."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "stage_tokens.py"
    spec = importlib.util.spec_from_file_location("stage_tokens", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from setok_cli.train.stage2 import Stage2Model
    ds = ConversationDataset(edits, "edit_diff", image_size=32)
    batches = [collate_conversations_batch([ds[i] for i in range(a, a + 4)]) for a in (0, 4, 0)]   # the last again
    with torch.no_grad():
        before, want = bench._run(Stage2Model(model), ds, batches, reuse=False)
        after, got = bench._run(Stage2Model(model), ds, batches, reuse=True)
    assert [[w.shape for w in x] for x in want] == [[g.shape for g in x] for x in got]
    assert all(torch.allclose(w, g, atol=1e-5) for x, y in zip(want, got) for w, g in zip(x, y))
    distinct = {k for b in batches for k in b["image_keys"]}
    assert after["batches_images"] == len(distinct) < before["batches_images"]     # each image once
    assert "forward" not in model.setok.__dict__                                  # the counter is taken off


def test_parse_and_apply_diff():
    a, b = torch.ones(1, 4), 2 * torch.ones(1, 4)
    assert parse_diff("Remove", [a])[0] is not None and parse_diff("Remove", [a])[1] is None
    old, new = parse_diff("Add", [b])
    assert old is None and torch.equal(new, b[0])
    old, new = parse_diff("Make to", [a, b])
    assert torch.equal(old, a[0]) and torch.equal(new, b[0])
    old, new = parse_diff("Move", [a])                   # cut off before its new token
    assert torch.equal(old, a[0]) and new is None and parse_diff("", []) == (None, None)
    src = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    # the nearest source token to old is dropped, new appended, the rest copied exactly
    got, dropped = apply_diff(src, torch.tensor([0.9, 0.2]), torch.tensor([7.0, 7.0]))
    assert torch.equal(got, torch.tensor([[0.0, 0.0], [0.0, 5.0], [7.0, 7.0]])) and dropped == 1
    assert torch.equal(apply_diff(src, None, None)[0], src) and apply_diff(src, None, None)[1] is None
    # nearest after the model's standardising: [0, 5] as given, [1, 0] with the second axis scaled down
    old = torch.tensor([0.6, 3.0])
    assert torch.equal(apply_diff(src, old, None)[0], src[:2])
    assert torch.equal(apply_diff(src, old, None, norm=lambda t: t * torch.tensor([1.0, 0.01]))[0], src[[0, 2]])


def test_edit_pipeline_drops_and_adds_what_the_answer_says(stage3_runs, monkeypatch):
    import setok_cli.tasks.setokim as tasks
    from setok_cli.models.setokim.bank import token_sets_with_layouts
    from setok_cli.models.setokim.generate import Generated
    m = tasks.load_setokim(stage3_runs["stage3"])
    imgs = sorted((stage3_runs["world"] / "shapes" / "test" / "images").glob("*.png"))
    img = next(p for p in imgs if token_sets_with_layouts(m, [p])[0][0].shape[0] >= 3)
    src = token_sets_with_layouts(m, [img])[0][0]
    new = torch.randn(src.shape[1])
    answer = Generated(text="Make to", ids=[], images=[src[1:2] + 1e-3, new.view(1, -1)],
                       seeds=[torch.zeros(1), torch.zeros(1)])
    monkeypatch.setattr(m, "generate", lambda *a, **k: [answer])
    seen, real = {}, tasks._decode

    def spy(model, sets, *a):
        seen["sets"] = sets
        return real(model, sets, *a)
    import setok_cli.tasks.edit_diff as ed
    monkeypatch.setattr(ed, "_decode", spy)
    for keep in (None, 0):
        seen.clear()
        out = tasks.edit(m, [img], ["Make the red circle blue."], tasks.Sampling(diff=True, keep_pixels=keep))
        keep_rows = [0] + list(range(2, src.shape[0]))
        assert torch.equal(seen["sets"][0], torch.cat([src[keep_rows], new.view(1, -1)]))
        assert out[0].dtype == np.uint8 and out[0].ndim == 3


def test_a_new_token_is_snapped_over_its_seeds_cell(stage3_runs):
    import setok_cli.tasks.setokim as tasks
    from setok_cli.models.setokim.bank import OBJECT_SHARE, layout_cell, token_sets_with_layouts
    m = tasks.load_setokim(stage3_runs["stage3"])
    assert m.place_head is not None
    imgs = sorted((stage3_runs["world"] / "shapes").glob("*/images/*.png"))
    sets, lays, seeds = token_sets_with_layouts(m, imgs, seeds=True)
    i, k = next((i, k) for i in range(len(sets)) for k in range(sets[i].shape[0])
                if seeds[i][k] >= 0 and lays[i][k].float().mean() <= OBJECT_SHARE)
    bank, blay = torch.cat(sets[:i] + sets[i + 1:]), torch.cat(lays[:i] + lays[i + 1:])
    src, lay, sd = sets[i], lays[i], seeds[i]
    cell = int(layout_cell(sd[k:k + 1], m.place_head.cells))
    assert blay[:, cell].any()
    torch.manual_seed(0)
    for _ in range(3):
        tok, placed = snap_new(m, torch.randn(src.shape[1]), lay, k, bank, blay, seed=sd[k:k + 1], max_overlap=1.0)
        j = int((bank - tok).norm(dim=1).argmin())
        assert torch.allclose(bank[j], tok, atol=1e-5) and bool(blay[j, cell])
        assert torch.equal(placed, blay[j] & (blay[j].float().mean() <= OBJECT_SHARE))
    # a written place: a bank object centred near it, whatever the seed says
    from setok_cli.models.setokim.bank import layout_centres
    from setok_cli.models.setokim.edit_diff import NEAR, SAME_REGION
    cent, obj = layout_centres(blay), blay.float().mean(1) <= OBJECT_SHARE
    for q in range(3):
        where = tuple(cent[torch.where(obj)[0][q * 5]].tolist())
        tok, _ = snap_new(m, torch.randn(src.shape[1]), lay, k, bank, blay, seed=sd[k:k + 1], place=where,
                          max_overlap=1.0)
        j = int((bank - tok).norm(dim=1).argmin())
        assert bool(obj[j]) and float((cent[j] - torch.tensor(where)).norm()) <= NEAR
    # a move: near the written place, the bank token nearest the sum of the written and the old
    # token's directions (standardised), not the written token's alone
    import torch.nn.functional as F
    from setok_cli.models.setokim.bank import near_centre
    near = near_centre(blay.bool(), cent[obj], NEAR)                                 # (objects, M)
    best = int(near.sum(1).argmax())
    where, allowed = tuple(cent[obj][best].tolist()), near[best]
    assert int(allowed.sum()) >= 3
    unit = lambda t: F.normalize(m.normalize(t.float().view(1, -1)), dim=-1)[0]       # noqa: E731
    ub = F.normalize(m.normalize(bank.float()), dim=-1)
    differs = 0
    for q in range(4):
        written, like = torch.randn(src.shape[1]), bank[torch.where(allowed)[0][q % int(allowed.sum())]]
        tok, _ = snap_new(m, written, lay, k, bank, blay, place=where, max_overlap=1.0, like=like)
        want = int(torch.where(allowed, ub @ (unit(written) + unit(like)), -torch.inf).argmax())
        assert torch.allclose(tok, bank[want], atol=1e-5)
        alone, _ = snap_new(m, written, lay, k, bank, blay, place=where, max_overlap=1.0)
        differs += not torch.allclose(alone, tok, atol=1e-5)
    assert differs
    # a recolouring: a bank token over the old token's region (the old token itself is one)
    bank2, blay2 = torch.cat([bank, src[k:k + 1]]), torch.cat([blay, lay[k:k + 1]])
    region = lay[k].float()
    iou = (blay2.float() @ region) / (blay2.float().sum(1) + region.sum() - blay2.float() @ region)
    for _ in range(3):
        tok, _ = snap_new(m, torch.randn(src.shape[1]), lay, k, bank2, blay2, seed=sd[k:k + 1], recolour=True,
                          max_overlap=1.0)
        assert float(iou[int((bank2 - tok).norm(dim=1).argmin())]) >= SAME_REGION
    # without layouts: the nearest bank token by direction, and no cells
    tok, placed = snap_new(m, bank[3] * 1.5, lay, k, bank, None, seed=sd[k:k + 1])
    assert torch.allclose(tok, bank[3], atol=1e-5) and not placed.any()
