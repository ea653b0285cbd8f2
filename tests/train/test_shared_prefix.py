"""`train.shared_prefix` in the trainer's stage model, and its two benchmark scripts, over the tiny stage-2 run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from setok_cli.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def _sets(stage3_runs) -> list[str]:
    tr = stage3_runs["world"] / "shapes" / "train"
    return ["--set", f"model.setokim_from={stage3_runs['stage2']}", "--set", "model.text_first=null",
            "--set", "model.lora={r: 4, alpha: 8, dropout: 0.0, modules_to_save: [embed_tokens, lm_head]}",
            "--set", f"data.mixture=[{{task: instruct, path: {tr / 'instruct.json'}}}, "
                     f"{{task: segment, path: {tr / 'referring.json'}}}, {{task: edit, path: {tr / 'edits.json'}}}]",
            "--set", "data.batch_size=6", "--set", "data.image_size=32", "--set", "train.progress=false"]


def test_stage_model_passes_the_recipe_setting(stage3_runs):
    """`train.shared_prefix` reaches Setokim.forward from the stage model, and both ways give one loss on a batch."""
    from setok_cli.train.stage3 import build_stage3
    args = _sets(stage3_runs)[1::2]
    losses = []
    for on in (True, False):
        model, ds = build_stage3(load_recipe(ROOT / "recipes" / "tiny" / "stage3.yaml",
                                             args + [f"train.shared_prefix={str(on).lower()}"]))
        assert model.shared_prefix is on
        calls, forward = [], model.setokim.forward
        model.setokim.forward = lambda *a, **kw: calls.append(kw.get("prefix")) or forward(*a, **kw)
        torch.manual_seed(0)
        losses.append(float(model(ds.collate([ds[i] for i in range(6)]))["loss"].detach()))
        assert calls == [on]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_bench_versus_prefix_and_drift(stage3_runs):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_setokim_step.py"),
                        str(ROOT / "recipes" / "tiny" / "stage3.yaml"), "--versus-prefix", "--batches", "2",
                        "--repeats", "1", "--threads", "1", *_sets(stage3_runs)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert out["shared_positions"] >= 2 and out["mean_row_length"] > out["shared_positions"]
    assert all(v > 0 for v in out["median_step_s"].values()) and out["max_loss_difference"] < 1e-4
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prefix_drift.py"),
                        str(ROOT / "recipes" / "tiny" / "stage3.yaml"), "--steps", "3", "--batches", "2",
                        *_sets(stage3_runs)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout[r.stdout.index("{"):])
    losses = out["last_loss"]
    assert len(losses) == 5 and all(v == pytest.approx(losses["whole fp32"], rel=1e-3) for v in losses.values())
    d = out["largest_relative_parameter_difference"]
    assert len(d) == 4 and all(0 <= v < 1 for v in d.values())
