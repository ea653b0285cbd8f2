"""bench/reduce/ and `setok bench-reduce`: FLOPs formula, the cost table, the accuracy protocol
on a tiny world built in tmp, the plot, and the command's one-line errors."""
import json

import pytest
import torch
from click.testing import CliRunner

from setok_cli.bench import reduce as R
from setok_cli.cli.main import cli

torch.set_num_threads(1)


def test_prefill_flops_of_llava_7b_at_one_token():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=32, vocab_size=32000)
    # per layer: q, k, v, o 4 * 2 * 4096^2 + attention 4 * 4096 + MLP 6 * 4096 * 11008; LM head 2 * 4096 * 32000
    assert R.prefill_flops(cfg, 1) == 32 * (134_217_728 + 16_384 + 270_532_608) + 262_144_000 == 13_214_679_040


def test_prefill_flops_linear_part_is_twice_the_weights():
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=3, vocab_size=50)
    m = LlamaModel(cfg)
    linear = sum(p.numel() for n, p in m.named_parameters() if "proj" in n)
    L = 7
    attn = 3 * 2 * 2 * L * L * 64
    assert R.prefill_flops(cfg, L, logits=0) == 2 * L * linear + attn


def _tiny_model():
    from setok_cli.integrations.llava import BuiltinTower

    return R.tiny_llava(vocab_size=40, image_token_id=39, pad_token_id=0, hidden=32, layers=1, heads=2,
                        intermediate=64, tower=BuiltinTower())


def test_cost_table_on_a_tiny_model(chelsea_path):
    out = R.cost_table(repeats=1, budgets=(16, 576), methods=("setok", "pool2d"), photos=[chelsea_path],
                       model=_tiny_model())
    ks = [r["visual_tokens"] for r in out["prefill"]]
    assert 16 in ks and 576 in ks and ks == sorted(ks)
    full = next(r for r in out["prefill"] if r["visual_tokens"] == 576)
    small = next(r for r in out["prefill"] if r["visual_tokens"] == 16)
    assert full["prefill_flops"] > small["prefill_flops"] > 0
    assert full["kv_cache_bytes"] == 2 * 1 * (576 + R.TEXT_TOKENS) * 32 * 4  # k and v, 1 layer, fp32
    assert {r["method"] for r in out["reducers"]} == {"setok", "pool2d"}
    assert {r["D"] for r in out["reducers"]} == {48, 1024}
    g = out["goal"][0]
    assert g["images"] == "real photos" and g["ttft_576_ms"] > 0 and g["flops_ratio"] > 1
    assert "skipped" in out["real_model"]


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from setok_cli.data.shapes import generate

    root = tmp_path_factory.mktemp("world")
    generate(root, n=30, size=64, seed=0)
    return root


def test_accuracy_protocol_and_plot(tiny_world, tmp_path):
    p = R.Protocol(hidden=16, layers=1, heads=2, intermediate=32, steps=4, eval_steps=(2, 4), batch_size=4,
                   warmup=1, eval_batch=64)
    acc = R.accuracy_table(str(tiny_world), tmp_path, p, budgets=(16,), methods=("setok", "pool2d"))
    names = [(r["method"], r["budget"]) for r in acc["runs"]]
    assert names == [("full", 576), ("setok", None), ("setok", 16), ("pool2d", 16)]
    for r in acc["runs"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["steps_chosen"] in (2, 4)
    assert acc["runs"][2]["tokens_mean"] == acc["runs"][3]["tokens_mean"] == 16  # same budget, same count
    assert acc["runs"][1]["tokens_max"] <= 64
    goals = R.accuracy_goals(acc, (16,))
    assert goals["per_budget"][0]["best_baseline"] == "pool2d" and "natural" in goals
    png = tmp_path / "plot.png"
    R.plot(acc, png)
    from PIL import Image
    with Image.open(png) as im:
        assert im.size[0] > 400


def test_parallel_fine_tunes_give_the_same_table(tiny_world, tmp_path):
    """jobs=2 (spawned workers, 1 thread each) runs the same fine-tunes as jobs=1: same rows,
    same order, same scores, and one shared run for identical token sets."""
    p = R.Protocol(hidden=16, layers=1, heads=2, intermediate=32, steps=6, eval_steps=(3, 6), batch_size=4,
                   warmup=1, eval_batch=64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = R.accuracy_table(str(tiny_world), tmp_path / "one", p, budgets=(16,), methods=("setok", "tome"))
        two = R.accuracy_table(str(tiny_world), tmp_path / "two", p, budgets=(16,), methods=("setok", "tome"),
                               jobs=2)
    finally:
        torch.set_num_threads(threads)
    assert two["jobs"] == 2 and len(one["runs"]) == len(two["runs"]) == 4
    for a, b in zip(one["runs"], two["runs"]):
        assert (a["method"], a["budget"], a["run"]) == (b["method"], b["budget"], b["run"])
        assert a["accuracy"] == b["accuracy"] and a["val_accuracy"] == b["val_accuracy"]
        assert a["steps_chosen"] == b["steps_chosen"] and a["per_type"] == b["per_type"]
        assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-5)


def test_cli_one_line_errors(tmp_path):
    r = CliRunner().invoke(cli, ["bench-reduce", "--data", str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert r.exit_code == 2 and r.output.strip().startswith("error:") and "no such folder" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(cli, ["bench-reduce", "--methods", "setok,fastv", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "unknown reducer 'fastv'" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(cli, ["bench-reduce", "--skip-cost", "--skip-accuracy", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "leave nothing to run" in r.output
    r = CliRunner().invoke(cli, ["bench-reduce", "--model", str(tmp_path / "no-llava"), "--skip-accuracy",
                                 "--out", str(tmp_path)])
    assert r.exit_code == 2 and "no such model folder" in r.output


def test_cli_accuracy_only_json(tiny_world, tmp_path, monkeypatch):
    small = R.Protocol(hidden=16, layers=1, heads=2, intermediate=32, steps=2, eval_steps=(2,), batch_size=4,
                       warmup=1)
    monkeypatch.setattr(R, "quick_protocol", lambda: small)
    r = CliRunner().invoke(cli, ["bench-reduce", "--quick", "--json", "--skip-cost", "--methods", "pool2d",
                                 "--data", str(tiny_world), "--out", str(tmp_path / "res"),
                                 "--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    assert [x["method"] for x in res["accuracy"]["runs"]] == ["full", "pool2d", "pool2d"]
    assert (tmp_path / "res" / "bench_reduce.json").is_file() and (tmp_path / "p.png").is_file()


def test_real_model_cost_on_a_local_llava_folder(tmp_path, chelsea_path):
    from test_llava_reduce import _save_tiny_llava

    folder = _save_tiny_llava(tmp_path / "llava")
    out = R.real_model_cost(str(folder), [4, 16], repeats=1, photos=[chelsea_path], dtype=torch.float32)
    assert [r["visual_tokens"] for r in out["prefill"]] == [4, 16]
    ph = out["photos"][0]
    assert ph["image"] == "chelsea.png" and 1 <= ph["setok_tokens"] <= 16 and ph["ttft_full_ms"] > 0
