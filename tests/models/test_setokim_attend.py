"""Attention supervision of question answers (models/setokim/attend.py, `loss.attend`): the
objects a question names, the tokens that belong to them, the answer positions, the loss on
known attention weights and with the LM's row groups, and a learning check: the loss alone
pulls one head of the supervised layer onto the named object's tokens."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from setok_cli.data.conversations import ConversationDataset, MixtureDataset, question_objects
from setok_cli.data.shapes_text import referred_objects
from setok_cli.models.setokim import Setokim, SetokimConfig, build_word_tokenizer
from setok_cli.models.setokim.attend import AttentionTap, answer_queries, attend_loss, token_objects

TINY_LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2, max_position_embeddings=256)
Q = "What color is the circle?"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_referred_objects_known():
    objs = [{"shape": "hexagon", "color": "green"}, {"shape": "circle", "color": "red"},
            {"shape": "hexagon", "color": "red"}]
    cases = {Q: [1], "What shape is the green object?": [0], "How many hexagons are there?": [0, 2],
             "How many objects are there?": [], "How many red objects are there?": [1, 2],
             "Is there a red hexagon?": [2], "Is there a blue star?": [],
             "Is the rightmost green hexagon above the red object?": [0, 1, 2]}
    for q, want in cases.items():
        assert referred_objects(q, objs) == want, q


def test_question_objects_read_the_world(stage2_world):
    tr = stage2_world / "shapes" / "train"
    ds = ConversationDataset(tr / "instruct.json", "chat", image_size=32)
    scenes = 0
    for i in range(len(ds)):
        it = ds[i]
        a = it["attend"]
        conv = it["conversations"]
        assert a is not None and a["instances"].endswith(".png")
        assert len(a["turns"]) == sum(t["from"] == "gpt" for t in conv)
        scene = json.loads((tr / "scenes" / (a["instances"].split("/")[-1][:-4] + ".json")).read_text())["objects"]
        questions = [t["value"] for t in conv if t["from"] == "human"]
        for q, ids in zip(questions, a["turns"]):
            if q.split("\n")[-1].startswith("What color is the "):
                shape = q.rstrip("?").split()[-1]
                assert ids and all(scene[j - 1]["shape"] == shape for j in ids)
                scenes += 1
    assert scenes > 0
    assert question_objects([{"from": "human", "value": Q}, {"from": "gpt", "value": "red"}],
                            str(stage2_world / "nowhere.png")) is None
    # the batch carries it; other tasks carry None
    cap = ConversationDataset(tr / "pairs.json", "caption", image_size=32)
    batch = MixtureDataset.collate([ds[0], cap[0]])
    assert batch["attend"][0] == ds[0]["attend"] and batch["attend"][1] is None


def test_token_objects_known():
    # a 4 x 4 grid: token 0 the top half, token 1 the bottom-left quarter, token 2 the bottom-right
    labels = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 2, 2], [1, 1, 2, 2]])
    out = SimpleNamespace(image_labels=lambda i: labels, tokens=torch.zeros(1, 3, 4),
                          token_mask=torch.ones(1, 3, dtype=torch.bool), seeds=torch.tensor([[12, 8, 0]]))
    inst = np.zeros((8, 8), dtype=np.uint8)
    inst[4:8, 0:4] = 1                      # object 1 fills token 1
    inst[4:8, 4:6] = 2                      # object 2 fills half of token 2: not more than half
    inst[0:2, 0:4] = 3                      # object 3: a quarter of token 0
    # generation order by seed: token 2 (seed 0), token 1 (seed 8), token 0 (seed 12)
    assert token_objects(out, 0, inst).tolist() == [0, 1, 0]
    inst[4:8, 6] = 2                        # now 3/4 of token 2
    assert token_objects(out, 0, inst).tolist() == [2, 1, 0]


def test_answer_queries():
    lab = torch.tensor([[-100, -100, 5, 6, -100, -100, 7, -100], [-100, 1, -100, -100, -100, -100, -100, -100]])
    assert answer_queries(lab) == [[1, 5], [0]]


def test_attend_loss_known_value():
    L = 6
    sp = SimpleNamespace(labels=torch.tensor([[-100, -100, -100, -100, 9, 9]]), vis_dst=torch.tensor([1, 2, 3]),
                         vis_src=torch.tensor([0, 1, 2]))
    w = torch.zeros(1, 2, L, L)
    w[0, 0, 3, :] = torch.tensor([0.5, 0.1, 0.1, 0.3, 0.0, 0.0])     # head 0: 0.3 of its 0.5 on the image
    w[0, 1, 3, :] = torch.tensor([0.5, 0.2, 0.2, 0.1, 0.0, 0.0])     # head 1: 0.1 of 0.5
    obj = torch.tensor([False, False, True])
    loss = attend_loss([w], sp, torch.ones(1, L), 1, [(0, 0, obj)])
    assert loss.item() == pytest.approx(-np.log(0.6 + 1e-6), rel=1e-5)
    mean = attend_loss([w], sp, torch.ones(1, L), 1, [(0, 0, obj)], heads="mean")   # (0.6 + 0.2) / 2
    assert mean.item() == pytest.approx(-np.log(0.4 + 1e-6), rel=1e-5)
    with pytest.raises(ValueError, match="heads"):
        attend_loss([w], sp, torch.ones(1, L), 1, [(0, 0, obj)], heads="sum")
    assert attend_loss([w], sp, torch.ones(1, L), 1, [(0, 0, torch.zeros(3, dtype=torch.bool))]) is None
    assert attend_loss([w], sp, torch.ones(1, L), 1, [(0, 1, obj)]) is None      # no second answer


@pytest.fixture(scope="module")
def folders(tmp_path_factory, write_tiny_stage1):
    root = tmp_path_factory.mktemp("setokim_attend")
    write_tiny_stage1(root / "stage1" / "checkpoints" / "step_00000010")
    words = [Q, "red", "blue", "How many objects are there?", "3"]
    build_word_tokenizer(extra_texts=words).save_pretrained(root / "tok")
    return root


def batch_of(m, K=(5, 3, 4)):
    g = torch.Generator().manual_seed(0)
    convs = [[{"from": "human", "value": "<image>\n" + Q}, {"from": "gpt", "value": "red"}],
             [{"from": "human", "value": "<image>\nHow many objects are there?"}, {"from": "gpt", "value": "3"},
              {"from": "human", "value": Q}, {"from": "gpt", "value": "blue"}],
             [{"from": "human", "value": "<image>\n" + Q}, {"from": "gpt", "value": "red"}]]
    return m.collate([{"conversations": c, "images": [torch.randn(k, 8, generator=g) * 2]} for c, k in zip(convs, K)])


def run_loss(m, kw, groups, targets):
    tap = AttentionTap(m, -1)
    with tap.on():
        out = m(**kw, row_groups=groups)
    sp = m.splice(kw["input_ids"], kw["labels"], kw["attention_mask"], kw["image_token_mask"])
    return out, attend_loss(tap.weights, sp, sp.attention_mask, groups, targets)


def test_tap_groups_and_learning(folders):
    torch.manual_seed(0)
    m = Setokim.from_config(SetokimConfig(lm=dict(TINY_LM), text_tokenizer=str(folders / "tok"),
                                          stage1=str(folders / "stage1")))
    kw = batch_of(m)
    before = m.lm.get_decoder().config._attn_implementation
    targets = [(0, 0, torch.tensor([False, False, True, False, False])),
               (1, 1, torch.tensor([True, False, False])), (2, 0, torch.tensor([False, False, False, True]))]
    out1, l1 = run_loss(m, kw, 1, targets)
    out3, l3 = run_loss(m, kw, 3, targets)
    assert torch.allclose(l1, l3, atol=1e-5) and torch.allclose(out1.loss, out3.loss, atol=1e-5)
    plain = m(**kw).loss                                   # the tap changes nothing of the model's own loss
    assert torch.allclose(plain, out1.loss, atol=1e-5)
    assert m.lm.get_decoder().config._attn_implementation == before      # the tap restores the LM's attention
    # learning: the loss alone pulls a head onto the named token (chance: 1/5, 1/3, 1/4)
    opt = torch.optim.Adam([p for n, p in m.named_parameters() if n.startswith(("lm.", "projector."))], lr=3e-3)
    first = float(l1.detach())
    for _ in range(40):
        _, loss = run_loss(m, kw, 1, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, last = run_loss(m, kw, 1, targets)
    last = float(last.detach())
    assert first > 0.9 and last < 0.2, (first, last)                     # share from ~0.3 to > 0.8


def _world_model(stage2_world, tmp_path):
    """-> (the world's train folder, a tiny random Setokim over its stage 1 whose words cover the questions)."""
    tr = stage2_world / "shapes" / "train"
    entries = json.loads((tr / "instruct.json").read_text())
    build_word_tokenizer(extra_texts=[t["value"] for e in entries for t in e["conversations"]]).save_pretrained(
        tmp_path / "tok")
    torch.manual_seed(0)
    m = Setokim.from_config(SetokimConfig(lm=dict(TINY_LM), text_tokenizer=str(tmp_path / "tok"),
                                          stage1=str(stage2_world / "stage1")))
    return tr, m


def test_stage_model_adds_the_term(stage2_world, tmp_path):
    from setok_cli.train.stage2 import Stage2Model
    tr, m = _world_model(stage2_world, tmp_path)
    ds = ConversationDataset(tr / "instruct.json", "chat", image_size=32)
    batch = MixtureDataset.collate([ds[i] for i in range(4)])
    plain = Stage2Model(m, row_groups=2)(batch)
    res = Stage2Model(m, row_groups=2, attend=0.5)(batch)
    assert "attend" not in plain and torch.isfinite(res["attend"]) and res["attend"] > 0
    assert torch.allclose(res["loss"], plain["loss"] + 0.5 * res["attend"], atol=1e-5)


def test_stage_model_weighs_each_sets_text(stage2_world, tmp_path):
    """A mixture row's `text_weight` weighs its rows' text cross-entropy in the loss; the logged
    losses stay the plain means."""
    from setok_cli.data.conversations import recipe_mixture
    from setok_cli.train.stage2 import Stage2Model
    tr, m = _world_model(stage2_world, tmp_path)
    ds = recipe_mixture([{"task": "caption", "path": str(tr / "pairs.json")},
                         {"task": "instruct", "path": str(tr / "instruct.json"), "text_weight": 3.0}], 32)
    n0 = len(ds.sets[0])
    batch = MixtureDataset.collate([ds[i] for i in (0, 1, n0, n0 + 1)])
    sm = Stage2Model(m)
    sm.sources = ds.names
    calls = []
    real = m.forward
    m.forward = lambda *a, **k: calls.append((k, real(*a, **k))) or calls[-1][1]
    try:
        plain = sm(batch)
        sm.text_weights = ds.text_weights
        res = sm(batch)
    finally:
        del m.forward
    assert "text_weight" not in calls[0][0] and calls[1][0]["text_weight"].tolist() == [1.0, 1.0, 3.0, 3.0]
    rows = calls[1][1].text_rows                                 # (4, 2): each row's summed loss, targets
    want = (2.0 * rows[2:, 0].sum() / rows[:, 1].sum()).item()   # the instruct rows count twice more
    assert (res["loss"] - plain["loss"]).item() == pytest.approx(want, rel=1e-4) and want > 0
    assert res["text"] == plain["text"] and res["text/instruct:instruct"] == plain["text/instruct:instruct"]
