"""Captions by beam search (models/setokim/beam.py): one beam writes what Setokim's own greedy
loop writes, each beam answer's score is the model's mean log-likelihood of it as training
computes it (so the prompt, images and positions handed to transformers' `generate` are the
ones the model was trained on), through a plain LM (stage II) and a LoRA-wrapped one (stage III),
and `setok caption` takes `--num-beams` and refuses it beside sampling in one line."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import setok_cli.tasks.setokim as tasks
from setok_cli.cli.main import cli
from setok_cli.models.setokim import TASK_PROMPTS, prompt_batch
from setok_cli.models.setokim.beam import beam_texts

pytestmark = pytest.mark.usefixtures("one_thread")     # tiny models: see tests/conftest.py


@pytest.fixture(scope="module", params=["stage2", "stage3"])
def model(request, stage3_runs):
    return tasks.load_setokim(stage3_runs[request.param])


@pytest.fixture(scope="module")
def pictures(stage3_runs):
    paths = sorted((stage3_runs["world"] / "shapes" / "test" / "images").glob("*.png"))[:3]
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def _args(model, pictures):
    sets = model.read_sets(pictures)
    return prompt_batch(model, [TASK_PROMPTS["caption"]] * len(sets), [[s] for s in sets])


def _mean_loglik(model, pictures, answers, cut_at):
    """Each answer's mean log-likelihood, one row at a time, as training computes it: with its
    `</s>`, unless the answer was cut off at `cut_at` words (then there is none to score)."""
    got = []
    for im, a in zip(pictures, answers):
        r = model.read_sets([im])[0]
        tokens, seeds = r if isinstance(r, tuple) else (r, None)
        sample = {"conversations": [{"from": "human", "value": TASK_PROMPTS["caption"]}, {"from": "gpt", "value": a}],
                  "images": [tokens], **({"seeds": [seeds]} if seeds is not None else {})}
        batch = model.collate([sample])
        scored = (batch["labels"][0] != -100).nonzero().squeeze(1)
        assert batch["labels"][0, scored[-1]] == model.eos_id
        if len(scored) - 1 == cut_at:                                   # cut off: no </s> was written
            batch["labels"][0, scored[-1]] = -100
        with torch.no_grad():
            got.append(-model(**batch).text_loss)
    return torch.stack(got)


def test_one_beam_writes_what_the_greedy_loop_writes(model, pictures):
    args = _args(model, pictures)
    with torch.no_grad():
        want = [g.text for g in model.generate(*args, max_new_tokens=10, text_only=True)]
    assert beam_texts(model, *args, num_beams=1, max_new_tokens=10) == want


@pytest.mark.parametrize("beams", [1, 3])
def test_each_score_is_the_models_own_mean_loglik_of_its_answer(model, pictures, beams):
    texts, scores = beam_texts(model, *_args(model, pictures), num_beams=beams, max_new_tokens=40,
                               return_scores=True)
    assert scores.shape == (3,) and all(texts)
    assert torch.allclose(scores, _mean_loglik(model, pictures, texts, 40), atol=1e-4)


def test_beams_find_answers_at_least_as_likely_here(model, pictures):
    """Not a theorem of beam search, but on these inputs 4 beams must not lose to greedy on average."""
    args = _args(model, pictures)
    _, one = beam_texts(model, *args, num_beams=1, max_new_tokens=40, return_scores=True)
    _, four = beam_texts(model, *args, num_beams=4, max_new_tokens=40, return_scores=True)
    assert four.mean() >= one.mean() - 1e-5


def test_caption_uses_four_beams_when_greedy_and_none_when_sampling(model, pictures, monkeypatch):
    import setok_cli.models.setokim.beam as beam
    seen = []
    real = beam.beam_texts
    monkeypatch.setattr(beam, "beam_texts", lambda *a, **k: seen.append(k["num_beams"]) or real(*a, **k))
    assert tasks.caption(model, pictures, tasks.Sampling(max_new_tokens=8)) == real(
        model, *_args(model, pictures), num_beams=tasks.CAPTION_BEAMS, max_new_tokens=8)
    tasks.caption(model, pictures, tasks.Sampling(max_new_tokens=8, temperature=0.7))
    tasks.caption(model, pictures, tasks.Sampling(max_new_tokens=8, num_beams=1))
    assert seen == [tasks.CAPTION_BEAMS]
    with pytest.raises(tasks.UserError, match="deterministic"):
        tasks.Sampling(temperature=0.7, num_beams=2)


def test_caption_command_takes_beams_and_refuses_them_beside_sampling(stage3_runs):
    imgs = [str(p) for p in sorted((stage3_runs["world"] / "shapes" / "test" / "images").glob("*.png"))[:2]]
    args = ["caption", *imgs, "--model", str(stage3_runs["stage2"]), "--threads", "1", "--max-new-tokens", "8"]
    res = CliRunner().invoke(cli, args + ["--num-beams", "2"])
    assert res.exit_code == 0, res.output
    assert [ln.split(":")[0] for ln in res.output.strip().splitlines()] == imgs
    for bad in (["--num-beams", "0"], ["--num-beams", "2", "--temperature", "0.5"]):
        out = CliRunner().invoke(cli, args + bad)
        assert out.exit_code != 0 and "Traceback" not in out.output, out.output
    out = CliRunner().invoke(cli, args + ["--num-beams", "2", "--temperature", "0.5"])
    assert out.output.strip().splitlines() == ["error: beam search is deterministic: give --num-beams or "
                                               "--temperature / --top-p, not both"]
