"""Setokim's stage-III parts: LoRA (peft), regions through the mask decoder, chat conversations."""
import json

import numpy as np
import pytest
import torch

from setok_cli.data.conversations import chat_conversation, group_by_image
from setok_cli.errors import UserError
from setok_cli.models.setokim import (IGNORE_INDEX, Setokim, SetokimConfig, build_word_tokenizer, parameter_table,
                                      render_conversation)
from setok_cli.models.setokim.regions import best_region_tokens, mask_iou, read_images, region_probs, snap, to_original

TINY_LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2, max_position_embeddings=256)
TEXTS = ["A red circle.", "Describe the image briefly.", "How many objects are there?", "3", "yes",
         "What color is the circle?", "red", "Segment the red circle."]


pytestmark = pytest.mark.usefixtures("one_thread")     # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def folders(tmp_path_factory, write_tiny_stage1):
    root = tmp_path_factory.mktemp("setokim3")
    write_tiny_stage1(root / "stage1" / "checkpoints" / "step_00000010")
    build_word_tokenizer(extra_texts=TEXTS).save_pretrained(root / "tok")
    return root


def make(folders, **kw) -> Setokim:
    torch.manual_seed(0)
    cfg = SetokimConfig(lm=dict(TINY_LM), text_tokenizer=str(folders / "tok"), stage1=str(folders / "stage1"), **kw)
    return Setokim.from_config(cfg)


def sample_batch(m):
    g = torch.Generator().manual_seed(0)
    conv = [[{"from": "human", "value": "<image>\nHow many objects are there?"}, {"from": "gpt", "value": "3"}],
            [{"from": "human", "value": "<image>\nSegment the red circle."}, {"from": "gpt", "value": "<image>"}]]
    return m.collate([{"conversations": conv[0], "images": [torch.randn(3, 8, generator=g)]},
                      {"conversations": conv[1], "images": [torch.randn(2, 8, generator=g),
                                                            torch.randn(1, 8, generator=g)]}])


def _randomize_lora_b(m):
    g = torch.Generator().manual_seed(5)
    for n, p in m.lm.named_parameters():
        if "lora_B" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.5)


# ---- LoRA -----------------------------------------------------------------------------

def test_fresh_lora_changes_nothing_then_merge_equals_adapter(folders):
    m = make(folders).eval()
    b = sample_batch(m)
    base = m(**b).loss.item()
    m.add_lora({"r": 4, "alpha": 8, "dropout": 0.0})
    assert m.has_lora and m.config.lora.r == 4
    assert m(**b).loss.item() == pytest.approx(base, abs=1e-6)          # B = 0 at init
    _randomize_lora_b(m)
    adapted = m(**b)
    assert abs(adapted.loss.item() - base) > 1e-3                        # the adapters act
    ids = torch.tensor([[1, 5, 6, 7]])
    logits = m.lm(input_ids=ids).logits
    m.merge_lora()
    assert not m.has_lora and m.config.lora is None
    assert torch.allclose(m.lm(input_ids=ids).logits, logits, atol=1e-5)
    assert m(**b).loss.item() == pytest.approx(adapted.loss.item(), abs=1e-5)


def test_lora_save_load_and_sizes(folders, tmp_path):
    m = make(folders).add_lora({"r": 4, "alpha": 8, "dropout": 0.0})
    _randomize_lora_b(m)
    m.eval()
    b = sample_batch(m)
    ref = m(**b).loss.item()
    m.save_pretrained(tmp_path / "ck")
    names = {p.name for p in (tmp_path / "ck").iterdir()}
    assert {"adapter", "lm", "model.safetensors", "config.json", "mask_decoder"} <= names
    assert (tmp_path / "ck" / "adapter" / "adapter_model.safetensors").is_file()
    # lm/ is a plain base LM: it loads without peft and has no adapter weights
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ck" / "lm")
    assert not any("lora" in n or "base_layer" in n for n in plain.state_dict())
    m2 = Setokim.from_pretrained(tmp_path / "ck").eval()
    assert m2.has_lora and m2(**b).loss.item() == pytest.approx(ref, abs=1e-6)
    # 2 layers x 7 linears: r * (in + out) each
    H, I, r = 32, 64, 4
    per_layer = 4 * r * (H + H) + 2 * r * (H + I) + r * (I + H)
    assert m.adapter_size()["parameters"] == 2 * per_layer
    rows = {name: (tot, tr) for name, tot, tr in parameter_table(m)}
    assert rows["lm (LoRA adapters)"][0] == 2 * per_layer
    # the adapters of a folder without adapter/ are a one-line error
    import shutil
    shutil.rmtree(tmp_path / "ck" / "adapter")
    with pytest.raises(UserError, match="adapter"):
        Setokim.from_pretrained(tmp_path / "ck")


def test_modules_to_save_train_in_full_save_load_and_merge(folders, tmp_path):
    """lora.modules_to_save: embed_tokens / lm_head trained as full copies beside the adapters;
    lm/ keeps the original rows, adapter/ the copies, and the merged LM uses the copies."""
    m = make(folders).eval()
    b = sample_batch(m)
    emb0 = m.lm.get_input_embeddings().weight.detach().clone()
    m.add_lora({"r": 4, "alpha": 8, "dropout": 0.0, "modules_to_save": ["embed_tokens", "lm_head"]})
    trained = [n for n, p in m.lm.named_parameters() if ".modules_to_save." in n]
    assert len(trained) == 2 and all(p.requires_grad for n, p in m.lm.named_parameters() if n in trained)
    with torch.no_grad():                                    # "train" the copies: the word rows move
        for n, p in m.lm.named_parameters():
            if ".modules_to_save." in n:
                p.add_(torch.randn_like(p) * 0.5)
    _randomize_lora_b(m)
    ref = m(**b).loss.item()
    V, H, I, r = emb0.shape[0], 32, 64, 4
    per_layer = 4 * r * (H + H) + 2 * r * (H + I) + r * (I + H)
    assert m.adapter_size()["parameters"] == 2 * per_layer + 2 * V * H
    m.save_pretrained(tmp_path / "ck")
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ck" / "lm")
    assert not any("original_module" in n or "modules_to_save" in n for n in plain.state_dict())
    assert torch.equal(plain.get_input_embeddings().weight, emb0)     # the base keeps the stage-2 rows
    m2 = Setokim.from_pretrained(tmp_path / "ck").eval()
    assert m2(**b).loss.item() == pytest.approx(ref, abs=1e-6)       # the copies came back
    m2.merge_lora()
    assert m2(**b).loss.item() == pytest.approx(ref, abs=1e-5)
    assert not torch.equal(m2.lm.get_input_embeddings().weight, emb0)
    with pytest.raises(UserError, match="modules_to_save"):
        make(folders).add_lora({"r": 2, "modules_to_save": ["word_table"]})


def test_lora_bad_arguments(folders):
    m = make(folders)
    with pytest.raises(UserError, match="not linear layers"):
        m.add_lora({"r": 4, "target_modules": ["qkv"]})
    with pytest.raises(UserError, match="lora.r"):
        m.add_lora({"r": 0})
    m.add_lora({"r": 2})
    with pytest.raises(UserError, match="already has LoRA"):
        m.add_lora({"r": 2})
    with pytest.raises(UserError, match="no LoRA"):
        make(folders).merge_lora()


# ---- regions ----------------------------------------------------------------------------

def test_regions_shapes_and_known_best_token(folders):
    m = make(folders).eval()
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (40, 56, 3), dtype=np.uint8), rng.integers(0, 255, (70, 30, 3), dtype=np.uint8)]
    seen = read_images(m, imgs)
    S = m.setok.image_size
    out = seen.out
    probs = region_probs(m, seen, out.tokens)
    assert probs.shape == (2, out.tokens.shape[1], S, S) and 0 <= float(probs.min()) <= float(probs.max()) <= 1
    for i, im in enumerate(imgs):
        assert to_original(probs[i], seen, i).shape[-2:] == im.shape[:2]
    # a target mask equal to token j's own decoded mask: that token comes back, IoU 1
    targets, want = [], []
    for i in range(2):
        j = int(out.num_tokens[i]) - 1
        targets.append((to_original(probs[i, j:j + 1], seen, i)[0] > 0.5).numpy())
        want.append(out.tokens[i, j])
    toks, iou = best_region_tokens(m, seen, targets)
    masks = [to_original(probs[i], seen, i) > 0.5 for i in range(2)]
    for i in range(2):
        best = mask_iou(masks[i], torch.as_tensor(targets[i]))[: int(out.num_tokens[i])].max()
        assert iou[i].item() == pytest.approx(best.item()) and iou[i].item() == pytest.approx(1.0)
        assert any(torch.equal(toks[i], out.tokens[i, k]) for k in range(int(out.num_tokens[i]))
                   if bool((masks[i][k] == torch.as_tensor(targets[i])).all()))
    # several masks of one image (each image decoded once): the same answers, in the masks' order
    toks2, iou2 = best_region_tokens(m, seen, [targets[1], targets[0], targets[1]], rows=[1, 0, 1])
    assert torch.equal(toks2, toks[[1, 0, 1]]) and torch.equal(iou2, iou[[1, 0, 1]])
    with pytest.raises(UserError, match="pixels"):
        best_region_tokens(m, seen, [np.zeros((3, 3), bool), np.zeros((3, 3), bool)])
    with pytest.raises(UserError, match="2 masks but 1 image rows"):
        best_region_tokens(m, seen, targets, rows=[0])


def test_mask_iou_and_snap(folders):
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    a[0, :2] = True
    t = torch.zeros(4, 4, dtype=torch.bool)
    t[:1] = True
    assert mask_iou(a, t).tolist() == [0.5, 0.0]
    assert mask_iou(torch.zeros(1, 2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool)).tolist() == [1.0]
    m = make(folders)
    cands = [torch.tensor([[0.0] * 8, [1.0] * 8]), torch.zeros(0, 8)]
    got = snap(m, torch.tensor([[0.9] * 8, [5.0] * 8]), cands)
    assert torch.equal(got[0], cands[0][1]) and torch.equal(got[1], torch.tensor([5.0] * 8))


# ---- chat conversations -------------------------------------------------------------------

def test_chat_groups_and_multiturn_labels(folders):
    entries = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nHow many objects are there?"},
                                                    {"from": "gpt", "value": "3"}]},
               {"image": "b.png", "conversations": [{"from": "human", "value": "<image>\nWhat color is the circle?"},
                                                    {"from": "gpt", "value": "red"}]},
               {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat color is the circle?"},
                                                    {"from": "gpt", "value": "yes"}]}]
    groups = group_by_image(entries)
    assert [len(g) for g in groups] == [2, 1]
    conv, images = chat_conversation(groups[0])
    assert images == ["a.png"] and len(conv) == 4
    assert conv[0]["value"].startswith("<image>") and "<image>" not in conv[2]["value"]
    tok = make(folders).text_tokenizer
    ids, labels = render_conversation(conv, tok)
    counted = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    # only the two answers and their </s> count
    assert tok.decode(counted, skip_special_tokens=True).split() == ["3", "yes"]
    assert counted.count(tok.eos_token_id) == 2


def test_chat_turns_cut_an_images_entries(tmp_path):
    from setok_cli.data.conversations import ConversationDataset
    entries = [{"image": img, "id": f"{img}{k}"} for k, img in enumerate("aababaa")]
    groups = group_by_image(entries, turns=2)
    assert [[e["id"] for e in g] for g in groups] == [["a0", "a1"], ["a3", "a5"], ["a6"], ["b2", "b4"]]
    assert group_by_image(entries) == group_by_image(entries, turns=100)
    f = tmp_path / "instruct.json"
    (tmp_path / "x.png").write_bytes(b"")                              # only its name is read here
    f.write_text(json.dumps([{"id": str(k), "image": "x.png", "type": "count", "conversations": [
        {"from": "human", "value": "<image>\nHow many objects are there?"}, {"from": "gpt", "value": str(k)}]}
        for k in range(5)]))
    ds = ConversationDataset(f, "chat", 32, turns=2)
    assert [len(conv) for conv, _ in ds.items] == [4, 4, 2]
    assert all(conv[0]["value"].startswith("<image>") for conv, _ in ds.items)     # each chat sees its image
    for task, turns in (("instruct", 2), ("chat", 0), ("chat", "3")):
        with pytest.raises(UserError, match="turns"):
            ConversationDataset(f, task, 32, turns=turns)
