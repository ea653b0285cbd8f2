import importlib.util
import json

import pytest
from click.testing import CliRunner

from setok_cli.cli.main import cli
from setok_cli.data import formats
from setok_cli.eval.harness import vqa_questions


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


@pytest.mark.skipif(importlib.util.find_spec("setok_cli.models.setok") is None,
                    reason="setok_cli.models.setok (the tokenizer, issue 3) is not in this checkout yet")
def test_eval_tokenizer_end_to_end(world):
    r = _run("tokenizer", "--data", str(world / "objects.json"), "--limit", "4", "--batch-size", "2",
             "--mode", "hard", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["images"] == 4 and res["objects"] > 0
    assert -1.0 <= res["fg_ari"] <= 1.0 and 0.0 <= res["mbo"] <= 1.0
    assert res["tokens_per_image"] >= 1 and res["images_per_s"] > 0
