"""Stage III's text-only first phase (`model.text_first`, train/text_first.py)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from setok_cli.errors import UserError
from setok_cli.train.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
pytestmark = pytest.mark.usefixtures("one_thread")


def _echo_rows(path: Path, n: int, seed: int = 0) -> Path:
    from setok_cli.data.drills import drill_turns, list_drill
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        q, a = drill_turns(*list_drill(rng), "echo")
        rows.append({"id": str(i), "image": "x.png", "conversations": [{"from": "human", "value": "<image>\n" + q},
                                                                      {"from": "gpt", "value": a}]})
    path.write_text(json.dumps(rows))
    return path


def _tiny_lm(tok):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=128))


def _words():
    from setok_cli.data.shapes_world import COLOR_NAMES, SHAPES
    from setok_cli.models.setokim import build_word_tokenizer
    return build_word_tokenizer(extra_texts=["Is there a an yes no , ? :"] + [f"{c} {s}s" for c in COLOR_NAMES
                                                                             for s in SHAPES])


def test_text_rows_drop_images_and_refuse_written_ones(tmp_path):
    from setok_cli.models.setokim.text import IGNORE_INDEX
    from setok_cli.train.text_first import text_batch, text_rows
    rows = text_rows(_echo_rows(tmp_path / "d.json", 3))
    assert len(rows) == 3 and all("<image>" not in t["value"] for c in rows for t in c)
    assert rows[0][0]["value"].startswith("Is there")
    tok = _words()
    ids, att, lab = text_batch(rows, tok, system="")
    assert ids.shape == att.shape == lab.shape and ids.shape[0] == 3
    # only the answers (and their </s>) are labelled, and labels are the ids there
    for r, conv in enumerate(rows):
        n = len(tok.tokenize(conv[1]["value"])) + 1
        assert (lab[r] != IGNORE_INDEX).sum().item() == n
        keep = lab[r] != IGNORE_INDEX
        assert torch.equal(lab[r][keep], ids[r][keep])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "0", "conversations": [{"from": "human", "value": "Draw a red circle."},
                                                             {"from": "gpt", "value": "<image>"}]}]))
    with pytest.raises(UserError, match="answers with an image"):
        text_rows(bad)
    with pytest.raises(UserError, match="not found|no file"):
        text_rows(tmp_path / "nope.json")


def test_text_first_learns_the_drills_and_merges(tmp_path):
    """A learning curve: the mean loss of the last steps is well under the first's; the result is a plain LM (the
    adapters merged) whose weights moved, and the same seed gives the same LM."""
    from setok_cli.models.setokim.config import LoraSpec
    from setok_cli.train.recipe import OptimRecipe
    from setok_cli.train.text_first import text_rows, train_text_first
    tok = _words()
    rows = text_rows(_echo_rows(tmp_path / "d.json", 64))
    spec = LoraSpec(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"],
                    modules_to_save=["embed_tokens", "lm_head"])
    kw = dict(lora=spec, optim=OptimRecipe(warmup_ratio=0.05), steps=40, lr=1e-2, batch_size=16, seed=0, system="")
    before = _tiny_lm(tok)
    lm, losses = train_text_first(_tiny_lm(tok), tok, rows, **kw)
    assert len(losses) == 40 and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    assert type(lm).__name__ == "LlamaForCausalLM"
    assert set(lm.state_dict()) == set(before.state_dict())
    assert any(not torch.equal(a, b) for a, b in zip(lm.parameters(), before.parameters()))
    again, _ = train_text_first(_tiny_lm(tok), tok, rows, **kw)
    assert all(torch.equal(a, b) for a, b in zip(lm.parameters(), again.parameters()))


def test_stage3_starts_from_the_drilled_lm_and_reuses_it(stage3_runs, tmp_path, monkeypatch):
    """model.text_first: stage III's base LM is the drilled one (stage II's LM changed, fresh adapters on it), the
    drilled LM is written to OUTPUT_DIR/text_first/, a second build with the same settings loads it, other settings
    train again; a trained checkpoint holds it as its base lm/."""
    import setok_cli.train.text_first as tf
    from setok_cli.models.setokim import Setokim
    from setok_cli.models.setokim.lora import _base_state_dict as _plain

    def _base_state_dict(lm):
        return {k.replace("base_model.model.", "", 1): v for k, v in _plain(lm).items()}
    from setok_cli.train.stage3 import build_stage3_model
    from setok_cli.train.trainer import Trainer
    rows = _echo_rows(tmp_path / "drills.json", 24)
    out = tmp_path / "run"
    sets = [f"model.setokim_from={stage3_runs['stage2']}", f"output_dir={out}", "model.lora.r=4", "model.lora.alpha=8",
            f"model.text_first={{path: {rows}, steps: 3, lr: 1.0e-2, batch_size: 8}}"]
    r = load_recipe(RECIPES / "tiny" / "stage3.yaml", sets)
    model = build_stage3_model(r)
    stage2_lm = Setokim.from_pretrained(str(stage3_runs["stage2"])).lm.state_dict()
    base = _base_state_dict(model.setokim.lm)
    assert model.setokim.has_lora and set(base) == set(stage2_lm)
    assert any(not torch.equal(base[k], stage2_lm[k]) for k in base)
    record = json.loads((out / "text_first" / "phase.json").read_text())
    assert len(record["losses"]) == 3 and record["settings"]["steps"] == 3 and record["settings"]["rows"] == 24

    def no_training(*a, **k):
        raise AssertionError("trained again")
    monkeypatch.setattr(tf, "train_text_first", no_training)
    again = _base_state_dict(build_stage3_model(r).setokim.lm)
    assert all(torch.equal(again[k], base[k]) for k in base)
    with pytest.raises(AssertionError, match="trained again"):
        build_stage3_model(load_recipe(RECIPES / "tiny" / "stage3.yaml", sets + ["model.text_first.steps=4"]))
    other = tmp_path / "other.json"                    # the same number of rows, other drills: trained again
    _echo_rows(other, 24, seed=1)
    with pytest.raises(AssertionError, match="trained again"):
        build_stage3_model(load_recipe(RECIPES / "tiny" / "stage3.yaml", sets + [f"model.text_first.path={other}"]))
    kept = rows.read_bytes()
    rows.write_bytes(other.read_bytes())               # the same path, its contents changed
    with pytest.raises(AssertionError, match="trained again"):
        build_stage3_model(r)
    rows.write_bytes(kept)
    monkeypatch.undo()

    # errors before any training: no adapters to train through, bad settings, no file
    for extra, msg in ((["model.lora=null"], "give model.lora"), (["model.text_first.steps=0"], "steps must be >= 1"),
                       ([f"model.text_first.path={tmp_path / 'nope.json'}"], "no file"),
                       (["model.text_first.path=''"], "path is missing")):
        with pytest.raises(UserError, match=msg):
            build_stage3_model(load_recipe(RECIPES / "tiny" / "stage3.yaml", sets + extra))

    tr = stage3_runs["world"] / "shapes" / "train"
    run = load_recipe(RECIPES / "tiny" / "stage3.yaml", sets + [
        f"data.mixture=[{{task: instruct, path: {tr / 'instruct.json'}}}]", "data.image_size=32", "data.batch_size=4",
        "train.max_steps=2", "train.checkpoint_every=2", "train.progress=false", "train.threads=1",
        "train.mixed_precision=no"])
    Trainer(run).train()
    saved = Setokim.from_pretrained(str(out))
    got = _base_state_dict(saved.lm)
    assert all(torch.equal(got[k], base[k]) for k in base)


def test_prefix_loss_equals_one_pass_over_the_rows(tmp_path):
    """The shared prefix (BOS and system prompt) run once: the same loss and LoRA gradients as the plain forward, and
    the prefix ends before the first labelled token (and the one before it)."""
    from setok_cli.models.setokim.config import LoraSpec
    from setok_cli.models.setokim.lora import wrap_lora
    from setok_cli.models.setokim.text import IGNORE_INDEX, VICUNA_SYSTEM
    from setok_cli.train.text_first import prefix_loss, shared_prefix, text_batch, text_rows
    tok = _words()
    rows = text_rows(_echo_rows(tmp_path / "d.json", 8))
    ids, att, lab = text_batch(rows, tok, system=VICUNA_SYSTEM)
    P = shared_prefix(ids, lab)
    assert P >= len(tok.tokenize(VICUNA_SYSTEM)) and (lab[:, :P + 1] == IGNORE_INDEX).all()
    assert (ids[:, :P] == ids[:1, :P]).all()
    lm = wrap_lora(_tiny_lm(tok), LoraSpec(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                                           modules_to_save=["lm_head"]), 0)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)           # B = 0 at the start: give the adapters' own gradients a path
    params = [p for p in lm.parameters() if p.requires_grad]
    plain = lm(input_ids=ids, attention_mask=att, labels=lab).loss
    g_plain = torch.autograd.grad(plain, params)
    shared = prefix_loss(lm, ids, att, lab)
    g_shared = torch.autograd.grad(shared, params)
    assert torch.allclose(plain, shared, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g_plain, g_shared))
    assert max(a.abs().max().item() for a in g_plain) > 1e-3
    # without the system prompt only "USER: Is there" is shared; rows that differ after BOS take the plain pass
    ids2, att2, lab2 = text_batch(rows, tok, system="")
    assert 2 <= shared_prefix(ids2, lab2) < P
    assert torch.allclose(prefix_loss(lm, ids2, att2, lab2), lm(input_ids=ids2, attention_mask=att2, labels=lab2).loss,
                          atol=1e-5)
    ids2[1, 1] = ids2[0, 1] + 1
    assert shared_prefix(ids2, lab2) == 1
    assert torch.allclose(prefix_loss(lm, ids2, att2, lab2), lm(input_ids=ids2, attention_mask=att2, labels=lab2).loss)


def test_bench_text_first_times_both_ways(stage3_runs, tmp_path):
    """benchmarks/bench_text_first.py over a tiny stage-2 run: both ways timed, the same loss."""
    import re
    import subprocess
    import sys

    from setok_cli.train.recipe import dump_recipe
    rows = _echo_rows(tmp_path / "drills.json", 12)
    recipe = tmp_path / "r.yaml"
    dump_recipe(load_recipe(RECIPES / "tiny" / "stage3.yaml", [
        f"model.text_first={{path: {rows}, steps: 3, lr: 1.0e-3, batch_size: 4}}", "model.lora.r=4"]), recipe)
    r = subprocess.run([sys.executable, str(RECIPES.parent / "benchmarks" / "bench_text_first.py"), "--model",
                        str(stage3_runs["stage2"]), "--recipe", str(recipe), "--steps", "2", "--threads", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = re.search(r"one pass ([\d.]+) s\s+shared prefix ([\d.]+) s\s+ratio ([\d.]+)\s+largest loss difference (\S+)",
                  r.stdout)
    assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0 and float(m.group(4)) < 1e-4, r.stdout


def test_dry_run_names_the_text_phase(stage3_runs):
    from click.testing import CliRunner

    from setok_cli.cli.main import cli
    args = ["train", str(RECIPES / "tiny" / "stage3.yaml"), "--set", f"model.setokim_from={stage3_runs['stage2']}",
            "--dry-run"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "before stage III, text first: 1000 steps of 32 rows of data/shapes/train/instruct_list_drills_echo.json" \
        in r.output
    r = CliRunner().invoke(cli, args + ["--set", "model.text_first=null"])
    assert r.exit_code == 0 and "text first" not in r.output
