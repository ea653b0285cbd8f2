"""Stage II: the mixture data, the token cache, the tiny recipe end to end, exact resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from setok_cli.errors import UserError
from setok_cli.train.recipe import load_recipe
from setok_cli.train.trainer import Trainer

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _recipe(stage2_world, out, *extra):
    tr = stage2_world / "shapes" / "train"
    return load_recipe(RECIPES / "tiny" / "stage2.yaml", [
        f"model.setokim.stage1={stage2_world / 'stage1'}", f"output_dir={out}",
        "model.setokim.lm={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
        "num_key_value_heads: 2, max_position_embeddings: 256}",
        f"data.mixture=[{{task: caption, path: {tr / 'pairs.json'}, weight: 1.0}}, "
        f"{{task: generate, path: {tr / 'pairs.json'}, weight: 0.5}}, "
        f"{{task: edit, path: {tr / 'edits.json'}, weight: 1.0}}]",
        "data.image_size=32", "data.batch_size=6", "train.log_every=1", "train.progress=false", "data.vocab_files=[]",
        "train.threads=1", "optim.warmup_steps=2", "optim.lr=3e-3",
        "train.mixed_precision=no", *extra])                 # bit-exact resume: no timed choice


def test_mixture_weights_and_items(stage2_world):
    from setok_cli.data.conversations import ConversationDataset, MixtureDataset
    tr = stage2_world / "shapes" / "train"
    cap = ConversationDataset(tr / "pairs.json", "caption", 32)
    edit = ConversationDataset(tr / "edits.json", "edit", 32)
    mix = MixtureDataset([(cap, 1.5), (edit, 0.5)], seed=0)
    n_cap, n_edit = len(cap), len(edit)
    assert mix.counts() == [round(1.5 * n_cap), round(0.5 * n_edit)]
    # weight 1.5: every item once, half of them twice; the same subset for the same seed
    assert torch.bincount(mix.local[mix.owner == 0], minlength=n_cap).tolist().count(2) == round(0.5 * n_cap)
    assert torch.equal(MixtureDataset([(cap, 1.5), (edit, 0.5)], seed=0).local, mix.local)
    it = edit[0]
    assert [t["from"] for t in it["conversations"]] == ["human", "gpt"]
    assert it["conversations"][1]["value"] == "<image>" and len(it["pixel_values"]) == 2   # source, target
    assert it["conversations"][0]["value"].endswith(edit.entries[0]["instruction"])
    b = mix.collate([cap[0], edit[0]])
    assert b["pixel_values"].shape == (3, 3, 32, 32) and b["image_counts"].tolist() == [1, 2]
    assert b["source"].tolist() == [-1, -1] and mix.names == ["set0", "set1"]     # items outside the mixture
    i = int((mix.owner == 1).nonzero()[0])                                        # a mixture item: its set
    assert mix[i]["source"] == 1 and mix.collate([mix[0], mix[i]])["source"].tolist() == [0, 1]
    with pytest.raises(UserError, match="weight must be a number >= 0"):
        MixtureDataset([(cap, -1)])


def test_recipe_mixture_passes_chat_turns(stage2_world, tmp_path):
    from setok_cli.train.stage2 import _mixture
    tr = stage2_world / "shapes" / "train"
    chat = f"{{task: chat, path: {tr / 'instruct.json'}, weight: 1.0"
    whole = _mixture(_recipe(stage2_world, tmp_path, f"data.mixture=[{chat}}}]"))
    cut = _mixture(_recipe(stage2_world, tmp_path, f"data.mixture=[{chat}, turns: 1}}]"))
    n_q = len(json.loads((tr / "instruct.json").read_text()))
    assert len(cut) == n_q > len(whole)                  # one question per conversation
    two = _mixture(_recipe(stage2_world, tmp_path, f"data.mixture=[{chat}}}, {chat}, turns: 1}}, "
                                                   f"{{task: caption, path: {tr / 'pairs.json'}}}]"))
    assert two.names == ["chat:instruct#0", "chat:instruct#1", "caption:pairs"]   # the trainer's text/<name> terms
    assert all(len(cut[i]["conversations"]) == 2 for i in range(len(cut)))
    named = _mixture(_recipe(stage2_world, tmp_path, f"data.mixture=[{{task: edit_diff, path: {tr / 'edits.json'}, "
                                                     "names: true}]"))
    answers = [named[i]["conversations"][1]["value"].split() for i in range(len(named))]
    olds = [a for a in answers if a[0] in ("Remove", "Make", "Move")]
    assert olds and all(a[1] != "<image>" for a in olds)          # the object's name before its token
    looked = _mixture(_recipe(stage2_world, tmp_path, f"data.mixture=[{chat}, turns: 1, look: [color]}}]"))
    for i in range(len(looked)):                                  # colour answers write a token first
        q, a = (t["value"] for t in looked[i]["conversations"])
        assert a.startswith("<image>") == q.split("\n")[-1].startswith("What color") and looked[i]["look"] is not None
    weighed = _mixture(_recipe(stage2_world, tmp_path, f"data.mixture=[{chat}}}, {chat}, text_weight: 4}}]"))
    assert weighed.text_weights == [1.0, 4.0] and two.text_weights == [1.0, 1.0, 1.0]
    with pytest.raises(UserError, match=r"text_weight must be a number >= 0"):
        _mixture(_recipe(stage2_world, tmp_path, f"data.mixture=[{chat}, text_weight: -1}}]"))
    with pytest.raises(UserError, match=r"weight\[, turns\|names\|look\|look_places\|look_numbers\|look_scan\|sized\|"
                                         r"text_weight\]"):
        _mixture(_recipe(stage2_world, tmp_path, f"data.mixture=[{chat}, turn: 2}}]"))
    with pytest.raises(UserError, match="look is for the instruct and chat tasks"):
        _mixture(_recipe(stage2_world, tmp_path, f"data.mixture=[{chat}, look: [size]}}]"))
    sized = _mixture(_recipe(stage2_world, tmp_path, f"data.mixture=[{{task: generate, path: {tr / 'pairs.json'}, "
                                                     "sized: true}]"))
    assert all(sized[i]["conversations"][1]["value"].endswith("objects <image>") or
               sized[i]["conversations"][1]["value"] == "one object <image>" for i in range(len(sized)))


def test_token_cache_equals_fresh_tokens(stage2_world, tmp_path):
    from setok_cli.train.stage2 import build_stage2
    r = _recipe(stage2_world, tmp_path / "run")
    model, data = build_stage2(r)
    b = data.collate([data[i] for i in range(4)])
    tok_cached, mask_cached = model.image_tokens(b["pixel_values"], b["image_keys"])
    model.cache_tokens = False
    tok_fresh, mask_fresh = model.image_tokens(b["pixel_values"], b["image_keys"])
    assert torch.equal(mask_cached, mask_fresh)
    assert torch.allclose(tok_cached[mask_cached], tok_fresh[mask_fresh], atol=1e-6)
    # standardised tokens: the fitted statistics make the first images' tokens zero-mean
    sm = model.setokim
    assert not torch.equal(sm.token_std, torch.ones_like(sm.token_std))


def test_codebook_head_is_fitted_to_the_training_tokens(stage2_world, tmp_path):
    """visual_head: codebook fits its k-means codes to the standardised tokens of the data's
    first images before training: they quantise those tokens far better than the random codes
    it starts from, and every code sits among them (no centre left at its random start)."""
    from setok_cli.train.stage2 import build_stage2
    r = _recipe(stage2_world, tmp_path / "run", "model.setokim.visual_head=codebook",
                "model.setokim.codebook={codes: 8, fit_images: 40}")
    model, data = build_stage2(r)
    sm, head = model.setokim, model.setokim.visual_head
    tokens, mask = model.first_image_tokens(data, 40)
    x = sm.normalize(tokens[mask].float())
    assert tokens.shape[0] == 40 and x.shape[0] > 8
    err = (x - head.codes[head.assign(x)]).pow(2).sum(1).mean()
    rand = torch.randn(8, x.shape[1], generator=torch.Generator().manual_seed(0))
    err_rand = (x - rand[torch.cdist(x, rand).argmin(1)]).pow(2).sum(1).mean()
    assert err < 0.5 * err_rand
    assert torch.cdist(head.codes, x).min(1).values.max() < torch.cdist(rand, x).min(1).values.min()
    writes = [data[i] for i in range(len(data)) if data[i]["conversations"][-1]["value"] == "<image>"][:4]
    out = model(data.collate(writes))
    assert len(writes) == 4 and torch.isfinite(out["loss"]) and out["visual"].item() > 0   # CE over the codes


def test_tiny_stage2_lowers_losses_and_resumes_exactly(stage2_world, tmp_path):
    out = tmp_path / "run"
    res = Trainer(_recipe(stage2_world, out, "train.max_steps=24", "train.checkpoint_every=12")).train()
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 24
    for term in ("text", "visual", "stop"):
        first = sum(x[term] for x in log[:4]) / 4
        last = sum(x[term] for x in log[-4:]) / 4
        assert last < first, (term, first, last)
    ck = res.last_checkpoint
    assert (ck / "setokim" / "config.json").is_file() and (ck / "setokim" / "lm").is_dir()
    from setok_cli.models.setokim import Setokim
    m = Setokim.from_pretrained(out)                      # the run folder: its latest checkpoint
    assert m.config.visual_head == "mse" and m.setok is not None and m.detokenizer is not None

    # resume: 12 steps + 12 resumed == the 24 above, bit for bit on the CPU
    out2 = tmp_path / "run2"
    Trainer(_recipe(stage2_world, out2, "train.max_steps=24", "train.checkpoint_every=12")).train(stop_after=12)
    Trainer(_recipe(stage2_world, out2, "train.max_steps=24", "train.checkpoint_every=12")).train(resume=True)
    log2 = {x["step"]: x["loss"] for x in map(json.loads, (out2 / "log.jsonl").read_text().splitlines())}
    assert [log2[s] for s in range(13, 25)] == [x["loss"] for x in log][12:]


def test_dry_run_of_the_tiny_recipe_lists_the_parts(stage2_world):
    from setok_cli.train.trainer import meta_model
    r = _recipe(stage2_world, stage2_world / "unused")
    model, report = meta_model(r)
    rep = report(model)
    assert {"lm", "projector", "all"} <= set(rep)
    assert rep["all"]["total"] == sum(v["total"] for k, v in rep.items() if k != "all")


def test_paper_recipe_on_meta_has_vicunas_parameter_count():
    """recipes/stage2.yaml sized without any file: Vicuna-7B (6,738,415,616) plus the rows of
    [Img] and [/Img] in its embedding and LM head, a 4096 -> 4096 -> 4096 projector, the
    frozen SeTok of the stage-1 recipe (SigLIP so400m 428,225,600 + merger 71,142,400)."""
    from setok_cli.train.trainer import meta_model, select_trainable
    r = load_recipe(RECIPES / "stage2.yaml", ["model.setokim.stage1=/nonexistent/stage1"])
    model, report = meta_model(r)
    select_trainable(model, r.train.trainable, r.train.frozen)
    rep = report(model)
    assert rep["lm"]["total"] == 6_738_415_616 + 2 * 2 * 4096
    assert rep["projector"]["total"] == 2 * (4096 * 4096 + 4096)
    assert rep["setok"] == {"total": 428_225_600 + 71_142_400, "trainable": 0}
    assert rep["all"]["trainable"] == rep["all"]["total"] - rep["setok"]["total"]


def test_ddp_two_processes_train_stage2(stage2_world, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo, CPU) runs the stage-2 recipe (with its batches that
    may hold no image to write) and writes one checkpoint that loads. Replica equality under
    DDP is test_trainer's (the trainer is the same for every stage)."""
    import os
    import subprocess
    import sys
    tr = stage2_world / "shapes" / "train"
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "setok_cli.cli.main",
           "train", str(RECIPES / "tiny" / "stage2.yaml"), "--output-dir", str(out),
           "--set", f"model.setokim.stage1={stage2_world / 'stage1'}",
           "--set", "model.setokim.lm={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
                    "num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 256}",
           "--set", f"data.mixture=[{{task: caption, path: {tr / 'pairs.json'}}}, "
                    f"{{task: edit, path: {tr / 'edits.json'}}}]",
           "--set", "data.image_size=32", "--set", "data.batch_size=4", "--set", "train.max_steps=4",
           "--set", "data.vocab_files=[]",
           "--set", "train.checkpoint_every=4", "--set", "train.progress=false", "--set", "train.threads=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "train on 2 process(es)" in proc.stdout
    from setok_cli.models.setokim import Setokim
    m = Setokim.from_pretrained(out)
    assert (out / "checkpoints" / "step_00000004" / "setokim").is_dir() and m.config.visual_head == "mse"


def test_changed_token_weights_known_values():
    """`loss.edit_changed`: only a written token that no token read before matches is weighted."""
    from setok_cli.train.stage2 import changed_token_weights, pack_weights
    e = torch.eye(8)
    near_b = 0.99 * e[1] + 0.1 * e[3]                       # cos 0.995 with b: the same object redrawn
    edit = {"conversations": [{"from": "human", "value": "<image>\nMake the red circle blue."},
                              {"from": "gpt", "value": "<image>"}],
            "images": [torch.stack([e[0], e[1]]), torch.stack([e[0], e[2], near_b])]}
    gen = {"conversations": [{"from": "human", "value": "Generate an image: a red circle."},
                             {"from": "gpt", "value": "<image>"}], "images": [e[2:4]]}
    cap = {"conversations": [{"from": "human", "value": "<image>\nDescribe the image briefly."},
                             {"from": "gpt", "value": "A red circle."}], "images": [e[5:6]]}
    w = changed_token_weights([edit, gen, cap], 5.0)
    assert [x.tolist() for x in w] == [[1, 1], [1, 5, 1], [1, 1], [1]]
    # the standardisation is applied first: a shift that makes e[2] look like e[0]
    w = changed_token_weights([edit], 5.0, standardize=lambda t: t + 10 * e[0])
    assert w[1].tolist() == [1, 1, 1]
    assert pack_weights(changed_token_weights([edit, cap], 3.0)).tolist() == [[1, 1, 0], [1, 3, 1], [1, 0, 0]]


def test_edit_changed_trains_and_needs_the_mse_head(stage2_world, tmp_path):
    from setok_cli.train.stage2 import build_stage2_model
    r = _recipe(stage2_world, tmp_path / "w", "loss.edit_changed=4.0", "train.max_steps=2",
                "train.checkpoint_every=2")
    res = Trainer(r).train()
    log = [json.loads(x) for x in (tmp_path / "w" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(x["visual"] > 0 for x in log) and res.last_checkpoint.is_dir()
    with pytest.raises(UserError, match="needs visual_head mse"):
        build_stage2_model(_recipe(stage2_world, tmp_path / "d", "loss.edit_changed=4.0",
                                   "model.setokim.visual_head=diffusion"))
    with pytest.raises(UserError, match="edit_changed must be a number > 0"):
        build_stage2_model(_recipe(stage2_world, tmp_path / "z", "loss.edit_changed=0"))
    with pytest.raises(UserError, match=r"loss.visual weighs .* in stage II set model.setokim.visual_loss_weight"):
        build_stage2_model(_recipe(stage2_world, tmp_path / "v", "loss.visual=0.5"))


def test_place_head_trains_on_cached_seeds(stage2_world, tmp_path):
    from setok_cli.train.stage2 import build_stage2_model
    r = _recipe(stage2_world, tmp_path / "p", "model.setokim.place_head=256", "train.max_steps=2",
                "train.checkpoint_every=2")
    res = Trainer(r).train()
    log = [json.loads(x) for x in (tmp_path / "p" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(x["place"] > 0 and x["visual"] > 0 for x in log)
    from setok_cli.tasks.setokim import load_setokim
    assert load_setokim(tmp_path / "p").place_head.cells == 256          # the checkpoint keeps the head
    with pytest.raises(UserError, match="place_head needs token_order: raster"):
        build_stage2_model(_recipe(stage2_world, tmp_path / "g", "model.setokim.place_head=256",
                                   "model.setokim.token_order=given"))
    assert res.last_checkpoint.is_dir()
