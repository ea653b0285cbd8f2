"""`setok edit --diff --lookup segment`: the object an instruction names, the answer prefix that
teacher-forces the old token, and the pipeline dropping the token the segmentation picks."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from setok_cli.models.setokim.edit_diff import referred_object

pytestmark = pytest.mark.usefixtures("one_thread")     # tiny models: see tests/conftest.py


@pytest.mark.parametrize("instruction,expected", [
    ("Remove the red circle.", ("Remove", "the red circle")),
    ("Make the yellow triangle blue.", ("Make", "the yellow triangle")),
    ("make the green ellipse red", ("Make", "the green ellipse")),
    ("Move the leftmost red cross to the top left.", ("Move", "the leftmost red cross")),
    ("Move the star to the center.", ("Move", "the star")),
    ("Add a red circle at the top.", None),       # names no object of the source
    ("Make blue.", None),                         # no object before the new colour
    ("Move the star left.", None),                # no " to ": not a form the diff answers know
    ("Paint the star.", None),
    ("Remove", None),
])
def test_referred_object(instruction, expected):
    assert referred_object(instruction) == expected


@pytest.fixture(scope="module")
def model(stage3_runs):
    from setok_cli.tasks.setokim import load_setokim
    return load_setokim(stage3_runs["stage3"])


@pytest.fixture(scope="module")
def image(stage3_runs, model):
    from setok_cli.models.setokim.bank import token_sets_with_layouts
    imgs = sorted((stage3_runs["world"] / "shapes" / "test" / "images").glob("*.png"))
    return next(p for p in imgs if token_sets_with_layouts(model, [p])[0][0].shape[0] >= 3)


def test_an_answer_prefix_is_the_written_image_fed_back(model, image):
    """Writing a token and reading it as a given answer image are the same to the LM: after a
    free `[Img] v [/Img]` and after the answer given up to v (at v's drawn seed) the next
    word's logits agree."""
    from setok_cli.models.setokim import TASK_PROMPTS, prompt_batch
    from setok_cli.models.setokim.bank import token_sets_with_layouts
    from setok_cli.models.setokim.text import IMAGE_TOKEN_INDEX, tokenize_with_images
    sets, _, seeds = token_sets_with_layouts(model, [image], seeds=True)
    read = model.readable(sets, seeds)
    prompt = TASK_PROMPTS["segment"].format(expression="the red circle")
    kw = dict(max_new_tokens=8, max_visual_tokens=1, place="draw", place_temperature=0.0)
    calls = []
    hook = model.lm.get_output_embeddings().register_forward_hook(lambda m, i, o: calls.append(o[0, -1].clone()))
    try:
        free = model.generate(*prompt_batch(model, [prompt], [read], start_image=True), **kw)[0]
        free_calls = list(calls)
        calls.clear()
        assert free.images and free.images[0].shape[0] == 1 and free.ids[0] == model.img_end_id
        given = (free.images[0], free.seeds[0]) if model.reads_places else free.images[0]
        forced = model.generate(*prompt_batch(model, [prompt], [read + [given]], answer_prefix=["<image>"]), **kw)[0]
    finally:
        hook.remove()
    # free: call 0 reads the prompt up to [Img] (v is written), call 1 reads v (the image ends), call 2
    # reads [/Img] and gives the next word; forced: call 0 reads the prompt with [Img] v [/Img]
    assert torch.allclose(free_calls[2], calls[0], atol=1e-5)
    assert not torch.allclose(free_calls[1], calls[0], atol=1e-2)
    assert forced.ids[:1] == free.ids[1:2]
    # the prefix's ids are those of a training answer that starts the same way
    ids = prompt_batch(model, [prompt], [read + [given]], answer_prefix=["Make <image>"])[0]
    assert ids[0, -2:].tolist() == tokenize_with_images("Make <image>", model.text_tokenizer)
    assert ids[0, -1] == IMAGE_TOKEN_INDEX
    with pytest.raises(Exception, match="answer prefix"):
        prompt_batch(model, [prompt], [read], answer_prefix=[None, None])


@pytest.mark.parametrize("instruction", ["Remove the red circle.", "Make the red circle blue."])
def test_the_segmented_token_is_the_one_dropped(model, image, monkeypatch, instruction):
    """The token dropped is the one whose region the segmentation's mask covers best (IoU), even
    where the written token lies nearer another token."""
    import setok_cli.models.setokim.regions as regions
    import setok_cli.tasks.edit_diff as ed
    from setok_cli.models.setokim.bank import token_sets_with_layouts
    from setok_cli.tasks.setokim import Sampling, edit
    sets, lays = token_sets_with_layouts(model, [image])
    src, lay = sets[0], lays[0]
    asked, seen = [], {}
    for k in range(src.shape[0]):
        far = (k + 1) % src.shape[0]

        def looked(m, readable, expressions, opts, far=far):    # the written token: source token `far`
            asked.append(list(expressions))
            return src[far:far + 1].to(m.device), [True]

        def masks(probs, seen_, grid, k=k):                      # its mask: token k's region and one cell more
            m = lay[k].clone()
            m[int((~lay[k]).nonzero()[0])] = True
            return m.view(1, -1)
        monkeypatch.setattr(ed, "referred_tokens", looked)
        monkeypatch.setattr(regions, "grid_masks", masks)
        monkeypatch.setattr(ed, "_decode", lambda m, sets, *a: seen.__setitem__("sets", sets) or [None])
        edit(model, [image], [instruction], Sampling(diff=True, lookup="segment", max_new_tokens=6))
        got = seen["sets"][0]
        keep = [j for j in range(src.shape[0]) if j != k]
        assert torch.equal(got[:len(keep)], src[keep])              # token k dropped, the rest copied exactly
        extra = got.shape[0] - len(keep)                           # a recolouring may add its new token
        assert extra == 0 if instruction.startswith("Remove") else extra in (0, 1)
    assert asked == [["the red circle"]] * src.shape[0]
    # an addition names no object: no segmentation, the answer writes on its own
    asked.clear()
    edit(model, [image], ["Add a red circle at the top."], Sampling(diff=True, lookup="segment", max_new_tokens=6))
    assert asked == []


def test_grid_masks_put_a_mask_on_the_layout_grid(model, image):
    """A mask over the image's left half, as the mask decoder's probabilities, lands on the
    left half of the layout grid (the image's own extent, as token layouts are)."""
    from setok_cli.models.setokim.regions import grid_masks, read_images
    seen = read_images(model, [image])
    S = seen.pixel_values.shape[-1]
    gh, gw = seen.out.image_grids[0]
    probs = torch.zeros(1, S, S)
    probs[0, :, : gw * seen.patch // 2] = 1.0
    got = grid_masks(probs, seen, 8).view(8, 8)
    want = torch.zeros(8, 8, dtype=torch.bool)
    want[:, :4] = True
    assert torch.equal(got, want)


def test_lookup_needs_diff(stage3_runs, tmp_path):
    from setok_cli.cli.main import cli
    img = sorted((stage3_runs["world"] / "shapes" / "test" / "images").glob("*.png"))[0]
    res = CliRunner().invoke(cli, ["edit", str(img), "--instruction", "Remove the red circle.", "--model",
                                   str(stage3_runs["stage3"]), "--out", str(tmp_path), "--lookup", "segment"])
    assert res.exit_code != 0 and "--lookup segment needs --diff" in res.output
    res = CliRunner().invoke(cli, ["edit", str(img), "--instruction", "Remove the red circle.", "--model",
                                   str(stage3_runs["stage3"]), "--out", str(tmp_path), "--threads", "1", "--size", "32",
                                   "--diff", "--lookup", "segment", "--keep-pixels"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / f"{img.stem}_edited.png").is_file()
