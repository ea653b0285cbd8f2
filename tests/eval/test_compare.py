import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from setok_cli.cli.main import cli
from setok_cli.data import formats
from setok_cli.errors import UserError
from setok_cli.eval import harness as T
from setok_cli.eval.compare import Tally, compare, paired_bootstrap


def _dump(path, obj):
    path.write_text(json.dumps(obj))
    return path


def _mixed(world, tmp_path, task):
    """(data, predictions) for `task`: right on even entries, wrong on odd ones."""
    if task == "vqa":
        data = world / "instruct.json"
        qs = T.vqa_questions(formats.load(data, "instruct"))
        return data, [{"question_id": q["id"], "answer": q["answer"] if i % 2 == 0 else "banana"}
                      for i, q in enumerate(qs)]
    if task == "segment":
        data = world / "referring.json"
        preds = []
        for i, e in enumerate(json.loads(data.read_text())):
            m = np.asarray(Image.open(world / e["mask"]))
            Image.fromarray(m if i % 2 == 0 else np.roll(m, 9, axis=1)).save(tmp_path / f"m{i}.png")
            preds.append({"index": i, "mask": f"m{i}.png"})
        return data, preds
    data = world / ("edits.json" if task == "edit" else "pairs.json")
    entries = json.loads(data.read_text())
    if task == "caption":
        return data, [{"image": e["image"], "caption": e["caption"] if i % 2 == 0 else "A picture of a red circle."}
                      for i, e in enumerate(entries)]
    if task == "generate":
        return data, [{"index": i, "image": str(world / e["image"] if i % 2 == 0 else world / entries[0]["image"])}
                      for i, e in enumerate(entries)]
    return data, [{"index": i, "image": str(world / (e["target"] if i % 2 == 0 else e["source"]))}
                  for i, e in enumerate(entries)]


@pytest.mark.parametrize("task", ["vqa", "caption", "segment", "generate", "edit"])
def test_the_tally_gives_each_metric_the_task_reports(world, tmp_path, task):
    data, preds = _mixed(world, tmp_path, task)
    tally = Tally()
    r = getattr(T, f"eval_{task}")(data, _dump(tmp_path / "p.json", preds), tally=tally)
    shared = set(tally.arrays()) & {k for k, v in r.items() if isinstance(v, float)}
    headline = {"vqa": "accuracy", "caption": "recall", "segment": "miou", "generate": "object_recall",
                "edit": "applied"}[task]
    assert headline in shared and len(shared) >= 3
    for metric in shared:
        assert tally.value(metric) == pytest.approx(r[metric]), metric
    assert 0.0 < r[headline] < 1.0                     # the mixture is neither all right nor all wrong


def test_a_file_against_itself_differs_by_nothing(world, tmp_path):
    data, preds = _mixed(world, tmp_path, "vqa")
    p = _dump(tmp_path / "p.json", preds)
    d = compare("vqa", data, p, p, resamples=200)["diff"]["accuracy"]
    assert d["diff"] == 0.0 and d["lo"] == 0.0 and d["hi"] == 0.0


def _bernoulli(values):
    t = Tally()
    t.n = len(values)
    for i, v in enumerate(values):
        t.add("accuracy", i, v)
    return t


def test_the_interval_is_paired():
    # the same 300 of 400 answers right in both, and 10 more right in A only: every paired resample
    # has A >= B, while resampling the two files apart would often put A under B
    b = np.zeros(400)
    b[:300] = 1
    a = b.copy()
    a[300:310] = 1
    d = paired_bootstrap(_bernoulli(a), _bernoulli(b), resamples=2000)["accuracy"]
    assert d["diff"] == pytest.approx(10 / 400)
    assert d["lo"] >= 0.0 and d["hi"] <= 25 / 400


def test_the_interval_has_the_textbook_width_for_independent_answers():
    rng = np.random.default_rng(3)
    a, b = rng.random(2000) < 0.8, rng.random(2000) < 0.6
    d = paired_bootstrap(_bernoulli(a), _bernoulli(b), resamples=4000, seed=1)["accuracy"]
    se = np.sqrt((a.mean() * (1 - a.mean()) + b.mean() * (1 - b.mean())) / 2000)   # no covariance
    assert d["hi"] - d["lo"] == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert d["lo"] < d["diff"] < d["hi"]


def test_different_items_are_refused():
    with pytest.raises(UserError, match="not the same data"):
        paired_bootstrap(_bernoulli([1, 0]), _bernoulli([1, 0, 1]))


def test_cli_against(world, tmp_path):
    data, preds = _mixed(world, tmp_path, "vqa")
    a = _dump(tmp_path / "a.json", preds)
    b = _dump(tmp_path / "b.json", [{**p, "answer": "banana"} for p in preds])
    run = CliRunner().invoke(cli, ["eval", "vqa", "--data", str(data), "--pred", str(a), "--against", str(b),
                                   "--json", "--resamples", "300"])
    assert run.exit_code == 0, run.output
    d = json.loads(run.output)["diff"]["accuracy"]
    assert d["diff"] == pytest.approx(d["a"]) and d["b"] == 0.0 and 0.0 < d["lo"] <= d["diff"] <= d["hi"]
    run = CliRunner().invoke(cli, ["eval", "vqa", "--data", str(data), "--pred", str(a), "--against", str(b)])
    assert run.exit_code == 0 and "95% interval" in run.output and "accuracy" in run.output
    for args, message in ((["tokenizer", "--data", str(data), "--against", str(b)], "compares prediction files"),
                          (["vqa", "--data", str(data), "--against", str(b)], "--against needs --pred"),
                          (["vqa", "--data", str(data), "--pred", str(a), "--against", str(b), "--threads", "2"],
                           "do not apply")):
        run = CliRunner().invoke(cli, ["eval", *args])
        assert run.exit_code != 0 and message in run.output, run.output
