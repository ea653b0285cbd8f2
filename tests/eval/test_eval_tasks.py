import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from setok_cli.data import formats
from setok_cli.errors import UserError
from setok_cli.eval import harness as T
from setok_cli.eval import metrics as M


def _dump(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_vqa_perfect_and_worst(world, tmp_path):
    data = world / "instruct.json"
    qs = T.vqa_questions(formats.load(data, "instruct"))
    perfect = _dump(tmp_path / "p.json", [{"question_id": q["id"], "answer": q["answer"].upper() + "."} for q in qs])
    r = T.eval_vqa(data, perfect)
    assert r["accuracy"] == 1.0 and r["missing"] == 0
    assert {k for k in r if k.startswith("accuracy/")} >= {"accuracy/count", "accuracy/exist"}
    worst = _dump(tmp_path / "w.json", [{"index": i, "answer": "banana"} for i in range(len(qs))])
    assert T.eval_vqa(data, worst)["accuracy"] == 0.0
    half = _dump(tmp_path / "h.json", [{"question_id": q["id"], "answer": q["answer"]} for q in qs[::2]])
    r = T.eval_vqa(data, half)
    assert r["missing"] == len(qs) // 2 and r["accuracy"] == pytest.approx(len(qs[::2]) / len(qs))


def test_caption_perfect_and_worst(world, tmp_path):
    data = world / "pairs.json"
    entries = json.loads(data.read_text())
    perfect = _dump(tmp_path / "p.json", [{"image": "x/" + e["image"], "caption": e["caption"]} for e in entries])
    r = T.eval_caption(data, perfect)
    assert r["recall"] == 1.0 and r["precision"] == 1.0
    worst = _dump(tmp_path / "w.json", [{"image": e["image"], "caption": "nothing here"} for e in entries])
    r = T.eval_caption(data, worst)
    assert r["recall"] == 0.0 and r["precision"] is None


def test_segment_perfect_worst_and_known(world, tmp_path):
    data = world / "referring.json"
    entries = json.loads(data.read_text())
    preds, inv = [], []
    for i, e in enumerate(entries):
        m = np.asarray(Image.open(world / e["mask"]))
        Image.fromarray(m).save(tmp_path / f"p{i}.png")
        Image.fromarray(255 - m).save(tmp_path / f"n{i}.png")
        preds.append({"image": e["image"], "expression": e["expression"], "mask": f"p{i}.png"})
        inv.append({"index": i, "mask": f"n{i}.png"})
    r = T.eval_segment(data, _dump(tmp_path / "p.json", preds))
    assert r["miou"] == 1.0 and r["ciou"] == 1.0 and r["precision@0.5"] == 1.0
    r = T.eval_segment(data, _dump(tmp_path / "n.json", inv))
    assert r["miou"] == 0.0 and r["ciou"] == 0.0
    # an all-foreground mask: IoU = |gt| / |image|
    m0 = np.asarray(Image.open(world / entries[0]["mask"])) > 127
    Image.fromarray(np.full(m0.shape, 255, np.uint8)).save(tmp_path / "full.png")
    one = [{"index": 0, "mask": "full.png"}]
    r = T.eval_segment(data, _dump(tmp_path / "one.json", one))
    assert r["missing"] == len(entries) - 1
    assert r["miou"] == pytest.approx(m0.mean() / len(entries))
    # per form of expression: the forms' counts add up, and each form's mIoU is its own entries'
    form0 = T.expression_form(entries[0]["expression"])
    assert sum(v for k, v in r.items() if k.startswith("expressions/")) == len(entries)
    assert r[f"miou/{form0}"] == pytest.approx(m0.mean() / r[f"expressions/{form0}"])
    assert all(v == 0.0 for k, v in r.items() if k.startswith("miou/") and k != f"miou/{form0}")


def test_expression_forms():
    f = T.expression_form
    assert [f("the hexagon"), f("the red object"), f("the red hexagon."), f("the leftmost red hexagon"),
            f("a dog on the left"), f("the red")] == ["shape", "color", "color+shape", "position", "other", "other"]


def test_generate_perfect_and_worst(world, tmp_path):
    data = world / "pairs.json"
    entries = json.loads(data.read_text())
    perfect = [{"caption": e["caption"], "image": str(world / e["image"])} for e in entries]
    r = T.eval_generate(data, _dump(tmp_path / "p.json", perfect))
    assert r["scene_accuracy"] == 1.0 and r["object_recall"] == 1.0
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(tmp_path / "blank.png")
    worst = [{"prompt": e["caption"], "image": "blank.png"} for e in entries]
    r = T.eval_generate(data, _dump(tmp_path / "w.json", worst))
    assert r["scene_accuracy"] == 0.0 and r["object_recall"] == 0.0 and r["object_precision"] is None


def test_edit_perfect_and_source_copy(world, tmp_path):
    data = world / "edits.json"
    entries = json.loads(data.read_text())
    perfect = [{"source": e["source"], "instruction": e["instruction"], "image": str(world / e["target"])}
               for e in entries]
    r = T.eval_edit(data, _dump(tmp_path / "p.json", perfect))
    assert r["scene_accuracy"] == 1.0 and r["l1"] == 0.0 and r["preservation"] == 1.0
    ops = sorted({e["edit"]["op"] for e in entries})
    assert r["applied"] == 1.0 and all(r[f"applied/{op}"] == 1.0 for op in ops)
    assert sum(r[f"images/{op}"] for op in ops) == len(entries)
    # returning the source unchanged preserves everything but does not do the edit
    copy = [{"index": i, "image": str(world / e["source"])} for i, e in enumerate(entries)]
    r = T.eval_edit(data, _dump(tmp_path / "c.json", copy))
    assert r["scene_accuracy"] == 0.0 and r["l1"] > 0 and r["preservation"] == 1.0
    assert r["applied"] == 0.0 and all(r[f"applied/{op}"] == 0.0 for op in ops)
    assert all(r[f"kept/{op}"] in (1.0, None) for op in ops)
    # the target for half the entries, the source for the rest: applied is the share of targets
    half = [{"index": i, "image": str(world / (e["target"] if i % 2 else e["source"]))} for i, e in enumerate(entries)]
    r = T.eval_edit(data, _dump(tmp_path / "h.json", half))
    assert r["applied"] == pytest.approx(sum(i % 2 for i in range(len(entries))) / len(entries))


def test_prediction_errors(world, tmp_path):
    with pytest.raises(UserError, match="needs --pred"):
        T.eval_vqa(world / "instruct.json", None)
    with pytest.raises(UserError, match=r"entry 0: missing key 'answer'"):
        T.eval_vqa(world / "instruct.json", _dump(tmp_path / "a.json", [{"question_id": "x"}]))
    with pytest.raises(UserError, match="index 999"):
        T.eval_segment(world / "referring.json", _dump(tmp_path / "b.json", [{"index": 999, "mask": "m.png"}]))
    with pytest.raises(UserError, match="looks like"):
        T.eval_tokenizer(world / "instruct.json", tokenizer=object())


class StubTokenizer:
    """Labels = the instance ids resampled to the patch grid as the harness does (a
    perfect tokenizer on the grid), or all 0 (one token per image)."""

    def __init__(self, world, perfect=True, patch=8):
        self.world, self.perfect, self.patch = world, perfect, patch
        self.lookup, self.emitted = {}, 0
        for e in formats.load(world / "objects.json", "objects"):
            img = np.asarray(Image.open(e["image"]).convert("RGB"))
            self.lookup[img.tobytes()] = np.asarray(Image.open(e["instances"]))

    def tokenize(self, images):
        labels = []
        for im in images:
            ids = self.lookup[np.asarray(im).tobytes()]
            g = M.resample_ids(ids, (ids.shape[0] // self.patch, ids.shape[1] // self.patch)).astype(np.int64)
            labels.append(g if self.perfect else np.zeros_like(g))
        labels = np.stack(labels)
        num = np.array([len(np.unique(x)) for x in labels])
        self.emitted += int(num.sum())
        return SimpleNamespace(labels=labels, num_tokens=num, grid=labels.shape[1:])


def test_tokenizer_metrics_with_stub(world):
    r = T.eval_tokenizer(world / "objects.json", tokenizer=StubTokenizer(world), batch_size=5)
    assert r["images"] == 12 and r["grid"] == [8, 8]
    # labels equal to the grid's instances: FG-ARI and the grid's mBO are exactly 1; at the
    # pixel level 8-px patches cannot trace round outlines
    assert r["fg_ari"] == 1.0 and r["mbo_grid"] == 1.0 and r["mbo"] < 1.0
    stub = StubTokenizer(world)
    r = T.eval_tokenizer(world / "objects.json", tokenizer=stub, limit=7)
    assert r["images"] == 7 and r["tokens_per_object"] == pytest.approx(stub.emitted / r["objects"])
    # one token per image: ARI is 1 on an image with one object on the grid (identical
    # partitions) and 0 on one with several (everything merged)
    grids = [M.resample_ids(np.asarray(Image.open(e["instances"])), (8, 8))
             for e in formats.load(world / "pairs.json", "pairs")]
    fg = [len(np.unique(g[g > 0])) for g in grids]
    r0 = T.eval_tokenizer(world / "pairs.json", tokenizer=StubTokenizer(world, perfect=False))
    assert 0 < sum(k == 1 for k in fg) < len(fg)   # the known case holds both kinds of image
    assert r0["fg_ari"] == pytest.approx(np.mean([1.0 if k == 1 else 0.0 for k in fg if k > 0]))
    assert r0["tokens_per_image"] == 1.0
