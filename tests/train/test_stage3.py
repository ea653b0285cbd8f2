"""Stage III: LoRA instruction tuning through the trainer: what trains, what is saved, what it learns."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from setok_cli.errors import UserError
from setok_cli.models.setokim.place import PlaceHead
from setok_cli.train.recipe import load_recipe

NO_TEXT = "model.text_first=null"          # the tiny recipe's text-only phase (tests/train/test_text_first.py)
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _flat(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_only_adapters_projector_and_heads_change(stage3_runs):
    from setok_cli.models.setokim import Setokim
    before = Setokim.from_pretrained(stage3_runs["stage2"])
    after = Setokim.from_pretrained(stage3_runs["stage3"])
    assert after.has_lora and not before.has_lora
    from setok_cli.models.setokim.lora import _base_state_dict
    base_after = _base_state_dict(after.lm.get_base_model())
    base_before = _flat(before.lm)
    assert base_after.keys() == base_before.keys()
    assert all(torch.equal(base_after[k], base_before[k]) for k in base_before)        # the base LM is frozen
    lora_b = [v for k, v in after.lm.state_dict().items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().max()) > 0 for v in lora_b)                  # every adapter trained
    # lora.modules_to_save: the word tables train as copies beside the frozen originals
    sd = after.lm.get_base_model().state_dict()
    copies = {k: v for k, v in sd.items() if ".modules_to_save." in k}
    assert len(copies) == 2
    for k, v in copies.items():
        orig = sd[k.replace(".modules_to_save.default.", ".original_module.")]
        assert not torch.equal(v, orig), k
    for part in ("setok", "mask_decoder", "detokenizer"):                              # stage 1 frozen
        a, b = _flat(getattr(after, part)), _flat(getattr(before, part))
        assert all(torch.equal(a[k], b[k]) for k in a), part
    for part in ("projector", "visual_head", "stop_head"):                             # these train
        a, b = _flat(getattr(after, part)), _flat(getattr(before, part))
        assert any(not torch.equal(a[k], b[k]) for k in a), part
    assert torch.equal(after.token_mean, before.token_mean)                            # stage II's statistics


def test_region_targets_up_front_equal_batch_by_batch(stage3_runs, monkeypatch):
    from setok_cli.data.conversations import ConversationDataset, MixtureDataset
    from setok_cli.models.setokim import Setokim
    from setok_cli.models.setokim import regions
    from setok_cli.train.stage2 import Stage2Model
    tr = stage3_runs["world"] / "shapes" / "train"
    ds = MixtureDataset([(ConversationDataset(tr / "referring.json", "segment", 32), 1.0),
                         (ConversationDataset(tr / "instruct.json", "instruct", 32), 0.5)])
    setokim = Setokim.from_pretrained(stage3_runs["stage2"])
    lazy = Stage2Model(setokim)
    items = [ds[i] for i in range(len(ds)) if ds[i]["task"] == "segment"]
    want = {}
    for a in range(0, len(items), 5):
        batch = ds.collate(items[a:a + 5])
        for b, t in lazy.region_targets(batch).items():
            want[batch["segment"][b]["key"]] = t
    decoded = []
    real = regions.region_probs
    monkeypatch.setattr(regions, "region_probs", lambda m, seen, tokens, rows=None: decoded.append(tokens.shape[0])
                        or real(m, seen, tokens, rows))
    ahead = Stage2Model(setokim)
    assert ahead.fit_region_targets(ds, batch_images=4, progress=False) == len(want) > 0
    assert ahead._regions.keys() == want.keys()
    for k, t in want.items():
        assert torch.allclose(ahead._regions[k], t, atol=1e-5), k
    images = {ds.sets[0].segment_entry(i)[0] for i in range(len(ds.sets[0]))}
    assert sum(decoded) == len(images) < len(want)            # each image once, not once per expression
    assert ahead.fit_region_targets(ds, progress=False) == 0  # all cached
    # the images it read fill the token cache: training reads them without tokenizing again, and gets the same
    # tokens, seeds and object lookups as a fresh tokenization
    batch = ds.collate(items[:6])
    assert set(batch["image_keys"]) <= ahead._cache.keys() == ahead._outs.keys()
    tokenized = []
    real_tok = setokim.setok.tokenize
    monkeypatch.setattr(setokim.setok, "tokenize", lambda imgs, *a, **k: tokenized.append(len(imgs))
                        or real_tok(imgs, *a, **k))
    kept = ahead.image_token_sets(batch["pixel_values"], batch["image_keys"])
    assert tokenized == []
    fresh = Stage2Model(setokim)
    for a, b in zip(kept, fresh.image_token_sets(batch["pixel_values"], batch["image_keys"])):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    for k in batch["image_keys"]:
        assert torch.equal(ahead._seeds[k], fresh._seeds[k]) if fresh._seeds else True
        assert torch.equal(ahead._outs[k].labels, fresh._outs[k].labels)


def test_place_head_gets_the_segment_answers_seed(stage3_runs, monkeypatch):
    """With a place head, a segment answer (one of its input image's tokens) is trained at that
    token's own seed, so the place drawn at inference means what it meant in training."""
    from setok_cli.data.conversations import ConversationDataset, MixtureDataset
    from setok_cli.models.setokim import Setokim
    from setok_cli.train.stage2 import Stage2Model
    tr = stage3_runs["world"] / "shapes" / "train"
    ds = MixtureDataset([(ConversationDataset(tr / "referring.json", "segment", 32), 1.0)])
    setokim = Setokim.from_pretrained(stage3_runs["stage2"])
    setokim.config.place_head = 1024
    setokim.place_head = PlaceHead(int(setokim.lm.config.hidden_size), 1024)
    sm = Stage2Model(setokim)
    seen = []
    real = setokim.collate
    monkeypatch.setattr(setokim, "collate", lambda samples: seen.extend(samples) or real(samples))
    batch = ds.collate([ds[i] for i in range(4)])
    out = sm(batch)
    assert out["place"] > 0 and len(seen) == 4
    for s in seen:
        (image, answer), (seeds, answer_seed) = s["images"], s["seeds"]
        k = int((image - answer).abs().sum(-1).argmin())
        assert torch.allclose(image[k], answer[0]) and answer_seed.tolist() == [int(seeds[k])]


def test_stage3_lowers_its_losses_and_saves_the_adapter(stage3_runs):
    log = stage3_runs["log3"]
    assert len(log) == 300
    first = sum(x["text"] for x in log[:8]) / 8
    last = sum(x["text"] for x in log[-8:]) / 8
    assert last < 0.7 * first, (first, last)
    # the text loss of each mixture set beside the total, logged where the step's batch had its items
    sets = ["text/instruct:instruct", "text/chat:instruct", "text/segment:referring", "text/edit:edits"]
    seen = {k: [x[k] for x in log if k in x] for k in sets}
    assert all(len(v) >= 20 and all(map(math.isfinite, v)) for v in seen.values()), {k: len(v) for k, v in seen.items()}
    assert len(seen["text/edit:edits"]) < len(log)                      # weight 0.2 of batch 8: not in every step
    for k in sets[:2]:                                                  # the questions are learnt
        assert sum(seen[k][-8:]) < 0.7 * sum(seen[k][:8]), k
    ck = stage3_runs["stage3"] / "checkpoints" / "step_00000300" / "setokim"
    assert (ck / "adapter" / "adapter_model.safetensors").is_file() and (ck / "lm" / "config.json").is_file()
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["lora"]["r"] == 8


def test_stage3_raises_vqa_over_stage2(stage3_runs, tmp_path):
    """Held-out questions (the val split), greedy answers scored by `setok eval vqa`."""
    from setok_cli.eval.harness import eval_vqa
    from setok_cli.tasks.setokim import Sampling, load_setokim, run_file
    data = str(stage3_runs["world"] / "shapes" / "val" / "instruct.json")
    acc = {}
    for stage in ("stage2", "stage3"):
        torch.set_num_threads(1)
        pred = tmp_path / f"{stage}.json"
        run_file(load_setokim(stage3_runs[stage]), "vqa", data, str(pred), Sampling(max_new_tokens=3), batch_size=32)
        acc[stage] = eval_vqa(data, str(pred))["accuracy"]
    assert acc["stage3"] >= acc["stage2"] + 0.15, acc


def test_stage3_recipe_errors_and_dry_run(stage3_runs, tmp_path):
    from setok_cli.train.stage3 import build_stage3_model
    from setok_cli.train.trainer import meta_model, select_trainable
    r = load_recipe(RECIPES / "tiny" / "stage3.yaml", [f"model.setokim_from={tmp_path / 'nope'}"])
    with pytest.raises(UserError, match="not found|no "):
        build_stage3_model(r)
    r = load_recipe(RECIPES / "tiny" / "stage3.yaml", [f"model.setokim_from={stage3_runs['stage3']}"])
    with pytest.raises(UserError, match="already has LoRA adapters"):
        build_stage3_model(r)
    r = load_recipe(RECIPES / "tiny" / "stage3.yaml", [f"model.setokim_from={stage3_runs['stage2']}", NO_TEXT,
                                                        "train.length_groups=0"])
    with pytest.raises(UserError, match="train.length_groups must be an integer >= 1, got 0"):
        build_stage3_model(r)
    # loss.visual / place / stop replace stage II's weights of those terms (null keeps them)
    kept = build_stage3_model(load_recipe(RECIPES / "tiny" / "stage3.yaml",
                                          [f"model.setokim_from={stage3_runs['stage2']}", NO_TEXT])).setokim.config
    r = load_recipe(RECIPES / "tiny" / "stage3.yaml", [f"model.setokim_from={stage3_runs['stage2']}", NO_TEXT,
                                                        "loss.visual=0.3", "loss.place=0"])
    c = build_stage3_model(r).setokim.config
    assert (c.visual_loss_weight, c.place_loss_weight, c.stop_loss_weight) == (0.3, 0.0, kept.stop_loss_weight)
    assert (kept.visual_loss_weight, kept.place_loss_weight) != (0.3, 0.0)
    # model.system_prompt replaces stage II's conversation opening for this stage (null keeps it)
    assert kept.system_prompt.startswith("A chat between")
    r = load_recipe(RECIPES / "tiny" / "stage3.yaml", [f"model.setokim_from={stage3_runs['stage2']}", NO_TEXT,
                                                        "model.system_prompt=''"])
    assert build_stage3_model(r).setokim.config.system_prompt == ""
    r = load_recipe(RECIPES / "tiny" / "stage3.yaml", [f"model.setokim_from={stage3_runs['stage2']}", NO_TEXT,
                                                        "loss.stop=-1"])
    with pytest.raises(UserError, match="loss.stop must be a number >= 0"):
        build_stage3_model(r)
    # the tiny recipe sized on meta from the stage-2 run's config: the adapters are what trains in the LM
    r = load_recipe(RECIPES / "tiny" / "stage3.yaml", [f"model.setokim_from={stage3_runs['stage2']}", NO_TEXT,
                                                        "model.lora.r=8", "model.lora.alpha=16"])
    model, report = meta_model(r)
    select_trainable(model, r.train.trainable, r.train.frozen)
    rep = report(model)
    assert rep["lm (base)"]["trainable"] == 0 and rep["lm (LoRA adapters)"]["trainable"] > 0
    # 2 layers x 7 linears, hidden 32, intermediate 64, r 8; and the recipe's modules_to_save
    # (embed_tokens, lm_head: V x 32 each) train as copies
    V = model.setokim.lm.get_base_model().get_output_embeddings().original_module.weight.shape[0]
    assert rep["lm (LoRA adapters)"]["total"] == 2 * (4 * 8 * 64 + 2 * 8 * 96 + 8 * 96) + 2 * V * 32


def test_paper_recipe_on_meta_lists_llava_sized_adapters():
    """recipes/stage3.yaml sized without any file: LoRA r 128 on every linear of Vicuna-7B is
    32 layers x (4 x 128 x 8192 + 3 x 128 x 15104) = 319,815,680 parameters."""
    from setok_cli.train.trainer import meta_model, select_trainable
    r = load_recipe(RECIPES / "stage3.yaml", ["model.setokim_from=/nonexistent/stage2",
                                              "model.setokim.stage1=/nonexistent/stage1"])
    model, report = meta_model(r)
    select_trainable(model, r.train.trainable, r.train.frozen)
    rep = report(model)
    assert rep["lm (LoRA adapters)"] == {"total": 319_815_680, "trainable": 319_815_680}
    assert rep["lm (base)"]["trainable"] == 0 and rep["setok"]["trainable"] == 0
    assert rep["all"]["trainable"] == 319_815_680 + rep["projector"]["total"] + rep["visual_head (mse)"]["total"] \
        + rep["stop_head"]["total"]
