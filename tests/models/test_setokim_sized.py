"""Images whose size is said first (models/setokim/sized.py): the answers of a sized generate row
against the instance maps, the length rule, and the generation loop writing exactly the said
number of tokens plus one whatever the stop head says, only for a model a sized row trained."""
import importlib

import numpy as np
import pytest
import torch
from PIL import Image

from setok_cli.data.conversations import ConversationDataset
from setok_cli.errors import UserError
from setok_cli.models.setokim.sized import SIZED_EXTRA, entry_objects, size_words, sized_answer, sized_length

gen_mod = importlib.import_module("setok_cli.models.setokim.generate")    # the module (the package exports
                                                                           # a function of the same name)
pytestmark = pytest.mark.usefixtures("one_thread")     # tiny models: see tests/conftest.py


def test_sized_answers_say_each_images_object_count(stage2_world):
    pairs = stage2_world / "shapes" / "train" / "pairs.json"
    ds = ConversationDataset(pairs, "generate", 32, sized=True)
    plain = ConversationDataset(pairs, "generate", 32)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight"]
    for i in range(len(ds)):
        conv, want = ds[i]["conversations"], plain[i]["conversations"]
        inst = np.asarray(Image.open(ds[i]["image_keys"][0].split("@")[0].replace("/images/", "/instances/")))
        n = len(set(np.unique(inst).tolist()) - {0})                  # an independent count: the instance map
        assert conv[0] == want[0]
        assert conv[1]["value"] == f"{words[n]} {'object' if n == 1 else 'objects'} <image>"
    assert sized_answer(1) == "one object <image>"
    with pytest.raises(UserError, match="sized is for the generate task"):
        ConversationDataset(pairs, "caption", 32, sized=True)
    with pytest.raises(UserError, match="gives no object count"):
        entry_objects({"image": "x.png", "caption": "a red circle"})


@pytest.fixture(scope="module")
def model(place_setokim, stage2_world):
    return place_setokim(stage2_world / "shapes" / "train" / "pairs.json").eval()


def _ids(model, text):
    return model.text_tokenizer.encode(text, add_special_tokens=False)


def test_the_length_rule_reads_a_number_word_then_object(model):
    words = size_words(model.text_tokenizer, model.lm.get_input_embeddings().num_embeddings)
    two, objects, circles = (_ids(model, w)[0] for w in ("two", "objects", "circles"))
    before, last = torch.tensor([two, two, -1, objects]), torch.tensor([objects, circles, objects, objects])
    assert sized_length(words, before, last).tolist() == [2 + SIZED_EXTRA, -1, -1, -1]
    assert sized_length(None, before, last).tolist() == [-1] * 4


def _image_lengths(model, text, bias, max_vis=9):
    model.stop_head.weight.data.zero_()
    model.stop_head.bias.data.fill_(bias)                       # +: stop after every token, -: never stop
    ids = torch.tensor([_ids(model, text) + [model.img_start_id]])
    out = model.generate(ids, torch.ones_like(ids), max_new_tokens=2, max_visual_tokens=max_vis)[0]
    return [im.shape[0] for im in out.images]


def test_a_sized_model_writes_the_said_number_plus_one_whatever_the_stop_head_says(model):
    try:
        model.config.sized_images = True
        for bias in (100.0, -100.0):
            assert _image_lengths(model, "Generate an image: two objects", bias)[0] == 2 + SIZED_EXTRA
            assert _image_lengths(model, "Generate an image: four objects", bias)[0] == 4 + SIZED_EXTRA
        assert _image_lengths(model, "Add at 5 3", 100.0)[0] == 1          # digits before a token: the stop head
        assert _image_lengths(model, "Add at 5 3", -100.0)[0] == 9
        model.config.sized_images = False
        assert _image_lengths(model, "Generate an image: two objects", 100.0)[0] == 1
        assert _image_lengths(model, "Generate an image: two objects", -100.0)[0] == 9
    finally:
        model.config.sized_images = False


def test_the_size_said_in_the_answer_fixes_the_image_it_opens(model, monkeypatch):
    """The LM writes "three objects [Img]" itself (its samples scripted): the image has 4 tokens."""
    script = [_ids(model, "three")[0], _ids(model, "objects")[0], model.img_start_id] + [model.eos_id] * 20
    steps = iter(script)
    monkeypatch.setattr(gen_mod, "sample_logits", lambda logits, *a: torch.full(logits.shape[:1], next(steps)))
    model.config.sized_images = True
    try:
        model.stop_head.bias.data.fill_(100.0)
        ids = torch.tensor([_ids(model, "Generate an image: a red circle")])
        out = model.generate(ids, torch.ones_like(ids), max_new_tokens=8, max_visual_tokens=9)[0]
    finally:
        model.config.sized_images = False
    assert [im.shape[0] for im in out.images] == [3 + SIZED_EXTRA]
    assert out.text.startswith("three objects")


def test_setok_generate_lets_a_sized_model_say_the_size_first(model, monkeypatch):
    import setok_cli.tasks.setokim as tasks
    seen = []

    def fake(input_ids, *a, **k):
        seen.append(int(input_ids[0, -1]))
        return [gen_mod.Generated(text="", ids=[], images=[torch.zeros(2, int(model.config.token_dim))],
                                  seeds=[torch.zeros(2)])]
    monkeypatch.setattr(model, "generate", fake)
    monkeypatch.setattr(tasks, "_decode", lambda m, sets, *a: [np.zeros((8, 8, 3), np.uint8) for _ in sets])
    for sized in (False, True):
        model.config.sized_images = sized
        tasks.generate(model, ["A picture of one object: a red circle."])
    model.config.sized_images = False
    assert seen[0] == model.img_start_id and seen[1] != model.img_start_id
