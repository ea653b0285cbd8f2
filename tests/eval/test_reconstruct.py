"""`setok eval reconstruct` and the stage-1 scoring behind it: each metric on a known case,
and the command end to end on a tiny random checkpoint."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from setok_cli.cli.main import cli
from setok_cli.data import shapes
from setok_cli.eval import reconstruct as R

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _scenes(world):
    entries = json.loads((world / "pairs.json").read_text())
    return entries, [json.loads((world / e["scene"]).read_text()) for e in entries]


def _with_extra_object(scene, size, seed):
    """The scene rendered with one more object that keeps it valid for the parser."""
    rng = np.random.default_rng(seed)
    for _ in range(200):
        objs = scene["objects"] + [shapes.sample_object(rng)]
        if shapes._valid(objs):
            return shapes.render({**scene, "objects": objs}, size).image
    raise AssertionError("no room for an extra object")


def test_scene_tally_extra_object_costs_precision_not_recall(world):
    entries, scenes = _scenes(world)
    exact, extra = R.SceneTally(), R.SceneTally()
    for i, (e, sc) in enumerate(zip(entries[:4], scenes[:4])):
        exact.add(np.asarray(Image.open(world / e["image"]).convert("RGB")), sc)
        extra.add(_with_extra_object(sc, 64, i), sc)
    n = sum(len(sc["objects"]) for sc in scenes[:4])
    assert (exact.recall(), exact.precision()) == (1.0, 1.0)
    assert extra.recall() == 1.0 and extra.n_gt == n
    assert extra.precision() == pytest.approx(n / (n + 4))
    assert R.SceneTally().recall() is None and R.SceneTally().precision() is None
    # per shape: every true object right in both; the counts are the scenes' own
    want: dict = {}
    for sc in scenes[:4]:
        for o in sc["objects"]:
            want[o["shape"]] = want.get(o["shape"], 0) + 1
    assert R.per_shape({"exact": exact, "extra": extra}) == {
        s: {"objects": k, "exact": k, "extra": k} for s, k in sorted(want.items())}


def test_per_shape_counts_misses():
    t, u = R.SceneTally(), R.SceneTally()
    t.by_shape = {"star": [3, 5], "circle": [2, 2]}
    u.by_shape = {"star": [1, 5]}          # a tally that got no circle right
    assert R.per_shape({"a": t, "b": u}) == {"circle": {"objects": 2, "a": 2, "b": 0},
                                             "star": {"objects": 5, "a": 3, "b": 1}}


class ReplayDetokenizer:
    """Returns prepared images in data order as its 'samples' (an oracle decoder)."""

    def __init__(self, images):
        self.images = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in images])
        self.pos = 0
        self.canvas = None
        self.config = SimpleNamespace(image_size=images[0].shape[0], canvas_recon_weight=0.0, sample_steps=1,
                                      sampler="replay", guidance_scale=1.0)

    def sample(self, tokens, token_mask, steps=None, generator=None, guidance_scale=None):
        out = self.images[self.pos:self.pos + tokens.shape[0]]
        self.pos += tokens.shape[0]
        return out


def test_evaluate_reconstruction_scores_an_added_object(world, builtin_tokenizer):
    entries, scenes = _scenes(world)
    n = 5
    extra = [_with_extra_object(sc, 64, i) for i, sc in enumerate(scenes[:n])]
    res = R.evaluate_reconstruction(builtin_tokenizer, ReplayDetokenizer(extra), data=world / "pairs.json",
                                    limit=n, batch_size=2)
    objects = sum(len(sc["objects"]) for sc in scenes[:n])
    assert res["images"] == n and res["objects"] == objects
    assert res["recon_object_recall"] == 1.0
    assert res["recon_object_precision"] == pytest.approx(objects / (objects + n))
    # the decoder works at the data's own size: the ceiling is the originals themselves
    assert res["ceiling_object_recall"] == 1.0 and res["ceiling_object_precision"] == 1.0
    assert "canvas_object_recall" not in res and "mask_decoder_miou" not in res and "i2t_r1" not in res
    # one tokenizer for both rows: its clustering is the untrained one
    assert res["fg_ari_trained"] == res["fg_ari_untrained"]


def test_retrieval_known_ranks():
    # similarity rows: query 0 ranks candidate 0 first, query 1 ranks its own candidate third,
    # query 2 has its own candidate last of six (rank 6): R@1 = 1/3, R@5 = 2/3
    sim = np.array([[9, 1, 2, 3, 4, 5], [9, 1, 8, 0, 0, 0], [5, 4, 3, 2, 1, 0]], float)
    keys_c = ["a", "b", "c", "d", "e", "z"]
    keys_q = ["a", "b", "z"]
    from setok_cli.eval.metrics import retrieval_recall
    assert retrieval_recall(sim, keys_q, keys_c, 1) == pytest.approx(1 / 3)
    assert retrieval_recall(sim, keys_q, keys_c, 3) == pytest.approx(2 / 3)
    assert retrieval_recall(sim, keys_q, keys_c, 5) == pytest.approx(2 / 3)
    assert retrieval_recall(sim, keys_q, keys_c, 6) == 1.0
    # a twin caption counts: query 1's top candidate 0 has the same key
    assert retrieval_recall(sim, keys_q, ["b", "x", "x", "x", "x", "z"], 1) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        retrieval_recall(sim, keys_q, keys_c[:5], 1)


def test_retrieval_scores_both_directions():
    # 6 pairs; images 0-3 point at their own caption, image 4 at caption 5 and image 5 at
    # caption 4 (one-hot embeddings, so every similarity is 0 or 1)
    img = torch.eye(6)[[0, 1, 2, 3, 5, 4]]
    txt = torch.eye(6)
    caps = [f"caption {i}" for i in range(6)]
    r = R.retrieval_scores(img, txt, caps)
    assert r["i2t_r1"] == pytest.approx(4 / 6) and r["t2i_r1"] == pytest.approx(4 / 6)
    # image 4's own caption ties at 0 with captions 0-3, which rank first by index: 6th of 6
    assert r["i2t_r5"] == pytest.approx(4 / 6) and r["t2i_r5"] == pytest.approx(4 / 6)
    # twin captions: images 4 and 5 share one text, so the swap is no mistake
    r = R.retrieval_scores(img, txt, caps[:4] + ["twin", "Twin "])
    assert r["i2t_r1"] == 1.0 and r["t2i_r1"] == 1.0 and r["retrieval_pool"] == 6


def test_image_embeddings_pool_valid_tokens_only():
    from setok_cli.models.alignment import AlignmentConfig, ConceptAlignment
    torch.manual_seed(0)
    al = ConceptAlignment(AlignmentConfig(token_dim=4, embed_dim=3, builtin_dim=8, builtin_buckets=16)).eval()
    tok = torch.randn(1, 3, 4)
    tok[0, 2] = 1e4  # a padding slot: must not count
    mask = torch.tensor([[True, True, False]])
    with torch.no_grad():
        got = R.image_embeddings(al, tok, mask)
        want = al.image_proj(tok[0, :2]).mean(0, keepdim=True)
    torch.testing.assert_close(got, want)


def test_training_figures_from_the_run_log(tmp_path):
    ck = tmp_path / "checkpoints" / "step_00000020"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"step": 20}))
    rows = [{"step": 10, "elapsed_s": 5.04, "peak_mem_mb": 100.0},
            {"step": 20, "elapsed_s": 9.96, "peak_mem_mb": 150.0},
            {"step": 30, "elapsed_s": 15.0, "peak_mem_mb": 999.0}]   # after the checkpoint: not counted
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert R.training_figures(ck) == {"train_steps": 20, "train_wall_s": 10.0, "train_peak_mem_mb": 150.0}
    assert R.training_figures(tmp_path / "elsewhere") == {}


# ----------------------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder holding one checkpoint of the tiny recipe's parts, untrained (a 16-px UNet)."""
    from setok_cli.train.recipe import dump_recipe, load_recipe
    from setok_cli.train.stage1 import build_stage1_model

    run = tmp_path_factory.mktemp("run")
    r = load_recipe(RECIPES / "tiny" / "stage1.yaml", [
        f"output_dir={run}", "model.detokenizer.image_size=16", "model.detokenizer.canvas_grid=16",
        "model.detokenizer.unet={sample_size: 16, block_out_channels: [16, 32], "
        "down_block_types: [DownBlock2D, CrossAttnDownBlock2D], up_block_types: [CrossAttnUpBlock2D, UpBlock2D]}"])
    torch.manual_seed(0)
    ck = run / "checkpoints" / "step_00000002"
    ck.mkdir(parents=True)
    build_stage1_model(r).save_parts(ck)
    dump_recipe(r, ck / "recipe.yaml")
    (ck / "trainer_state.json").write_text(json.dumps({"step": 2}))
    (run / "log.jsonl").write_text(json.dumps({"step": 2, "elapsed_s": 1.25, "peak_mem_mb": 321.0}) + "\n")
    return run


def _run(*args):
    return CliRunner().invoke(cli, ["eval", "reconstruct", *args])


def test_reconstruct_command_end_to_end(world, tiny_run, tmp_path):
    _, scenes = _scenes(world)
    grid = tmp_path / "grid.png"
    r = _run("--model", str(tiny_run), "--data", str(world / "pairs.json"), "--limit", "4", "--batch-size", "3",
             "--grid", str(grid), "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["checkpoint"] == str(tiny_run / "checkpoints" / "step_00000002")
    assert res["images"] == 4 and res["objects"] == sum(len(sc["objects"]) for sc in scenes[:4])
    assert res["detok_resolution"] == 16 and res["sample_steps"] == 3
    for k in ("recon", "canvas", "ceiling"):
        assert f"{k}_object_recall" in res and f"{k}_object_precision" in res
    assert isinstance(res["mask_decoder_miou"], float)
    # untrained: the checkpoint's clustering is the untrained one; 4 candidates: R@5 is 1
    assert res["fg_ari_trained"] == res["fg_ari_untrained"] and res["mbo_trained"] == res["mbo_untrained"]
    assert res["i2t_r5"] == res["t2i_r5"] == 1.0 and res["retrieval_pool"] == 4
    assert (res["train_steps"], res["train_wall_s"], res["train_peak_mem_mb"]) == (2, 1.2, 321.0)
    # rows: originals, reconstructions, canvas, segments; the first batch's 3 images of 64 px at 2x
    assert Image.open(grid).size == (3 * 128, 4 * 128)
    # the same seed gives the same samples
    again = json.loads(_run("--model", str(tiny_run / "checkpoints" / "step_00000002"), "--data",
                            str(world / "pairs.json"), "--limit", "4", "--batch-size", "2", "--json").output)
    assert again["recon_object_recall"] == res["recon_object_recall"]
    r = _run("--model", str(tiny_run), "--data", str(world / "pairs.json"), "--limit", "2", "--threads", "1")
    assert r.exit_code == 0 and "recon_object_precision" in r.output and "i2t_r1" in r.output
    assert "objects right per shape" in r.output
    assert sum(v["objects"] for v in res["per_shape"].values()) == res["objects"]


@pytest.mark.parametrize("args, message", [
    ([], "needs --model"),
    (["--model", "{tmp}/nope"], "not found"),
    (["--model", "{tmp}"], "not a stage-1 checkpoint"),
    (["--model", "{run}", "--pred", "p.json"], "--pred is not used by the reconstruct task"),
    (["--model", "{run}", "--mode", "soft"], "tokenizer task only"),
    (["--model", "{run}", "--data", "{w}/objects.json"], "objects"),
])
def test_reconstruct_user_errors(world, tiny_run, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, run=tiny_run, w=world) for a in args]
    if "--data" not in args:
        args += ["--data", str(world / "pairs.json")]
    r = _run(*args)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_reconstruct_needs_scenes(world, tiny_run, tmp_path):
    entries = json.loads((world / "pairs.json").read_text())
    for e in entries:
        e.pop("scene", None)
        e["image"], e["instances"] = str(world / e["image"]), str(world / e["instances"])
    (tmp_path / "p.json").write_text(json.dumps(entries))
    r = _run("--model", str(tiny_run), "--data", str(tmp_path / "p.json"))
    assert r.exit_code == 2 and "has no 'scene'" in r.output
