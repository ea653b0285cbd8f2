"""`setok caption / generate / edit` on a tiny stage-2 run trained by `setok train`, on good and bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from setok_cli.cli.main import cli

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _run(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(stage2_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmd") / "run"
    tr = stage2_world / "shapes" / "train"
    res = _run(["train", RECIPES / "tiny" / "stage2.yaml",
                "--set", f"model.setokim.stage1={stage2_world / 'stage1'}", "--output-dir", out,
                "--set", "model.setokim.lm={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
                         "num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 256}",
                "--set", f"data.mixture=[{{task: caption, path: {tr / 'pairs.json'}}}, "
                         f"{{task: generate, path: {tr / 'pairs.json'}}}, {{task: edit, path: {tr / 'edits.json'}}}]",
                "--set", "data.image_size=32", "--set", "data.batch_size=6", "--set", "train.max_steps=6",
                "--set", "data.vocab_files=[]",
                "--set", "train.checkpoint_every=6", "--set", "train.progress=false", "--set", "train.threads=1",
                "--set", "model.setokim.max_visual_tokens=4"])
    assert res.exit_code == 0, res.output
    return out


def test_caption_prints_one_line_per_image(run, stage2_world):
    imgs = sorted((stage2_world / "shapes" / "test" / "images").glob("*.png"))[:3]
    res = _run(["caption", *imgs, "--model", run, "--max-new-tokens", "5", "--threads", "1"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == [str(p) for p in imgs]


def test_generate_writes_images_and_edit_its_pair(run, stage2_world, tmp_path):
    res = _run(["generate", "two red circles", "--model", run, "--out", tmp_path, "--num-images", "2",
                "--size", "24", "--threads", "1"])
    assert res.exit_code == 0, res.output
    pngs = sorted(tmp_path.glob("two_red_circles_*.png"))
    assert [p.name for p in pngs] == ["two_red_circles_0.png", "two_red_circles_1.png"]
    assert np.asarray(Image.open(pngs[0])).shape == (24, 24, 3)
    src = sorted((stage2_world / "shapes" / "test" / "images").glob("*.png"))[0]
    res = _run(["edit", src, "--instruction", "make the red circle blue", "--model", run, "--out", tmp_path,
                "--size", "24", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert np.asarray(Image.open(tmp_path / f"{src.stem}_edited.png")).shape == (24, 24, 3)
    assert np.asarray(Image.open(tmp_path / f"{src.stem}_edit.png")).shape == (24, 24 + 4 + 24, 3)


def test_codebook_run_with_guidance(stage2_world, tmp_path):
    """The codebook head (refined) trained with the generate_uncond task by `setok train`, then
    `setok generate --guidance` over a data file: one image per caption, as `setok eval` reads."""
    tr, out = stage2_world / "shapes" / "train", tmp_path / "run"
    res = _run(["train", RECIPES / "tiny" / "stage2.yaml",
                "--set", f"model.setokim.stage1={stage2_world / 'stage1'}", "--output-dir", out,
                "--set", "model.setokim.lm={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
                         "num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 256}",
                "--set", "model.setokim.visual_head=codebook",
                "--set", "model.setokim.codebook={codes: 16, fit_images: 24, refine: true}",
                "--set", f"data.mixture=[{{task: generate, path: {tr / 'pairs.json'}}}, "
                         f"{{task: generate_uncond, path: {tr / 'pairs.json'}, weight: 0.5}}]",
                "--set", "data.image_size=32", "--set", "data.batch_size=6", "--set", "train.max_steps=4",
                "--set", "data.vocab_files=[]", "--set", "train.checkpoint_every=4", "--set", "train.progress=false",
                "--set", "train.threads=1", "--set", "model.setokim.max_visual_tokens=4"])
    assert res.exit_code == 0, res.output
    data = stage2_world / "shapes" / "test" / "pairs.json"
    pred = tmp_path / "gen.json"
    res = _run(["generate", "--data", data, "--pred-out", pred, "--model", out, "--limit", "3", "--size", "24",
                "--guidance", "2.5", "--visual-temperature", "0.5", "--threads", "1"])
    assert res.exit_code == 0, res.output
    got = json.loads(pred.read_text())
    assert len(got) == 3 and all((tmp_path / g["image"]).exists() for g in got)
    res = _run(["generate", "a red circle", "--model", out, "--out", tmp_path, "--guidance", "-1"])
    assert res.exit_code != 0 and "Traceback" not in res.output


def test_place_head_run_generates_and_edits(stage2_world, tmp_path):
    """A stage-2 run with a place head (`model.setokim.place_head`), trained by `setok train`;
    `setok generate` and `setok edit` take --place and --place-temperature, the same seed gives
    the same picture, and a bad mode is a usage error."""
    tr, out = stage2_world / "shapes" / "train", tmp_path / "run"
    res = _run(["train", RECIPES / "tiny" / "stage2.yaml",
                "--set", f"model.setokim.stage1={stage2_world / 'stage1'}", "--output-dir", out,
                "--set", "model.setokim.lm={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
                         "num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 256}",
                "--set", "model.setokim.place_head=256", "--set", "model.setokim.place_loss_weight=0.1",
                "--set", f"data.mixture=[{{task: generate, path: {tr / 'pairs.json'}}}, "
                         f"{{task: edit, path: {tr / 'edits.json'}}}]",
                "--set", "data.image_size=32", "--set", "data.batch_size=6", "--set", "train.max_steps=4",
                "--set", "data.vocab_files=[]", "--set", "train.checkpoint_every=4", "--set", "train.progress=false",
                "--set", "train.threads=1", "--set", "model.setokim.max_visual_tokens=4"])
    assert res.exit_code == 0, res.output
    pics = []
    for name, extra in (("a", []), ("b", []), ("c", ["--place-temperature", "0"])):
        res = _run(["generate", "two red circles", "--model", out, "--out", tmp_path / name, "--size", "16",
                    "--threads", "1", "--place", "draw", *extra])
        assert res.exit_code == 0, res.output
        pics.append(np.asarray(Image.open(next((tmp_path / name).glob("*.png")))))
    assert np.array_equal(pics[0], pics[1])
    img = next((stage2_world / "shapes" / "test" / "images").glob("*.png"))
    for mode in ("auto", "draw", "off"):
        res = _run(["edit", img, "--instruction", "make the red circle blue", "--model", out, "--out",
                    tmp_path / f"e_{mode}", "--size", "16", "--threads", "1", "--place", mode])
        assert res.exit_code == 0, res.output
    res = _run(["generate", "a red circle", "--model", out, "--out", tmp_path, "--place", "never"])
    assert res.exit_code == 2 and "Invalid value for '--place'" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("task,kind", [("caption", "pairs"), ("generate", "pairs"), ("edit", "edits")])
def test_data_file_predictions_are_what_eval_reads(run, stage2_world, tmp_path, task, kind):
    data = stage2_world / "shapes" / "test" / f"{kind}.json"
    pred = tmp_path / "pred.json"
    res = _run([task, "--data", data, "--pred-out", pred, "--model", run, "--limit", "2", "--threads", "1",
                "--max-new-tokens", "4"] + (["--size", "32"] if task != "caption" else []))
    assert res.exit_code == 0, res.output
    preds = json.loads(pred.read_text())
    assert len(preds) == 2
    ev = _run(["eval", task, "--data", data, "--pred", pred, "--json"])
    assert ev.exit_code == 0, ev.output
    scores = json.loads(ev.output)
    entries = json.loads(data.read_text())
    assert [p["index"] for p in preds] == [0, 1]          # captions repeat: predictions name their entry
    assert scores["missing"] == len(entries) - 2


def test_bank_then_generate_and_edit_with_it(run, stage2_world, tmp_path):
    bank = tmp_path / "bank.safetensors"
    res = _run(["bank", stage2_world / "shapes" / "train" / "pairs.json", "--model", run, "--out", bank,
                "--limit", "5", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert bank.is_file() and "of 5 images" in res.output
    res = _run(["generate", "two red circles", "--model", run, "--out", tmp_path, "--size", "24", "--threads", "1",
                "--bank", bank])
    assert res.exit_code == 0, res.output
    assert np.asarray(Image.open(tmp_path / "two_red_circles_0.png")).shape == (24, 24, 3)
    data = stage2_world / "shapes" / "test" / "edits.json"
    res = _run(["edit", "--data", data, "--pred-out", tmp_path / "e.json", "--model", run, "--limit", "2",
                "--threads", "1", "--size", "24", "--bank", bank])
    assert res.exit_code == 0, res.output
    assert len(json.loads((tmp_path / "e.json").read_text())) == 2
    img = sorted((stage2_world / "shapes" / "test" / "images").glob("*.png"))[0]
    res = _run(["edit", img, "--instruction", "make the red circle blue", "--model", run, "--out", tmp_path / "kp",
                "--threads", "1", "--size", "24", "--bank", bank, "--keep-pixels"])
    assert res.exit_code == 0, res.output
    assert np.asarray(Image.open(tmp_path / "kp" / f"{img.stem}_edited.png")).shape == (24, 24, 3)
    res = _run(["edit", "--data", data, "--pred-out", tmp_path / "k2.json", "--model", run, "--limit", "1",
                "--threads", "1", "--size", "24", "--bank", bank, "--keep-pixels", "2"])
    assert res.exit_code == 0, res.output
    # a bank written before layouts existed still works, with a note that objects are not kept apart
    from setok_cli.models.setokim.bank import load_bank, save_bank
    from setok_cli.tasks.setokim import load_setokim
    model = load_setokim(run)
    save_bank(tmp_path / "old.safetensors", load_bank(bank, model), model)
    res = _run(["generate", "two red circles", "--model", run, "--out", tmp_path / "old", "--size", "24",
                "--threads", "1", "--bank", tmp_path / "old.safetensors", "--snap-metric", "l2"])
    assert res.exit_code == 0 and "stores no token layouts" in res.output, res.output


@pytest.mark.parametrize("args,msg", [
    (["caption", "{img}", "--model", "{nope}"], "not found"),
    (["caption", "{missing}", "--model", "{run}"], "no such file"),
    (["generate", "  ", "--model", "{run}"], "empty prompt"),
    (["edit", "{img}", "--instruction", " ", "--model", "{run}"], "empty instruction"),
    (["edit", "{img}", "--model", "{run}"], "empty instruction"),
    (["caption", "--data", "{pairs}", "--model", "{run}"], "--pred-out"),
    (["caption", "--model", "{run}"], "give IMAGE"),
    (["generate", "a red circle", "--model", "{stage1}"], "holds"),
    (["generate", "a red circle", "--model", "{run}", "--bank", "{nope}"], "no such token bank"),
    (["bank", "{nope}", "--model", "{run}", "--out", "{nope}"], "no such data file"),
    (["edit", "{img}", "--instruction", "make it red", "--model", "{run}", "--keep-pixels"], "needs --bank"),
])
def test_bad_inputs_are_one_line(run, stage2_world, tmp_path, args, msg):
    img = sorted((stage2_world / "shapes" / "test" / "images").glob("*.png"))[0]
    fill = {"img": img, "nope": tmp_path / "nope", "run": run, "missing": tmp_path / "missing.png",
            "pairs": stage2_world / "shapes" / "test" / "pairs.json",
            "stage1": stage2_world / "stage1" / "checkpoints" / "step_00000010" / "setok"}
    res = _run([a.format(**fill) for a in args])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("opt,value", [("--max-overlap", "1.5"), ("--snap-metric", "dot")])
def test_bad_snap_options_are_usage_errors(run, opt, value):
    res = _run(["generate", "a red circle", "--model", run, opt, value])
    assert res.exit_code == 2 and f"Invalid value for '{opt}'" in res.output and "Traceback" not in res.output


def test_detokenizer_option_decodes_with_another_stage1_run(run, stage2_world, tmp_path, write_tiny_stage1):
    """--detokenizer RUN: the same tokenizer's detokenizer decodes (its own stage-1 folder gives the
    same picture; new detokenizer weights a different one); another tokenizer is one line."""
    import shutil

    import torch

    from setok_cli.models.detokenizer import Detokenizer
    prompt = ["generate", "two red circles", "--model", run, "--size", "16", "--threads", "1"]
    pics = {}
    for name, extra in (("own", []), ("same", ["--detokenizer", stage2_world / "stage1"])):
        res = _run([*prompt, "--out", tmp_path / name, *extra])
        assert res.exit_code == 0, res.output
        pics[name] = np.asarray(Image.open(next((tmp_path / name).glob("*.png"))))
    assert np.array_equal(pics["own"], pics["same"])
    ck = next((stage2_world / "stage1" / "checkpoints").iterdir())
    other = tmp_path / "refined"
    shutil.copytree(ck, other)
    det = Detokenizer.from_pretrained(other / "detokenizer")
    with torch.no_grad():
        for p in det.parameters():
            p.add_(0.5 * torch.randn_like(p))
    det.save_pretrained(other / "detokenizer")
    res = _run([*prompt, "--out", tmp_path / "refined_out", "--detokenizer", other])
    assert res.exit_code == 0, res.output
    assert not np.array_equal(pics["own"], np.asarray(Image.open(next((tmp_path / "refined_out").glob("*.png")))))

    alien = write_tiny_stage1(tmp_path / "alien", merger_dim=24)
    res = _run([*prompt, "--out", tmp_path / "alien_out", "--detokenizer", alien])
    assert res.exit_code == 2
    assert res.output.startswith("error:") and "tokenizer is not this model's" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not list((tmp_path / "alien_out").glob("*.png"))
    res = _run([*prompt, "--out", tmp_path / "x", "--detokenizer", tmp_path / "nowhere"])
    assert res.exit_code == 2 and res.output.startswith("error:") and len(res.output.strip().splitlines()) == 1
