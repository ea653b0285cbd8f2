import json

import numpy as np
import pytest
from click.testing import CliRunner

from setok_cli.cli.main import cli
from setok_cli.data import formats
from setok_cli.eval.harness import vqa_questions
from setok_cli.files import load_ids


def _run(*args):
    return CliRunner().invoke(cli, ["eval", *args])


def test_eval_vqa_table_and_json(world, tmp_path):
    qs = vqa_questions(formats.load(world / "instruct.json", "instruct"))
    pred = tmp_path / "p.json"
    pred.write_text(json.dumps([{"question_id": q["id"], "answer": q["answer"]} for q in qs]))
    r = _run("vqa", "--data", str(world / "instruct.json"), "--pred", str(pred), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["accuracy"] == 1.0
    r = _run("vqa", "--data", str(world / "instruct.json"), "--pred", str(pred))
    assert r.exit_code == 0 and "accuracy" in r.output


def test_eval_vqa_explained_answers_count_by_their_last_part(world, tmp_path):
    """An explained answer ("the red circle at 2, the blue square at 5: yes") counts by its
    last part, in the data and in the predictions; the places themselves are not scored."""
    entries = formats.load(world / "instruct.json", "instruct")
    qs = vqa_questions(entries)
    pred = tmp_path / "p.json"
    say = lambda a: f"the red circle at 2, the blue square at 5: {a}"          # noqa: E731
    wrong = {"yes": "no", "no": "yes"}
    pred.write_text(json.dumps([{"question_id": q["id"], "answer": say(q["answer"]) if i % 2 else
                                 say(wrong.get(q["answer"], "no"))} for i, q in enumerate(qs)]))
    got = json.loads(_run("vqa", "--data", str(world / "instruct.json"), "--pred", str(pred), "--json").output)
    assert got["accuracy"] == pytest.approx(np.mean([i % 2 == 1 for i in range(len(qs))]))
    for e in entries:                                                   # the data explained, the answers plain
        e["conversations"][1]["value"] = say(e["conversations"][1]["value"])
    data = tmp_path / "explained.json"
    data.write_text(json.dumps(entries))
    pred.write_text(json.dumps([{"question_id": q["id"], "answer": q["answer"]} for q in qs]))
    assert json.loads(_run("vqa", "--data", str(data), "--pred", str(pred), "--json").output)["accuracy"] == 1.0


def test_eval_limit_scores_the_first_entries(world, tmp_path):
    """--limit N on a prediction task: only the first N entries count (none missing), so a
    prediction file for the first N questions scores as it would on a file of those N."""
    entries = formats.load(world / "instruct.json", "instruct")
    qs = vqa_questions(entries)
    n = len(qs) // 2
    pred = tmp_path / "p.json"
    pred.write_text(json.dumps([{"question_id": q["id"], "answer": q["answer"] if i % 2 else "wrong"}
                                for i, q in enumerate(qs[:n])]))
    part = tmp_path / "part.json"
    part.write_text(json.dumps(entries[:n]))
    limited = json.loads(_run("vqa", "--data", str(world / "instruct.json"), "--pred", str(pred), "--limit", str(n),
                              "--json").output)
    assert limited["missing"] == 0 and limited["questions"] == n
    assert limited["accuracy"] == pytest.approx((n // 2) / n)
    whole = json.loads(_run("vqa", "--data", str(part), "--pred", str(pred), "--json").output)
    assert {k: v for k, v in limited.items() if k != "data"} == {k: v for k, v in whole.items() if k != "data"}
    full = json.loads(_run("vqa", "--data", str(world / "instruct.json"), "--pred", str(pred), "--json").output)
    assert full["missing"] == len(qs) - n


@pytest.mark.parametrize("args, message", [
    (["vqa", "--data", "missing.json", "--pred", "p.json"], "data file not found"),
    (["segment", "--data", "{w}/referring.json"], "needs --pred"),
    (["tokenizer", "--data", "{w}/instruct.json"], "looks like instruct data"),
    (["tokenizer", "--data", "{w}/objects.json", "--pred", "x.json"], "--pred is not used"),
    (["caption", "--data", "{w}/pairs.json", "--pred", "x.json", "--k", "3"], "tokenizer and reconstruct tasks only"),
    (["vqa", "--data", "{w}/instruct.json", "--pred", "x.json", "--steps", "3"], "reconstruct task only"),
])
def test_eval_user_errors(world, args, message):
    r = _run(*[a.format(w=world) for a in args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_eval_tokenizer_end_to_end(world):
    from setok_cli.eval.harness import eval_tokenizer

    r = _run("tokenizer", "--data", str(world / "objects.json"), "--limit", "4", "--batch-size", "2",
             "--mode", "hard", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    entries = formats.load(world / "objects.json", "objects")[:4]
    objects = sum(len(np.unique(ids[ids > 0])) for ids in (load_ids(e["instances"]) for e in entries))
    assert res["images"] == 4 and res["objects"] == objects
    # the command scores what the library does with the same settings
    lib = eval_tokenizer(world / "objects.json", mode="hard", limit=4, batch_size=2)
    for key in ("fg_ari", "mbo", "mbo_grid", "tokens_per_image", "grid"):
        assert res[key] == lib[key], key
