"""integrations/reducers.py and integrations/llava.py: the reducers, the splice, the patch of a
LlavaForConditionalGeneration."""
import json

import pytest
import torch

from setok_cli.errors import UserError
from setok_cli.integrations.llava import BuiltinTower, reduce_visual_tokens, restore_visual_tokens, splice_image_tokens
from setok_cli.integrations.reducers import (METHODS, cluster_mean_tokens, feature_importance, reduce_features,
                                             setok_clusters, split_to_budget)

torch.set_num_threads(1)


def _blobs(B=3, h=6, w=6, D=8, seed=0):
    """Features with a few flat regions per image (image b: offset b * 100, so every token
    of image b stays near b * 100 whatever a reducer averages)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(B, h, w, D)
    for b in range(B):
        cols = torch.randn(4, D, generator=g)
        x[b, : h // 2, : w // 2] = cols[0]
        x[b, : h // 2, w // 2:] = cols[1]
        x[b, h // 2:, :] = cols[2]
        x[b, h // 2:, : 2] = cols[3]
        x[b] += 100.0 * b
    return x.reshape(B, h * w, D) + 0.01 * torch.randn(B, h * w, D, generator=g)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "setok"])
@pytest.mark.parametrize("budget", [1, 4, 9, 16, 36])
def test_exact_budget_and_batch_order(method, budget):
    x = _blobs()
    out = reduce_features(x, method, budget)
    assert len(out) == 3
    for b, t in enumerate(out):
        assert t.shape == (budget, 8)
        assert torch.all((t - 100.0 * b).abs() < 10), (method, budget, b)


def test_setok_documented_count_and_order():
    x = _blobs()
    natural = setok_clusters(x, (6, 6), 64).num_tokens
    out = reduce_features(x, "setok")
    assert [t.shape[0] for t in out] == natural.tolist()
    assert all(2 <= n <= 5 for n in natural.tolist())  # the flat regions, give or take a split
    for mode in ("split", "fixed"):     # at a budget: natural clusters cut to it, or the budget's best seeds
        for budget in (2, 5, 16, 36):
            assert [t.shape[0] for t in reduce_features(x, "setok", budget, setok_budget=mode)] == [budget] * 3
            for b, t in enumerate(reduce_features(x, "setok", budget, setok_budget=mode)):
                assert torch.all((t - 100.0 * b).abs() < 10)
    for b, t in enumerate(out):
        assert torch.all((t - 100.0 * b).abs() < 10)


def test_split_to_budget_known_cuts_and_refinement():
    """The largest cluster is cut at its median along its longer axis, one cut per round; the
    result refines the natural clusters (every new cluster lies inside one of them)."""
    lab = torch.zeros(1, 16, dtype=torch.long)
    lab[0, :4] = 1                                                    # 4 x 4: row 0 is cluster 1, rows 1-3 cluster 0
    got, K = split_to_budget(lab, torch.tensor([2]), 4, (4, 4))
    assert K.tolist() == [4]
    assert got.view(4, 4).tolist() == [[1, 1, 1, 1],                  # 12 patches, wider than tall: cut at x = 2
                                       [0, 0, 2, 2],                  # then the left 6, taller than wide: at y
                                       [0, 3, 2, 2],
                                       [3, 3, 2, 2]]
    x = _blobs()
    c = setok_clusters(x, (6, 6), 64)
    for budget in (5, 16, 36):
        labels, K = split_to_budget(c.labels, c.num_tokens, budget, (6, 6))
        assert K.tolist() == [budget] * 3
        for b in range(3):
            assert sorted(labels[b].unique().tolist()) == list(range(budget))
            for k in range(budget):                                   # inside one natural cluster
                assert c.labels[b][labels[b] == k].unique().numel() == 1
        out = reduce_features(x, "setok", budget, setok_budget="split")
        assert [t.shape[0] for t in out] == [budget] * 3
        for b, t in enumerate(out):
            assert torch.all((t - 100.0 * b).abs() < 10)
    assert split_to_budget(torch.zeros(1, 1, dtype=torch.long), torch.tensor([1]), 4, (1, 1))[1].tolist() == [1]
    with pytest.raises(UserError):
        reduce_features(x, "setok", 8, setok_budget="median")


def test_prumerge_natural_count_is_the_outliers():
    x = torch.randn(2, 36, 4, generator=torch.Generator().manual_seed(1))
    imp = torch.full((2, 36), 1.0)
    imp[0, [3, 17, 30]] = 50.0  # three outliers; image 1 has none: at least one token
    out = reduce_features(x, "prumerge", importance=imp)
    assert [t.shape[0] for t in out] == [3, 1]


def test_flat_image_reduces_to_its_value():
    x = torch.full((2, 36, 4), 3.0)
    for m in METHODS:
        for t in reduce_features(x, m, None if m in ("setok", "prumerge") else 4):
            assert torch.allclose(t, torch.full_like(t, 3.0)), m
    assert [t.shape[0] for t in reduce_features(x, "setok")] == [1, 1]  # a blank image is one token


def test_identity_at_full_budget():
    x = _blobs()
    assert torch.equal(torch.stack(reduce_features(x, "random", 36)), x)
    assert torch.allclose(torch.stack(reduce_features(x, "pool2d", 36)), x)
    # tome / visionzip keep every token's value (their own order)
    for m in ("tome", "visionzip"):
        t = torch.stack(reduce_features(x, m, 36))
        assert torch.allclose(t.sort(1).values, x.sort(1).values, atol=1e-5)


def test_averages_of_a_known_clustering_are_the_cluster_means():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 3, generator=g)
    labels = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 0, 1, 2], [1, 0, 0, 0, 1, 1, 1, 1, -1, -1]])
    num = torch.tensor([3, 2])
    got = cluster_mean_tokens(x, labels, num)
    for b in range(2):
        assert got[b].shape == (int(num[b]), 3)
        for k in range(int(num[b])):
            assert torch.allclose(got[b][k], x[b][labels[b] == k].mean(0), atol=1e-6)
    # and the setok reducer's tokens are the means of its own clusters
    xb = _blobs()
    c = setok_clusters(xb, (6, 6), 64)
    toks = reduce_features(xb, "setok")
    for b in range(3):
        for k in range(int(c.num_tokens[b])):
            assert torch.allclose(toks[b][k], xb[b][c.labels[b] == k].mean(0), atol=1e-5)


@pytest.mark.parametrize("call, msg", [
    (lambda x: reduce_features(x, "nope", 4), "unknown reducer 'nope'"),
    (lambda x: reduce_features(x, "pool2d", 37), "budget 37 is larger than the 36 visual tokens"),
    (lambda x: reduce_features(x, "tome", 0), "budget must be a positive whole number"),
    (lambda x: reduce_features(x, "random", None), "needs a budget"),
    (lambda x: reduce_features(x, "pool2d", 7), "pool2d cannot make 7 cells on a 6 x 6 grid"),
    (lambda x: reduce_features(x[:, :35], "pool2d", 4), "not a square grid"),
])
def test_bad_arguments_are_one_line(call, msg):
    with pytest.raises(UserError) as e:
        call(_blobs())
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_importance_substitute_is_distance_from_mean():
    x = torch.zeros(1, 4, 2)
    x[0, 3] = torch.tensor([3.0, 4.0])
    imp = feature_importance(x)
    assert int(imp.argmax()) == 3 and torch.allclose(imp.sum(), torch.tensor(1.0))


# ----------------------------------------------------------------------------- splice

def test_splice_one_placeholder_or_a_run_to_each_count():
    I = 9
    ids = torch.tensor([[1, I, 2, 3, 0, 0], [1, 2, I, I, I, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, 2, 3, -100, -100], [-100, 2, -100, -100, -100, 3]])
    new, m, lab = splice_image_tokens(ids, [3, 1], I, mask, labels, pad_token_id=0)
    assert new.tolist() == [[1, I, I, I, 2, 3], [1, 2, I, 3, 0, 0]]
    assert m.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    assert lab.tolist() == [[-100, -100, -100, -100, 2, 3], [-100, 2, -100, 3, -100, -100]]
    # left padding stays on the left
    ids = torch.tensor([[0, 0, 1, I], [1, 2, I, 3]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    new, m, _ = splice_image_tokens(ids, [2, 2], I, mask)
    assert new.tolist() == [[0, 0, 1, I, I], [1, 2, I, I, 3]]
    assert m.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    with pytest.raises(UserError, match="the prompts hold 2 image"):
        splice_image_tokens(ids, [1], I, mask)


# ----------------------------------------------------------------------------- the patch

def _tiny_clip_llava(seed=0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=56, patch_size=14)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=64, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=63, vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(cfg).eval()


def _expanded_prompt(n_img=16, B=2):
    ids = torch.tensor([[1, 5, 6] + [63] * n_img + [7, 8]] * B)
    ids[1, 1] = 9
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("method", ["pool2d", "random"])
def test_patched_equals_unpatched_when_every_token_is_kept(method):
    model = _tiny_clip_llava()
    ids, mask = _expanded_prompt()
    px = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        reduce_visual_tokens(model, method, 16)
        got = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        gen = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=3, do_sample=False)
        restore_visual_tokens(model)
        gen_ref = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=3,
                                 do_sample=False)
    assert torch.allclose(ref, got, atol=1e-5)
    assert torch.equal(gen, gen_ref)


def test_patched_reduces_and_uses_the_cls_attention():
    model = _tiny_clip_llava()
    ids, mask = _expanded_prompt()
    px = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    reduce_visual_tokens(model, "visionzip", 4)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=px)
        gen = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=2, do_sample=False)
    assert out.logits.shape[1] == ids.shape[1] - 16 + 4
    assert model.visual_token_reducer["counts"] == [4, 4]
    assert model.visual_token_reducer["importance"] == "CLS attention"
    assert torch.equal(gen[:, : ids.shape[1]], ids) and gen.shape[1] == ids.shape[1] + 2


def _builtin_llava():
    from setok_cli.bench.reduce.cost import tiny_llava

    return tiny_llava(vocab_size=32, image_token_id=31, pad_token_id=0, hidden=32, layers=1, heads=2,
                      intermediate=64, tower=BuiltinTower(image_size=112))


def test_variable_counts_in_one_batch_match_each_image_alone():
    model = _builtin_llava()
    flat = torch.full((3, 112, 112), 0.5)
    parts = flat.clone()
    parts[0, :, :56] = 1.0
    parts[1, 56:, :] = 0.0
    px = torch.stack([flat, parts])
    # one <image> each, left-padded prompts of different lengths
    ids = torch.tensor([[0, 0, 1, 31, 4, 5], [1, 2, 3, 31, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    reduce_visual_tokens(model, "setok")
    with torch.no_grad():
        both = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        counts = model.visual_token_reducer["counts"]
        alone = [model(input_ids=ids[b:b + 1, 2 * (b == 0):], pixel_values=px[b:b + 1]).logits for b in range(2)]
    assert counts[0] != counts[1]  # each image its own count
    assert torch.allclose(both[0, -1], alone[0][0, -1], atol=1e-4)
    assert torch.allclose(both[1, -1], alone[1][0, -1], atol=1e-4)


def test_patch_bad_arguments_are_one_line():
    model = _tiny_clip_llava()
    with pytest.raises(UserError, match="budget 17 is larger than the 16 visual tokens"):
        reduce_visual_tokens(model, "tome", 17)
    with pytest.raises(UserError, match="unknown reducer 'fastv'"):
        reduce_visual_tokens(model, "fastv", 4)
    with pytest.raises(UserError, match="needs a LlavaForConditionalGeneration"):
        reduce_visual_tokens(torch.nn.Linear(2, 2), "tome", 4)


# ----------------------------------------------------------------------------- ask_llava

def _save_tiny_llava(folder):
    from transformers import CLIPImageProcessor, LlavaProcessor

    from setok_cli.models.setokim.text import build_word_tokenizer

    tok = build_word_tokenizer(extra_texts=["what colour is it ? red blue"])
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    model = _tiny_clip_llava()
    model.resize_token_embeddings(len(tok))
    model.config.image_token_id = tok.convert_tokens_to_ids("<image>")
    model.save_pretrained(folder)
    ip = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          image_token="<image>", num_additional_image_tokens=1)
    proc.save_pretrained(folder)
    return folder


def test_ask_llava_answers_with_and_without_a_reducer(tmp_path, chelsea_path):
    from setok_cli.tasks.llava import ask_llava, load_llava

    folder = _save_tiny_llava(tmp_path / "llava")
    model, processor = load_llava(folder)
    a = ask_llava(folder, chelsea_path, "what colour is it ?", max_new_tokens=3, model=model, processor=processor)
    b = ask_llava(folder, chelsea_path, "what colour is it ?", reduce="pool2d", budget=4, max_new_tokens=3,
                  model=model, processor=processor)
    c = ask_llava(folder, chelsea_path, "what colour is it ?", reduce="setok", max_new_tokens=3)
    assert all(isinstance(s, str) for s in (a, b, c))
    assert "forward" not in model.__dict__  # the patch is undone after the answer


def test_ask_llava_errors_are_one_line(tmp_path, chelsea_path):
    from setok_cli.tasks.llava import ask_llava

    with pytest.raises(UserError, match="no such model folder"):
        ask_llava(tmp_path / "nope", chelsea_path, "hi")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="not a LLaVA-1.5 model"):
        ask_llava(tmp_path / "llama", chelsea_path, "hi")
    with pytest.raises(UserError, match="unknown reducer"):
        ask_llava(tmp_path / "llama", chelsea_path, "hi", reduce="zip")
    with pytest.raises(UserError, match="--budget needs --reduce"):
        ask_llava(tmp_path / "llama", chelsea_path, "hi", budget=4)
