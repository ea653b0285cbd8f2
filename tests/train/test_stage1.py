"""Stage I end to end: the paper recipe sized on the meta device, the tiny recipe trained
a few steps on the shapes world, and its checkpoint read back by `setok tokenize`."""
import json
from pathlib import Path

import pytest
import torch

from setok_cli.train.recipe import load_recipe
from setok_cli.train.stage1 import meta_stage1_model, parameter_report
from setok_cli.train.trainer import Trainer, select_trainable

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _transformer_layer(d, ff, bias=True):
    """Parameters of a pre/post-norm transformer layer: q, k, v, o + 2 LayerNorms + MLP."""
    return 4 * (d * d + d) + 2 * 2 * d + (d * ff + ff) + (ff * d + d)


def test_paper_recipe_on_meta_device():
    r = load_recipe(RECIPES / "stage1.yaml")
    m = meta_stage1_model(r)
    assert {p.device.type for p in m.parameters()} == {"meta"}
    n_train, n_total = select_trainable(m, r.train.trainable, r.train.frozen)
    rep = parameter_report(m)
    for k, v in rep.items():
        print(f"{k:32s} {v['total']:>15,} {v['trainable']:>15,}")

    # SigLIP so400m/14-384 vision tower: patch embedding, 729 positions, 27 layers, the MAP head
    d, ff, L = 1152, 4304, 27
    embed = 3 * 14 * 14 * d + d + 729 * d
    head = d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * ff + ff) + (ff * d + d)
    assert rep["setok.encoder"]["total"] == embed + L * _transformer_layer(d, ff) + 2 * d + head == 428_225_600
    assert rep["setok.encoder"]["trainable"] == 0
    # SD-1.5: the well-known counts of its UNet and VAE
    assert rep["detokenizer.unet"]["total"] == 859_520_964
    assert rep["detokenizer.vae"]["total"] == 83_653_863 and rep["detokenizer.vae"]["trainable"] == 0
    # only the UNet's cross-attention keys and values train: 2 x 768 x C per transformer block,
    # 5 blocks at 320 and 640 channels, 6 at 1280 (mid block included)
    assert rep["detokenizer.unet"]["trainable"] == 2 * 768 * (5 * 320 + 5 * 640 + 6 * 1280) == 19_169_280
    # the mapper: BERT-base's 12 layers (the query FFN), cross-attention in layers 0, 3, 6, 9
    # (keys and values from 4096-wide tokens), 77 queries, a projection to 768
    h, tok = 768, 4096
    cross = (h * h + h) + 2 * (tok * h + h) + (h * h + h) + 2 * h
    mapper = 2 * h + 12 * _transformer_layer(h, 3072) + 4 * cross + 77 * h + (h * h + h)
    assert rep["detokenizer.mapper"]["total"] == mapper
    # BERT-base text encoder (bert-base-uncased with its pooler: 109,482,240), frozen
    assert rep["alignment"]["total"] - rep["alignment"]["trainable"] == 109_482_240
    assert n_total == rep["all"]["total"] and n_train == rep["all"]["trainable"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from setok_cli.data.shapes import generate
    root = tmp_path_factory.mktemp("shapes")
    generate(root, n=40, size=64, seed=0)
    return root


def test_tiny_recipe_lowers_loss_and_tokenize_reads_it(shapes, tmp_path):
    out = tmp_path / "run"
    r = load_recipe(RECIPES / "tiny" / "stage1.yaml", [
        f"data.train=[{shapes / 'train' / 'pairs.json'}]", f"output_dir={out}", "data.batch_size=8",
        "train.max_steps=16", "train.log_every=1", "train.checkpoint_every=8", "train.progress=false",
        "optim.warmup_steps=2", "optim.lr=2e-3",
        "loss.kl=0.1", "loss.kl_start=0",      # the recipe keeps the KL off; its path is tested here
        # a smaller UNet at 16 px keeps this test quick; the structure is the recipe's
        "model.detokenizer.image_size=16",
        "model.detokenizer.unet={sample_size: 16, block_out_channels: [16, 32], "
        "down_block_types: [DownBlock2D, CrossAttnDownBlock2D], up_block_types: [CrossAttnUpBlock2D, UpBlock2D]}"])
    torch.manual_seed(0)
    res = Trainer(r).train()
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 16
    for term in ("diffusion", "bce", "dice", "kl", "contrastive", "phrase"):
        assert term in log[0] and all(torch.isfinite(torch.tensor(x[term])) for x in log)
    first = sum(x["loss"] for x in log[:4]) / 4
    last = sum(x["loss"] for x in log[-4:]) / 4
    assert last < first, (first, last)
    ck = res.last_checkpoint
    for part in ("setok", "detokenizer", "mask_decoder", "alignment"):
        assert (ck / part / "model.safetensors").exists()
    assert (out / "recipe.yaml").exists()

    from click.testing import CliRunner

    from setok_cli.cli.main import cli
    img = shapes / "test" / "images" / "000000.png"
    if not img.exists():
        img = next((shapes / "test" / "images").glob("*.png"))
    res = CliRunner().invoke(cli, ["tokenize", str(img), "--model", str(ck / "setok"), "--show-masks",
                                   "--out", str(tmp_path / "viz")])
    assert res.exit_code == 0, res.output
    assert list((tmp_path / "viz").glob("*_tokens.png"))


def test_kl_schedule_start_ramp_and_step_count():
    from setok_cli.train.stage1 import Stage1Model
    from setok_cli.train.recipe import LossRecipe
    m = Stage1Model(torch.nn.Identity(), None, None, None, LossRecipe(kl=0.5, kl_start=10, kl_ramp=4), grad_accum=2)
    assert [m.kl_weight(s) for s in (0, 9, 10, 11, 13, 100)] == [0.0, 0.0, 0.125, 0.25, 0.5, 0.5]
    assert Stage1Model(torch.nn.Identity(), None, None, None, LossRecipe(kl=0.3)).kl_weight(0) == 0.3
    m.forward_count += 5                                      # 5 micro-batches at grad_accum 2: step 2
    assert m.optimizer_step == 2 and "forward_count" in m.state_dict()


@pytest.mark.parametrize("mode", ["all", "kl"])
def test_clustering_grad_kl_only(mode):
    from setok_cli.models.setok import SeTok, SeTokConfig
    from setok_cli.train.recipe import LossRecipe
    from setok_cli.train.stage1 import Stage1Model
    torch.manual_seed(0)
    setok = SeTok(SeTokConfig(encoder="builtin", image_size=56, k=4, max_tokens=6, cluster_head="linear",
                              merger_dim=16, merger_depth=1, merger_cross_depth=1, merger_heads=2, token_dim=16))
    Stage1Model(setok, None, None, None, LossRecipe(clustering_grad=mode))
    out = setok(torch.rand(2, 3, 56, 56))
    out.tokens.pow(2).sum().backward(retain_graph=True)      # a term built on the tokens
    g = [p.grad for p in setok.cluster_head.parameters()]
    reached = any(x is not None and x.abs().sum() > 0 for x in g)
    assert reached == (mode == "all")
    out.masks.pow(2).sum().backward()                        # the KL's path stays open either way
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in setok.cluster_head.parameters())


@pytest.mark.parametrize("crop", [0, 8])
def test_feature_cache_same_outputs_and_unique_keys(tmp_path, crop):
    """data.cache_features: a cached batch tokenizes exactly as a fresh one (with a crop
    encoder too, which still reads the images), the encoder runs once per image, and
    concatenated data sets get distinct keys."""
    from setok_cli.data.datasets import collate
    from setok_cli.models.setok import SeTok, SeTokConfig
    from setok_cli.train.recipe import LossRecipe
    from setok_cli.train.stage1 import Stage1Model, build_stage1

    from .helpers import make_pairs
    torch.manual_seed(0)
    setok = SeTok(SeTokConfig(encoder="builtin", image_size=56, k=4, max_tokens=6, merger_dim=16, merger_depth=1,
                              merger_cross_depth=1, merger_heads=2, token_dim=16, merger_crop=crop, merger_crop_width=4))
    m = Stage1Model(setok, None, None, None, LossRecipe(), tokenizer_image_size=56, cache_features=True)
    calls = []
    setok.encoder.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    imgs = torch.rand(4, 3, 32, 32)
    fresh = setok(torch.nn.functional.interpolate(imgs, size=(56, 56), mode="bilinear", antialias=True,
                                                  align_corners=False))
    calls.clear()
    a = m.tokenize(imgs[:2], torch.tensor([0, 1]))
    b = m.tokenize(imgs, torch.tensor([0, 1, 2, 3]))       # two hits, two misses
    c = m.tokenize(imgs.flip(0), torch.tensor([3, 2, 1, 0]))  # all hits, other order
    assert calls == [2, 2] and sorted(m.feature_cache) == [0, 1, 2, 3]
    for got, order in ((b, [0, 1, 2, 3]), (c, [3, 2, 1, 0])):
        assert torch.equal(got.features, fresh.features[order])
        assert torch.equal(got.labels, fresh.labels[order])
        assert torch.allclose(got.tokens, fresh.tokens[order], atol=1e-6)
    assert torch.allclose(a.tokens[a.token_mask], fresh.tokens[:2][fresh.token_mask[:2]], atol=1e-6)

    p1, p2 = make_pairs(tmp_path / "a", n=3), make_pairs(tmp_path / "b", n=4, seed=1)
    r = load_recipe(RECIPES / "tiny" / "stage1.yaml", [f"data.train=[{p1}, {p2}]", "data.cache_features=true"])
    model, ds = build_stage1(r)
    assert model.feature_cache == {}
    keys = collate([ds[i] for i in range(len(ds))])["index"].tolist()
    assert keys == list(range(7))


def test_detokenizer_recipe_trains_only_the_detokenizer_from_stage1(shapes, tmp_path):
    """recipes/tiny/detokenizer.yaml: every part starts from the stage-1 run (`model.stage1_from`), the
    detokenizer alone changes, so the tokens stay the stage-1 tokens; a part that does not fit is one line."""
    from safetensors.torch import load_file

    from setok_cli.errors import UserError
    small = ["model.detokenizer.image_size=16",
             "model.detokenizer.unet={sample_size: 16, block_out_channels: [16, 32], "
             "down_block_types: [DownBlock2D, CrossAttnDownBlock2D], up_block_types: [CrossAttnUpBlock2D, UpBlock2D]}",
             f"data.train=[{shapes / 'train' / 'pairs.json'}]", "data.batch_size=8", "train.max_steps=4",
             "train.log_every=1", "train.checkpoint_every=4", "train.progress=false", "optim.warmup_steps=1"]
    torch.manual_seed(0)
    s1 = Trainer(load_recipe(RECIPES / "tiny" / "stage1.yaml", [*small, f"output_dir={tmp_path / 's1'}"])).train()
    r = load_recipe(RECIPES / "tiny" / "detokenizer.yaml",
                    [*small, f"output_dir={tmp_path / 'dt'}", f"model.stage1_from={tmp_path / 's1'}"])
    assert r.train.trainable == ["detokenizer.*"]
    dt = Trainer(r).train()
    log = [json.loads(x) for x in (tmp_path / "dt" / "log.jsonl").read_text().splitlines()]
    assert {"diffusion", "loss"} <= set(log[0]) and "bce" not in log[0] and "phrase" not in log[0]
    for part in ("setok", "mask_decoder", "alignment", "detokenizer"):
        a = load_file(s1.last_checkpoint / part / "model.safetensors")
        b = load_file(dt.last_checkpoint / part / "model.safetensors")
        assert a.keys() == b.keys()
        same = all(torch.equal(a[k], b[k]) for k in a)
        assert same == (part != "detokenizer"), part

    # the detokenizer started from stage I's, not from scratch: its first loss is stage I's last level
    fresh = load_recipe(RECIPES / "tiny" / "detokenizer.yaml",
                        [*small, f"output_dir={tmp_path / 'fresh'}", "model.stage1_from=null", "train.max_steps=1"])
    torch.manual_seed(0)
    Trainer(fresh).train()
    first_fresh = json.loads((tmp_path / "fresh" / "log.jsonl").read_text().splitlines()[0])["diffusion"]
    assert log[0]["diffusion"] < first_fresh

    bad = load_recipe(RECIPES / "tiny" / "detokenizer.yaml",
                      [*small, f"output_dir={tmp_path / 'bad'}", f"model.stage1_from={tmp_path / 's1'}",
                       "model.detokenizer.mapper.hidden_size=32"])
    with pytest.raises(UserError, match="does not fit the recipe's detokenizer"):
        Trainer(bad).train()
