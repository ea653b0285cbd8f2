"""`setok tokenize` through click's CliRunner, on good and bad inputs."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from setok_cli.cli.main import cli


def run(*args):
    runner = CliRunner()
    return runner.invoke(cli, ["tokenize", *map(str, args)], catch_exceptions=False)


def stderr_of(res):
    return res.stderr if hasattr(res, "stderr") else res.output


@pytest.fixture()
def images(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    a = np.zeros((90, 140, 3), np.uint8)
    a[:45] = (200, 40, 30)
    a[45:] = (20, 90, 210)
    Image.fromarray(a).save(d / "rgb.png")
    Image.fromarray(a).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(a).convert("L").save(d / "gray.png")
    rgba = Image.fromarray(a).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "rgba.png")
    Image.fromarray((rng.random((60, 60)) * 65535).astype(np.uint16)).save(d / "deep16.png")
    return d


def test_show_masks_and_json(chelsea_path, tmp_path):
    out = tmp_path / "out"
    res = run(chelsea_path, "--show-masks", "--json", "--out", out)
    assert res.exit_code == 0, res.output
    assert "tokens" in res.output and "grid 16x24" in res.output
    png = Image.open(out / "chelsea_tokens.png")
    assert png.size[0] > 2 * png.size[1]  # image beside its overlay
    js = json.loads((out / "chelsea_tokens.json").read_text())
    assert set(js) >= {"image", "num_tokens", "grid", "labels", "seeds", "mode", "encoder"}
    assert js["grid"] == [16, 24] and js["mode"] == "hard" and js["encoder"] == "builtin"
    lab = np.asarray(js["labels"])
    assert lab.shape == (16, 24) and lab.min() == 0 and lab.max() == js["num_tokens"] - 1
    assert len(js["seeds"]) == js["num_tokens"]
    for t, s in enumerate(js["seeds"]):  # each seed lies in its own token's region
        if s >= 0:
            assert lab.flat[s] == t
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temporary files left


def test_folder_glob_and_conversions(images, tmp_path):
    out = tmp_path / "o"
    res = run(images, str(images / "*.png"), "--json", "--out", out, "--max-tokens", "6")
    assert res.exit_code == 0, res.output
    names = sorted(os.listdir(out))
    assert names == sorted(f"{n}_tokens.json" for n in ("rgb", "cmyk", "gray", "rgba", "deep16"))
    counts = {n: json.loads((out / f"{n}_tokens.json").read_text())["num_tokens"]
              for n in ("rgb", "cmyk", "gray", "rgba", "deep16")}
    # two flat colours: two tokens whatever the format; 16-bit noise has no regions and fills the budget
    assert counts == {"rgb": 2, "cmyk": 2, "gray": 2, "rgba": 2, "deep16": 6}


@pytest.mark.parametrize("mode", ["soft", "threshold", "fixed"])
def test_other_modes(chelsea_path, tmp_path, mode):
    """The options reach the tokenizer: the JSON is what the library gives for them."""
    from setok_cli.models.setok import load_tokenizer

    res = run(chelsea_path, "--mode", mode, "--k", "4", "--max-tokens", "40", "--json", "--out", tmp_path)
    assert res.exit_code == 0, res.output
    js = json.loads((tmp_path / "chelsea_tokens.json").read_text())
    ref = load_tokenizer(mode=mode, k=4, max_tokens=40).tokenize([chelsea_path])
    gh, gw = ref.image_grids[0]
    assert js["mode"] == mode and js["num_tokens"] == int(ref.num_tokens[0])
    assert np.array_equal(np.asarray(js["labels"]), ref.labels[0, :gh, :gw].numpy())
    if mode == "fixed":                 # the top max_tokens seeds, every one wins patches here
        assert js["num_tokens"] == 40
    else:                               # density seeds: fewer than the budget on this photo
        assert js["num_tokens"] < 40


def test_bad_inputs_reported_and_batch_continues(images, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    good = (images / "rgb.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(good[: len(good) // 2])  # truncated
    Image.new("RGB", (10, 50)).save(tmp_path / "tiny.png")
    out = tmp_path / "o"
    bad = [tmp_path / "missing.jpg", tmp_path / "empty.png", tmp_path / "notes.txt", tmp_path / "broken.png",
           tmp_path / "tiny.png"]
    res = run(images / "rgb.png", *bad, "--json", "--out", out)
    assert res.exit_code == 2
    err = stderr_of(res)
    assert "Traceback" not in res.output
    assert (out / "rgb_tokens.json").exists()  # the good image was still tokenized
    for p, why in zip(bad, ["no such file", "empty file", "not an image", "unreadable", "too small"]):
        assert any(str(p) in line and why in line and line.startswith("error:") for line in err.splitlines()), (p, err)
    assert "5 of 6 input(s) failed" in err


def test_unwritable_outputs_are_one_line(images, tmp_path):
    """An --out that cannot be made fails before the model is loaded; a write that fails
    (here a folder where the JSON should go) is one line, and the files already written stay."""
    res = CliRunner().invoke(cli, ["tokenize", str(images / "rgb.png"), "--json", "--out", "/proc/setok-x"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert stderr_of(res).strip().splitlines() == ["error: cannot create folder /proc/setok-x: No such file or directory"]
    out = tmp_path / "o"
    assert run(images / "rgb.png", "--show-masks", "--out", out).exit_code == 0
    png = (out / "rgb_tokens.png").read_bytes()
    (out / "rgb_tokens.json").mkdir()
    res = CliRunner().invoke(cli, ["tokenize", str(images / "rgb.png"), "--show-masks", "--json", "--out", str(out)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert [x for x in stderr_of(res).splitlines() if x.startswith("error:")] == \
        [f"error: cannot write {out / 'rgb_tokens.json'}: Is a directory"]
    assert (out / "rgb_tokens.png").read_bytes() == png and sorted(os.listdir(out)) == ["rgb_tokens.json", "rgb_tokens.png"]


def test_user_errors_are_one_line(tmp_path):
    res = run(tmp_path / "x.png", "--encoder", "someone/not-cached")
    assert res.exit_code == 2 and "huggingface-cli download someone/not-cached" in stderr_of(res)
    assert "Traceback" not in res.output
    res = run(tmp_path / "x.png", "--model", tmp_path / "nope")
    assert res.exit_code == 2 and "not found" in stderr_of(res)
    res = run(tmp_path / "x.png", "--model", tmp_path, "--encoder", "builtin")
    assert res.exit_code == 2 and "not both" in stderr_of(res)


def test_saved_model(tmp_path, chelsea_path):
    from setok_cli.models.setok import SeTok, SeTokConfig

    SeTok(SeTokConfig(merger_dim=32, token_dim=8, mode="soft")).save_pretrained(tmp_path / "tok")
    res = run(chelsea_path, "--model", tmp_path / "tok", "--json", "--out", tmp_path)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "chelsea_tokens.json").read_text())["mode"] == "soft"


def test_exif_orientation_and_modes(tmp_path):
    from setok_cli.images import load_image, to_rgb

    img = Image.new("RGB", (60, 30), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (30, 60)
    deep = Image.fromarray(np.full((20, 20), 65535, np.uint16))
    assert np.asarray(to_rgb(deep)).min() == 255  # 16-bit white stays white
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    assert np.asarray(to_rgb(rgba)).min() == 255  # transparent -> white background
    cmyk = Image.new("CMYK", (20, 20), (0, 255, 255, 0))
    assert tuple(np.asarray(to_rgb(cmyk))[0, 0]) == (255, 0, 0)


def test_model_folder_of_another_part_says_which(tmp_path, chelsea_path):
    """--model given a checkpoint's detokenizer folder: one line naming the part it holds and
    the tokenizer's folder (it used to list thirty unknown config keys)."""
    from setok_cli.models.detokenizer import Detokenizer, DetokenizerConfig, MapperConfig
    from setok_cli.models.setok import SeTok, SeTokConfig
    ck = tmp_path / "checkpoints" / "step_00000001"
    SeTok(SeTokConfig(merger_dim=16, token_dim=8)).save_pretrained(ck / "setok")
    unet = dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, sample_size=16,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
    Detokenizer(DetokenizerConfig(image_size=16, unet=unet, mapper=MapperConfig(
        token_dim=8, hidden_size=16, num_queries=4, intermediate_size=32, output_dim=16))).save_pretrained(
        ck / "detokenizer")
    res = CliRunner().invoke(cli, ["tokenize", chelsea_path, "--model", str(ck / "detokenizer")])
    assert res.exit_code == 2
    assert res.output.strip() == (f"error: {ck / 'detokenizer'} holds the detokenizer, not the SeTok tokenizer; "
                                  f"the SeTok tokenizer of that checkpoint is {ck / 'setok'}")
    # the checkpoint folder itself, and its run folder, find the tokenizer
    for model in (ck, tmp_path):
        res = CliRunner().invoke(cli, ["tokenize", chelsea_path, "--model", str(model)])
        assert res.exit_code == 0, res.output
