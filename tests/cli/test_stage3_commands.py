"""`setok ask / segment / chat / export` on a tiny stage-3 run trained by the trainer, on good and bad inputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from setok_cli.cli.main import cli


def _run(args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


@pytest.fixture(scope="module")
def run(stage3_runs):
    return stage3_runs["stage3"]


@pytest.fixture(scope="module")
def img(stage3_runs):
    return sorted((stage3_runs["world"] / "shapes" / "test" / "images").glob("*.png"))[0]


def test_ask_prints_an_answer(run, img):
    res = _run(["ask", img, "How many objects are there?", "--model", run, "--threads", "1", "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    assert len(res.output.strip().splitlines()) == 1 and "<image>" not in res.output


@pytest.mark.parametrize("looks,flag,want", [(True, [], True), (True, ["--no-snap"], False), (False, [], False)])
def test_ask_snaps_a_looking_models_tokens_by_default(run, img, monkeypatch, looks, flag, want):
    import setok_cli.tasks.setokim as tasks
    load, seen = tasks.load_setokim, []

    def loaded(path):
        model = load(path)
        model.config.look_answers = looks
        return model
    monkeypatch.setattr(tasks, "load_setokim", loaded)
    monkeypatch.setattr(tasks, "ask", lambda model, pics, qs, opts: seen.append(opts.look_snap) or ["yes"])
    res = _run(["ask", img, "Is there a red circle?", "--model", run, "--threads", "1", *flag])
    assert res.exit_code == 0, res.output
    assert seen == [want]


def test_segment_writes_mask_and_overlay(run, img, tmp_path):
    res = _run(["segment", img, "--query", "the red circle", "--model", run, "--out", tmp_path, "--threads", "1"])
    assert res.exit_code == 0, res.output
    mask = np.asarray(Image.open(tmp_path / f"{img.stem}_mask.png"))
    over = np.asarray(Image.open(tmp_path / f"{img.stem}_overlay.png"))
    src = np.asarray(Image.open(img).convert("RGB"))
    assert mask.shape == src.shape[:2] and set(np.unique(mask)) <= {0, 255}
    assert over.shape == src.shape


@pytest.mark.parametrize("task,kind,key", [("ask", "instruct", "accuracy"), ("segment", "referring", "miou")])
def test_data_file_predictions_are_what_eval_reads(run, stage3_runs, tmp_path, task, kind, key):
    data = stage3_runs["world"] / "shapes" / "test" / f"{kind}.json"
    pred = tmp_path / "pred.json"
    res = _run([task, "--data", data, "--pred-out", pred, "--model", run, "--limit", "3", "--threads", "1",
                "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(pred.read_text())) == 3
    ev = _run(["eval", "vqa" if task == "ask" else task, "--data", data, "--pred", pred, "--json"])
    assert ev.exit_code == 0, ev.output
    scores = json.loads(ev.output)
    assert scores[key] is not None and scores["missing"] > 0


def test_chat_keeps_history_and_writes_images(run, img, tmp_path):
    script = "How many objects are there?\nWhat color is the circle?\n/image {}\n/reset\nGenerate an image: a red circle\n/quit\n"
    res = _run(["chat", img, "--model", run, "--out", tmp_path, "--threads", "1", "--max-new-tokens", "4",
                "--size", "16"], input=script.format(tmp_path / "missing.png"))
    assert res.exit_code == 0, res.output
    replies = [ln for ln in res.output.splitlines() if "setokim>" in ln]
    assert len(replies) == 3
    assert "error:" in res.output and "missing.png" in res.output          # a bad image: one line, chat goes on
    assert "[history cleared]" in res.output
    for ln in res.output.splitlines():
        if ln.startswith("[image: "):
            assert np.asarray(Image.open(ln[len("[image: "):-1])).shape == (16, 16, 3)


def test_chat_session_history(run, img):
    from setok_cli.tasks.chat import ChatSession
    from setok_cli.tasks.setokim import Sampling, load_setokim
    chat = ChatSession(load_setokim(run), str(img), Sampling(max_new_tokens=3), ".")
    chat.reply("How many objects are there?")
    chat.reply("Is there a red circle?")
    assert [t["from"] for t in chat.turns] == ["human", "gpt", "human", "gpt"]
    assert chat.turns[0]["value"].startswith("<image>\n") and "<image>" not in chat.turns[2]["value"]
    assert sum(t["value"].count("<image>") for t in chat.turns) == len(chat.images)


def test_export_merges_lora_and_matches(run, stage3_runs, tmp_path):
    import torch

    from setok_cli.models.setokim import Setokim
    from setok_cli.tasks.setokim import Sampling, ask, load_setokim
    out = tmp_path / "merged"
    res = _run(["export", run, "--out", out])
    assert res.exit_code == 0, res.output
    assert "LoRA merged" in res.output and not (out / "adapter").exists()
    merged = Setokim.from_pretrained(out)
    assert not merged.has_lora and merged.config.lora is None
    adapted = load_setokim(run)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    assert torch.allclose(merged.lm(input_ids=ids).logits, adapted.lm(input_ids=ids).logits, atol=1e-5)
    imgs = sorted((stage3_runs["world"] / "shapes" / "val" / "images").glob("*.png"))[:4]
    q = ["How many objects are there?"] * len(imgs)
    assert ask(merged.eval(), imgs, q, Sampling(max_new_tokens=3)) == ask(adapted, imgs, q, Sampling(max_new_tokens=3))
    res = _run(["export", run, "--out", out])                                   # never over a folder
    assert res.exit_code == 2 and "not empty" in res.output


@pytest.mark.parametrize("args,msg", [
    (["ask", "{img}", "  ", "--model", "{run}"], "empty question"),
    (["ask", "{img}", "--model", "{run}"], "empty question"),
    (["ask", "{missing}", "what?", "--model", "{run}"], "no such file"),
    (["ask", "--data", "{instruct}", "--model", "{run}"], "--pred-out"),
    (["ask", "{img}", "what?", "--model", "{run}", "--show-look", "{out}"], "answers without looking"),
    (["ask", "{img}", "what?", "--model", "{run}", "--snap"], "answers without looking"),
    (["segment", "{img}", "--model", "{run}"], "empty query"),
    (["segment", "{img}", "--query", "x", "--model", "{nope}"], "not found"),
    (["chat", "{missing}", "--model", "{run}"], "no such file"),
    (["export", "{nope}", "--out", "{out}"], "not found"),
])
def test_bad_inputs_are_one_line(run, stage3_runs, img, tmp_path, args, msg):
    fill = {"img": img, "nope": tmp_path / "nope", "run": run, "missing": tmp_path / "missing.png",
            "instruct": stage3_runs["world"] / "shapes" / "test" / "instruct.json", "out": tmp_path / "o"}
    res = _run([a.format(**fill) for a in args])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], res.output
    assert "Traceback" not in res.output


def test_generate_and_edit_take_a_stage3_run(run, img, tmp_path):
    res = _run(["generate", "a red circle", "--model", run, "--out", tmp_path, "--size", "16", "--threads", "1"])
    assert res.exit_code == 0, res.output
    res = _run(["edit", img, "--instruction", "make the red circle blue", "--model", run, "--out", tmp_path,
                "--size", "16", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / f"{img.stem}_edited.png").is_file()


def test_edit_as_a_diff_keeps_pixels_without_a_bank(run, img, tmp_path):
    res = _run(["edit", img, "--instruction", "Remove the red circle.", "--model", run, "--out", tmp_path,
                "--threads", "1", "--size", "32", "--diff", "--keep-pixels"])
    assert res.exit_code == 0, res.output
    edited = np.asarray(Image.open(tmp_path / f"{img.stem}_edited.png"))
    assert edited.shape == np.asarray(Image.open(img).convert("RGB")).shape
    res = _run(["edit", img, "--instruction", "Remove the red circle.", "--model", run, "--out", tmp_path,
                "--threads", "1", "--keep-pixels"])
    assert res.exit_code != 0 and "--keep-pixels needs --bank FILE or --diff" in res.output
