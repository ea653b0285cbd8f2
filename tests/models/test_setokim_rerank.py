"""Generation by re-reading (tasks/rerank.py): each candidate's score is its own caption loss (not
its batch's), the lowest score wins, `--rerank R` draws its candidates with the seeds the
docstring names, candidate 0 being the image drawn without reranking, and `--rerank-stop` stops
a prompt's drawing once a candidate scores at most the stop."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import setok_cli.tasks.rerank as rerank
import setok_cli.tasks.setokim as tasks
from setok_cli.cli.main import cli

pytestmark = pytest.mark.usefixtures("one_thread")     # tiny models: see tests/conftest.py

PROMPTS = ["A picture of one object: a red circle.", "A picture of two objects: a blue star and a green square."]


@pytest.fixture(scope="module")
def model(stage3_runs):
    return tasks.load_setokim(stage3_runs["stage3"])


@pytest.fixture(scope="module")
def pictures(stage3_runs):
    paths = sorted((stage3_runs["world"] / "shapes" / "test" / "images").glob("*.png"))[:3]
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def test_each_score_is_the_caption_loss_of_its_own_image(model, pictures):
    caps = ["A picture of one object: a red circle.", "There are two objects in the image: a blue star and a star.",
            "A picture of three objects: a red circle, a green square and a cyan cross."]
    got = rerank.caption_scores(model, pictures, caps)
    from setok_cli.models.setokim import TASK_PROMPTS
    for k, (im, c) in enumerate(zip(pictures, caps)):            # one at a time: the model's own mean loss
        r = model.read_sets([im])[0]
        tokens, seeds = r if isinstance(r, tuple) else (r, None)
        sample = {"conversations": [{"from": "human", "value": TASK_PROMPTS["caption"]}, {"from": "gpt", "value": c}],
                  "images": [tokens], **({"seeds": [seeds]} if seeds is not None else {})}
        with torch.no_grad():
            want = model(**model.collate([sample])).text_loss
        assert torch.allclose(got[k], want, atol=1e-4)
    assert got.shape == (3,) and torch.isfinite(got).all()


def test_pick_keeps_the_lowest_score_per_prompt(model, monkeypatch):
    cands = [[np.full((2, 2, 3), 10 * c + i, np.uint8) for i in range(2)] for c in range(3)]   # candidate c, prompt i
    scores = torch.tensor([[0.5, 0.1], [0.2, 0.3], [0.2, 0.9]])                                 # (C, B)
    monkeypatch.setattr(rerank, "caption_scores", lambda m, ims, caps: scores[int(ims[0][0, 0, 0]) // 10])
    got = rerank.pick(model, PROMPTS, cands)
    assert [int(g[0, 0, 0]) for g in got] == [10, 1]               # prompt 0: candidate 1 (first of equals), 1: 0


def test_rerank_draws_candidates_with_their_seeds(model, monkeypatch):
    plain = tasks.generate(model, PROMPTS, 2, tasks.Sampling(max_new_tokens=4), size=16)
    calls = []

    def second(m, ims, caps):                                      # candidate 1 of each image reads back best
        calls.append(len(ims))
        return torch.full((len(ims),), [1.0, 0.0, 0.5][(len(calls) - 1) % 3])
    monkeypatch.setattr(rerank, "caption_scores", second)
    stats = {}
    got = tasks.generate(model, PROMPTS, 2, tasks.Sampling(max_new_tokens=4, rerank=3), size=16, stats=stats)
    shifted = tasks.generate(model, PROMPTS, 2, tasks.Sampling(max_new_tokens=4, seed=2), size=16)
    assert calls == [2] * 6 and stats["drawn"] == [3, 3, 3, 3]     # 3 candidates of 2 images, both prompts each
    for i in range(2):                                             # candidate 1 of image j: seed 0 + j + 1 * 2
        assert all(np.array_equal(a, b) for a, b in zip(got[i], shifted[i]))
    monkeypatch.undo()
    one = tasks.generate(model, PROMPTS, 2, tasks.Sampling(max_new_tokens=4, rerank=1), size=16)
    assert all(np.array_equal(a, b) for i in range(2) for a, b in zip(one[i], plain[i]))


def test_best_of_stops_a_prompt_once_it_reads_back_well(model, monkeypatch):
    scores = {0: [0.9, 0.05, 0.01, 0.0], 1: [0.5, 0.4, 0.3, 0.2], 2: [0.02, 0.0, 0.0, 0.0]}    # prompt -> per candidate
    asked = []

    def draw(idx, c):
        asked.append((list(idx), c))
        return [np.full((2, 2, 3), 10 * c + i, np.uint8) for i in idx]
    monkeypatch.setattr(rerank, "caption_scores", lambda m, ims, caps: torch.tensor(
        [scores[int(im[0, 0, 0]) % 10][int(im[0, 0, 0]) // 10] for im in ims]))
    best, drawn = rerank.best_of(model, ["a", "b", "c"], draw, 4, stop=0.1)
    assert asked == [([0, 1, 2], 0), ([0, 1], 1), ([1], 2), ([1], 3)]       # prompt 2 stops at once, prompt 0 after 2
    assert drawn == [2, 4, 1] and [int(b[0, 0, 0]) for b in best] == [10, 31, 2]
    best, drawn = rerank.best_of(model, ["a", "b", "c"], draw, 4)           # no stop: all four, the lowest kept
    assert drawn == [4, 4, 4] and [int(b[0, 0, 0]) for b in best] == [30, 31, 12]   # prompt 2: first of equals


def test_best_of_never_keeps_a_nan_score_over_a_real_one(model, monkeypatch):
    monkeypatch.setattr(rerank, "caption_scores", lambda m, ims, caps: torch.tensor(
        [float("nan") if int(ims[0][0, 0, 0]) == 0 else 3.0]))
    best, _ = rerank.best_of(model, ["a"], lambda idx, c: [np.full((2, 2, 3), c, np.uint8)], 2)
    assert int(best[0][0, 0, 0]) == 1


def test_generate_command_reranks_and_refuses_zero(stage3_runs, tmp_path):
    args = ["generate", "a red circle", "--model", str(stage3_runs["stage3"]), "--out", str(tmp_path),
            "--threads", "1", "--size", "16", "--max-new-tokens", "4"]
    res = CliRunner().invoke(cli, args + ["--rerank", "2"])
    assert res.exit_code == 0, res.output
    assert np.asarray(Image.open(res.output.strip().splitlines()[-1])).shape == (16, 16, 3)
    bad = CliRunner().invoke(cli, args + ["--rerank", "0"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output
    lone = CliRunner().invoke(cli, args + ["--rerank-stop", "0.5"])          # a stop without candidates to stop
    assert lone.exit_code != 0 and "--rerank-stop needs --rerank" in lone.output and "Traceback" not in lone.output
    early = CliRunner().invoke(cli, args + ["--rerank", "3", "--rerank-stop", "1000"])
    assert early.exit_code == 0, early.output


# captions reranked by the image they would draw (`setok caption --rerank N`)

def test_each_image_score_is_the_generation_loss_of_its_own_image(model, pictures):
    from setok_cli.data.conversations import task_conversation
    caps = ["A picture of one object: a red circle.", "A picture of two objects: a blue star and a star.",
            "A picture of three objects: a red circle, a green square and a cyan cross."]
    read = model.read_sets(pictures)
    got = rerank.image_scores(model, read, caps)
    for k, (r, c) in enumerate(zip(read, caps)):                   # one at a time, as the trainer's generate row
        tokens, seeds = r if isinstance(r, tuple) else (r, None)
        conv, _ = task_conversation("generate", {"caption": c, "image": "unused.png"})
        sample = {"conversations": conv, "images": [tokens], **({"seeds": [seeds]} if seeds is not None else {})}
        with torch.no_grad():
            out = model(**model.collate([sample]))
        assert out.num_visual == tokens.shape[0] and torch.allclose(got[k], out.loss, atol=1e-4)
    other = rerank.image_scores(model, read[::-1], caps)           # the image matters, not only the caption
    assert not torch.allclose(got, other)
    marked = rerank.image_scores(model, read[:1], ["A picture of one object: <image> a red circle."])
    assert torch.allclose(marked, got[:1], atol=1e-4)              # a written image mark is not read as a prompt image


def test_pick_captions_keeps_the_lowest_score(model, monkeypatch):
    cands = [[f"c{c} i{i}" for i in range(2)] for c in range(3)]
    scores = torch.tensor([[0.5, 0.1], [0.2, 0.3], [0.2, 0.9]])                                 # (C, B)
    monkeypatch.setattr(rerank, "image_scores", lambda m, read, caps: scores[int(caps[0][1])])
    assert rerank.pick_captions(model, [None, None], cands) == ["c1 i0", "c0 i1"]


def test_caption_rerank_samples_its_candidates_with_their_seeds(model, pictures, monkeypatch):
    plain = tasks.caption(model, pictures, tasks.Sampling(max_new_tokens=6))
    seen = []
    monkeypatch.setattr(rerank, "pick_captions", lambda m, read, cands: seen.append(cands) or cands[2])
    got = tasks.caption(model, pictures, tasks.Sampling(max_new_tokens=6, rerank=3, rerank_temperature=1.5, seed=4))
    assert len(seen[0]) == 3 and seen[0][0] == tasks.caption(model, pictures, tasks.Sampling(max_new_tokens=6, seed=4))
    hot = tasks.caption(model, pictures, tasks.Sampling(max_new_tokens=6, temperature=1.5, seed=6))
    assert got == hot                                              # candidate 2: seed 4 + 2, at the rerank temperature
    monkeypatch.undo()
    assert tasks.caption(model, pictures, tasks.Sampling(max_new_tokens=6, rerank=1)) == plain


def test_caption_command_reranks_and_refuses_zero(stage3_runs):
    imgs = [str(p) for p in sorted((stage3_runs["world"] / "shapes" / "test" / "images").glob("*.png"))[:2]]
    args = ["caption", *imgs, "--model", str(stage3_runs["stage3"]), "--threads", "1", "--max-new-tokens", "6"]
    res = CliRunner().invoke(cli, args + ["--rerank", "2"])
    assert res.exit_code == 0, res.output
    assert [ln.split(":")[0] for ln in res.output.strip().splitlines()] == imgs
    bad = CliRunner().invoke(cli, args + ["--rerank", "0"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output


def test_generate_over_a_data_file_records_the_candidates_drawn(stage3_runs, tmp_path):
    import json
    data = stage3_runs["world"] / "shapes" / "test" / "pairs.json"
    out = tmp_path / "gen.json"
    args = ["generate", "--data", str(data), "--pred-out", str(out), "--limit", "3", "--model",
            str(stage3_runs["stage3"]), "--threads", "1", "--size", "16", "--max-new-tokens", "4"]
    res = CliRunner().invoke(cli, args + ["--rerank", "2", "--rerank-stop", "1000"])    # every candidate stops it
    assert res.exit_code == 0, res.output
    assert [p["drawn"] for p in json.loads(out.read_text())] == [1, 1, 1]
    assert "candidates drawn per image: mean 1.00, at most 2" in res.output
    res = CliRunner().invoke(cli, args + ["--rerank", "2", "--rerank-stop", "0"])       # none reads back at 0
    assert res.exit_code == 0, res.output
    assert [p["drawn"] for p in json.loads(out.read_text())] == [2, 2, 2]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0 and all("drawn" not in p for p in json.loads(out.read_text()))
