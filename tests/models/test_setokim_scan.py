"""Counts that scan (`look_scan`, models/setokim/look.py): the answer goes through every token of
the image in generation order with the running count of the counted objects. The answer's
numbers against an independent overlap count, the tokens the stage rows write, the recipe errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from setok_cli.data.conversations import ConversationDataset, collate_conversations_batch
from setok_cli.errors import UserError
from setok_cli.models.setokim.look import scan_answer

pytestmark = pytest.mark.usefixtures("one_thread")     # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def instruct(stage2_world):
    return stage2_world / "shapes" / "train" / "instruct.json"


@pytest.fixture(scope="module")
def model(place_setokim, instruct):
    return place_setokim(instruct, positions=512, place_input=True)


def test_scan_answer_writes_the_running_count_after_each_token():
    assert scan_answer("3", [0, 1, 0, 2]) == "<image> 0 <image> 1 <image> 1 <image> 3: 3"
    assert scan_answer("3", [0, 1, 0, 2], [["blue"], ["red"], [], ["red", "red"]]) == (
        "<image> blue 0 <image> red 1 <image> no 1 <image> red red 3: 3")
    assert scan_answer("0", [0, 0]) == "<image> 0 <image> 0: 0"
    assert scan_answer("0", []) == "0"


def test_a_scanning_count_writes_every_source_token_with_the_running_count(model, instruct, overlap_oracle):
    from setok_cli.train.stage2 import Stage2Model
    ds = ConversationDataset(instruct, "chat", 32, turns=3, look=["count_by"], look_scan=True)
    items = [ds[i] for i in range(len(ds)) if any(isinstance(t, dict) for t in ds[i]["look"]["turns"])][:4]
    assert items
    before = [[dict(t) for t in it["conversations"]] for it in items]
    sm = Stage2Model(model)
    samples = sm.samples(collate_conversations_batch(items))
    assert [it["conversations"] for it in items] == before                   # the batch's conversations are kept
    srcs = [np.asarray(Image.open(it["look"]["instances"].replace("/instances/", "/images/")).convert("RGB"))
            for it in items]
    tok = model.setok.tokenize(srcs)
    sets = model.token_sets_of(tok)
    for j, (it, s) in enumerate(zip(items, samples)):
        inst_map = np.asarray(Image.open(it["look"]["instances"]))
        K = sets[j].shape[0]
        written, n = iter(s["images"][1:]), 0
        conv = s["conversations"]
        asked = [conv[q - 1]["value"] for q in range(len(conv)) if conv[q]["from"] == "gpt"]
        for turn, t, plain, question in zip(it["look"]["turns"], [t for t in conv if t["from"] == "gpt"],
                                            [t for t in it["conversations"] if t["from"] == "gpt"], asked):
            if not isinstance(turn, dict):
                assert t["value"] == plain["value"] and not turn
                continue
            steps = t["value"].rsplit(": ", 1)[0].split("<image>")
            assert steps[0] == "" and len(steps) == K + 1 and t["value"].rsplit(": ", 1)[1] == plain["value"]
            steps = [x.split() for x in steps[1:]]

            def token_of(k):           # oracle: an object's most-covering token, found in the generation-order set
                want = tok.tokens[j, int(overlap_oracle(tok, j, inst_map, k).argmax())].float()
                return int(((sets[j].float() - want).abs().amax(1) < 1e-5).nonzero()[0])
            at = [token_of(k) for k in turn["scan"]]
            assert [x[-1] for x in steps] == [str(sum(a <= q for a in at)) for q in range(K)]
            assert steps[-1][-1] == plain["value"] == str(len(turn["scan"]))
            n_obj = int(inst_map.max())
            held = [[turn["words"][k - 1] for k in range(1, n_obj + 1) if token_of(k) == q] for q in range(K)]
            assert [x[:-1] for x in steps] == [h or ["no"] for h in held]         # the words of what each holds
            named = question.replace("<image>", " ").split()[2]              # "How many red objects" / "circles"
            assert all(turn["words"][k - 1] in (named, named[:-1], named[:-2]) for k in turn["scan"])
            for q in range(K):                                        # every source token, in order
                assert torch.allclose(next(written)[0].float(), sets[j][q].float())
                n += 1
        assert len(s["images"]) == 1 + n and len(s["seeds"]) == len(s["images"])
    assert torch.isfinite(model(**model.collate(samples)).loss)
    with pytest.raises(UserError, match="look_scan is true or false and needs look, without look_numbers"):
        ConversationDataset(instruct, "instruct", 32, look_scan=True)
    with pytest.raises(UserError, match="look_scan is true or false and needs look, without look_numbers"):
        ConversationDataset(instruct, "instruct", 32, look=True, look_numbers=True, look_scan=True)


def test_scan_steps_sorts_each_answer_step_and_scores_the_model_on_it(model, instruct, benchmark_script):
    ss = benchmark_script("scan_steps")
    words = "[Img] blue 0 [Img] red 1 [Img] no 1 [/Img] [Img] red red 3 : 3 </s>".split()
    assert ss.step_kinds(words) == [None, "words", "same", "go_on", "words", "increment", "go_on", "words", "same",
                                    None, "go_on", "words", "words", "increment", "stop", None, None]
    got = ss.score(model, str(instruct), n=6, image_size=32)
    # the steps it scores are those of the answers the stage rows write, counted here on their text
    from setok_cli.train.stage2 import Stage2Model
    ds = ConversationDataset(instruct, "instruct", 32, look=["count_by"], look_scan=True)
    items = [ds[i] for i in range(len(ds)) if isinstance(ds[i]["look"]["turns"][0], dict)][:6]
    want = dict.fromkeys(ss.STEPS, 0)
    for s in Stage2Model(model).samples(collate_conversations_batch(items)):
        steps = [x.split() for x in s["conversations"][-1]["value"].rsplit(": ", 1)[0].split("<image>")[1:]]
        numbers = ["0"] + [x[-1] for x in steps]
        want["words"] += sum(len(x) - 1 for x in steps)
        want["increment"] += sum(a != b for a, b in zip(numbers, numbers[1:]))
        want["same"] += sum(a == b for a, b in zip(numbers, numbers[1:]))
        want["go_on"] += len(steps) - 1
        want["stop"] += 1
    assert {k: r["steps"] for k, r in got.items()} == want and want["stop"] == len(items) > 0
    assert all(0 <= r["right"] <= r["steps"] for r in got.values())
