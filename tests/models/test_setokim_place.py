"""The place head: where a written token's seed lies, drawn before the token (heads.PlaceHead)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from setok_cli.errors import UserError
from setok_cli.models.setokim import MSEHead, Setokim, SetokimConfig, build_word_tokenizer, prompt_batch
from setok_cli.models.setokim.heads import order_seeds
from setok_cli.models.setokim.place import NO_SEED, UNKNOWN_SEED, PlaceHead, place_features

TINY_LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2, max_position_embeddings=256)
TEXTS = ["A red circle and two blue squares.", "Generate an image: a red circle.", "Make the red circle blue."]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, write_tiny_stage1):
    root = tmp_path_factory.mktemp("place")
    write_tiny_stage1(root / "stage1" / "checkpoints" / "step_00000010")
    build_word_tokenizer(extra_texts=TEXTS).save_pretrained(root / "tok")
    return root


def make(folders, **kw) -> Setokim:
    return Setokim.from_config(SetokimConfig(lm=dict(TINY_LM), text_tokenizer=str(folders / "tok"),
                                             stage1=str(folders / "stage1"), **kw))


def _image():
    img = np.full((64, 64, 3), 30, np.uint8)
    img[4:24, 40:60] = (220, 30, 30)
    img[40:60, 4:24] = (30, 30, 220)
    return img


def test_classes_loss_and_condition_known_values():
    torch.manual_seed(0)
    head = PlaceHead(8, 5)
    seeds = torch.tensor([3, NO_SEED, UNKNOWN_SEED, 0])
    assert head.classes(seeds).tolist() == [3, 5, 6, 0]
    h = torch.randn(4, 8)
    want = F.cross_entropy(head.logits(h[[0, 1, 3]]), torch.tensor([3, 5, 0]))    # the unknown one has no loss
    assert head.loss(h, seeds).item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.allclose(head.condition(h, seeds), h + head.embed.weight[[3, 5, 6, 0]])
    assert head.loss(h[:0], seeds[:0]).item() == 0
    with pytest.raises(UserError, match="place_head has 5 cells"):
        head.classes(torch.tensor([5]))


def test_sample_draws_only_cells_after_the_previous_one():
    torch.manual_seed(0)
    head = PlaceHead(8, 6)
    with torch.no_grad():
        head.logits.weight.zero_()
        head.logits.bias.copy_(torch.tensor([5.0, 4, 3, 2, 1, 0, -1]))    # cell 0 most likely, "no seed" least
    h = torch.zeros(4, 8)
    after = torch.tensor([NO_SEED, 0, 4, 6])          # 6 = P: after a seedless token only seedless ones follow
    assert head.sample(h, after, temperature=0).tolist() == [0, 1, 5, NO_SEED]
    draws = head.sample(torch.zeros(2000, 8), torch.full((2000,), 2), temperature=1.0,
                        generator=torch.Generator().manual_seed(0))
    vals = set(draws.tolist())
    assert vals <= {3, 4, 5, NO_SEED} and len(vals) == 4
    p = torch.softmax(torch.tensor([2.0, 1, 0, -1]), 0)                  # cells 3, 4, 5, no seed
    assert (draws == 3).float().mean().item() == pytest.approx(p[0].item(), abs=0.04)


def test_place_then_token_draws_modes_where_mse_averages():
    """Targets +a at cell 2 and -a at cell 7, half each, under one condition: the MSE head alone
    learns their mean (neither); drawn place first, the token regressed at it is the mode of
    that place, and both places are drawn about half the time."""
    torch.manual_seed(0)
    a = torch.tensor([3.0, -2.0, 1.0, 2.5])
    cond = torch.randn(1, 16).expand(128, 16)
    targets = torch.cat([a.expand(64, 4), -a.expand(64, 4)])
    seeds = torch.tensor([2] * 64 + [7] * 64)
    alone, head, place = MSEHead(16, 4), MSEHead(16, 4), PlaceHead(16, 10)
    opt = torch.optim.AdamW([*alone.parameters(), *head.parameters(), *place.parameters()], lr=1e-2)
    for _ in range(400):
        loss = alone.loss(cond, targets) + head.loss(place.condition(cond, seeds), targets) + place.loss(cond, seeds)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert alone(cond[:1]).abs().max().item() < 0.2
    s = place.sample(cond[:1].expand(400, 16), torch.full((400,), NO_SEED), 1.0, torch.Generator().manual_seed(0))
    mode = (s == 2) | (s == 7)
    assert mode.float().mean().item() > 0.97 and 0.4 < (s[mode] == 2).float().mean().item() < 0.6
    x = head(place.condition(cond[:1].expand(400, 16), s)).detach()[mode]
    want = torch.where((s[mode] == 2).unsqueeze(1), a, -a)
    assert (x - want).abs().max().item() < 0.1


def test_image_token_sets_give_their_seeds_in_order(folders):
    m = make(folders)
    sets, seeds = m.image_token_sets([_image()], seeds=True)
    out = m.setok.tokenize([_image()])
    n = int(out.num_tokens[0])
    s = out.seeds[0, :n].tolist()
    order = sorted(range(n), key=lambda i: (s[i] < 0, s[i] if s[i] >= 0 else 0, i))
    assert torch.equal(sets[0], m.image_token_sets([_image()])[0])
    assert seeds[0].tolist() == [s[i] for i in order] and seeds[0].shape == (n,)
    assert order_seeds(torch.tensor([[True, True, False]]), torch.tensor([[4, -1, 2]])).tolist() == [[4, -1, 2]]


def _cells(m):
    return int(np.prod(m.setok.tokenize([_image()]).grid))


def test_forward_adds_the_place_loss_and_conditions_the_head(folders):
    torch.manual_seed(0)
    probe = make(folders)
    m = make(folders, place_head=_cells(probe))
    sets, seeds = m.image_token_sets([_image()], seeds=True)
    conv = [{"from": "human", "value": "Generate an image: a red circle."}, {"from": "gpt", "value": "<image>"}]
    kw = m.collate([{"conversations": conv, "images": sets, "seeds": seeds}])
    assert torch.equal(kw["image_token_seeds"][0, :len(seeds[0])], seeds[0])
    out = m(**kw)
    sp = m.splice(kw["input_ids"], kw["labels"], kw["attention_mask"], kw["image_token_mask"])
    h = m.hidden(m.embed(sp, kw["image_tokens"], kw["image_token_mask"]), sp.attention_mask,
                 sp.position_ids).last_hidden_state
    s = int((sp.ids[0] == m.img_start_id).nonzero()[0])
    K = len(seeds[0])
    hp = h[0, s:s + K]
    want_place = F.cross_entropy(m.place_head.logits(hp), m.place_head.classes(seeds[0]))
    target = m.normalize(sets[0])
    want_vis = ((m.visual_head(m.place_head.condition(hp, seeds[0])) - target) ** 2).mean()
    assert out.place_loss.item() == pytest.approx(want_place.item(), rel=1e-5)
    assert out.visual_loss.item() == pytest.approx(want_vis.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((out.text_loss + out.visual_loss + out.stop_loss
                                             + out.place_loss).item(), rel=1e-5)
    unknown = m(**m.collate([{"conversations": conv, "images": sets}]))      # seeds not given: no place loss
    assert unknown.place_loss.item() == 0 and unknown.visual_loss.item() != out.visual_loss.item()
    assert make(folders)(**kw).place_loss is None                           # no place head: as before


def test_generation_with_a_place_head_cache_save_load(folders, tmp_path):
    torch.manual_seed(3)
    m = make(folders, place_head=_cells(make(folders)), max_visual_tokens=4)
    with torch.no_grad():
        m.stop_head.bias.fill_(-5.0)
        m.lm.get_output_embeddings().weight[m.eos_id] = 0
    args = prompt_batch(m, ["Generate an image: a red circle.", "Generate an image: a red circle."], start_image=True)
    kw = dict(max_new_tokens=3, place_temperature=1.0)
    a = m.generate(*args, use_cache=True, generator=torch.Generator().manual_seed(5), **kw)
    b = m.generate(*args, use_cache=False, generator=torch.Generator().manual_seed(5), **kw)
    assert all(torch.allclose(i, j, atol=2e-5) for x, y in zip(a, b) for i, j in zip(x.images, y.images))
    assert len(a[0].images[0]) == 4
    drawn = []                                        # the cells drawn within one image only ever increase
    orig = m.place_head.sample
    m.place_head.sample = lambda *x, **k: drawn.append(orig(*x, **k)) or drawn[-1]
    m.generate(*prompt_batch(m, ["Generate an image: a red circle."], start_image=True), max_new_tokens=1,
               generator=torch.Generator().manual_seed(1))
    cells = [int(d[0]) for d in drawn][:4]       # a fifth draw comes with the stop (max_visual_tokens), unused
    seeded = [c for c in cells if c >= 0]
    assert len(cells) == 4 and seeded == sorted(set(seeded)) and cells == seeded + [NO_SEED] * (4 - len(seeded))
    m.place_head.sample = orig
    m.save_pretrained(tmp_path / "p")
    m2 = Setokim.from_pretrained(tmp_path / "p")
    assert m2.config.place_head == m.config.place_head
    assert torch.equal(m2.place_head.embed.weight, m.place_head.embed.weight)
    c = m2.generate(*args, generator=torch.Generator().manual_seed(5), **kw)
    assert all(torch.equal(i, j) for x, y in zip(a, c) for i, j in zip(x.images, y.images))
    with pytest.raises(UserError, match="place_head must be 0"):
        SetokimConfig(lm=dict(TINY_LM), place_head=-1)
    with pytest.raises(UserError, match="place_temperature must be >= 0"):
        m.generate(*args, place_temperature=-1)


def test_snap_keeps_to_the_drawn_cell():
    from setok_cli.models.setokim.bank import layout_cell, snap_placed
    assert layout_cell(torch.tensor([0, 17, 255, NO_SEED]), 256).tolist() == [0, 17, 255, -1]
    assert layout_cell(torch.tensor([9]), 64).tolist() == [2 * 16 + 2]           # (1, 1) of 8 x 8 -> (2, 2) of 16
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8]])              # A nearest to x, B farther
    lay = torch.zeros(2, 256, dtype=torch.bool)
    lay[0, :10] = True                                          # A covers cells 0-9, B covers 100-109
    lay[1, 100:110] = True
    x = torch.tensor([[1.0, 0.1], [1.0, 0.1], [1.0, 0.1], [1.0, 0.1]])
    used = torch.zeros(4, 256, dtype=torch.bool)
    out, _ = snap_placed(x, bank, lay, used, metric="l2", at=torch.tensor([105, -1, 3, 200]))
    assert out.tolist() == [bank[1].tolist(), bank[0].tolist(), bank[0].tolist(), bank[0].tolist()]
    same, _ = snap_placed(x, bank, lay, used, metric="l2")
    assert torch.equal(same, bank[[0, 0, 0, 0]])


def test_place_modes_draw_for_text_prompts_and_keep_edits_unplaced(folders):
    torch.manual_seed(4)
    m = make(folders, place_head=_cells(make(folders)), max_visual_tokens=2)
    assert m.place_head.embed.weight[-1].abs().sum() == 0          # "unknown": h itself until trained
    with torch.no_grad():
        m.stop_head.bias.fill_(-5.0)
    seen = []
    orig = m.place_head.condition
    m.place_head.condition = lambda h, s: seen.append(s.clone()) or orig(h, s)
    src = [torch.randn(2, 8)]
    args = prompt_batch(m, ["<image>\nMake the red circle blue.", "Generate an image: a red circle."],
                        images=[src, []], start_image=True)
    for mode, want_edit, want_gen in (("auto", False, True), ("draw", True, True), ("off", False, False)):
        seen.clear()
        m.generate(*args, max_new_tokens=1, place=mode, generator=torch.Generator().manual_seed(0))
        rows = torch.stack(seen[:2])                                  # (steps, rows): the two tokens of each image
        assert bool((rows[:, 0] != UNKNOWN_SEED).all()) == want_edit, mode
        assert bool((rows[:, 1] != UNKNOWN_SEED).all()) == want_gen, mode
        assert bool((rows[:, 0] == UNKNOWN_SEED).all()) != want_edit, mode
    with pytest.raises(UserError, match="place must be one of"):
        m.generate(*args, place="sometimes")


def test_place_input_adds_each_read_tokens_place(folders):
    torch.manual_seed(5)
    cells = _cells(make(folders))
    m = make(folders, place_head=cells, place_input=True)
    sets, seeds = m.image_token_sets([_image()], seeds=True)
    conv = [{"from": "human", "value": "<image>\nMake the red circle blue."}, {"from": "gpt", "value": "<image>"}]
    kw = m.collate([{"conversations": conv, "images": sets * 2, "seeds": seeds * 2}])
    sp = m.splice(kw["input_ids"], kw["labels"], kw["attention_mask"], kw["image_token_mask"])
    placed = m.embed(sp, kw["image_tokens"], kw["image_token_mask"], kw["image_token_seeds"])[0]
    plain = m.embed(sp, kw["image_tokens"], kw["image_token_mask"])[0]    # no seeds: the "unknown" place
    K = len(seeds[0])
    read = int((sp.ids[0] == m.img_start_id).nonzero()[0]) + 1               # the source's tokens
    fed = int((sp.ids[0] == m.img_start_id).nonzero()[1]) + 1                # the written ones fed back
    E = m.place_head.read(torch.arange(-1, cells))                      # no seed, then cells 0 .. P - 1
    unknown = m.place_head.read(torch.tensor([UNKNOWN_SEED]))
    want = E[seeds[0] + 1] - unknown
    assert torch.allclose(placed[read:read + K] - plain[read:read + K], want, atol=1e-5)
    assert torch.allclose(placed[fed:fed + K - 1] - plain[fed:fed + K - 1], want[:-1], atol=1e-5)
    vis = torch.zeros(placed.shape[0], dtype=torch.bool)
    vis[sp.vis_dst] = True
    assert torch.equal(placed[~vis], plain[~vis])                          # text positions: as before
    assert make(folders, place_head=cells).place_head.inputs is None
    with pytest.raises(UserError, match="place_input needs a place head"):
        SetokimConfig(lm=dict(TINY_LM), place_input=True)
    with pytest.raises(UserError, match="square patch grid"):
        PlaceHead(8, 12, inputs=True)


def test_place_features_known_values():
    f = place_features(16)                                               # a 4 x 4 grid, frequencies pi, 2pi, 4pi
    assert f.shape == (18, 4 * 3 + 2)
    y, x = 1, 2                                                          # cell 6
    a = torch.tensor([y / 4, x / 4]).unsqueeze(-1) * (torch.pi * torch.tensor([1.0, 2, 4]))
    assert torch.allclose(f[6, :-2], torch.cat([a.sin(), a.cos()], -1).reshape(-1), atol=1e-6)
    assert f[16].tolist() == [0.0] * 12 + [1.0, 0.0] and f[17].tolist() == [0.0] * 13 + [1.0]
    assert len({tuple(r) for r in f.tolist()}) == 18                     # every cell its own features


def test_place_input_generation_feeds_back_the_drawn_places(folders):
    """Generating with a model that reads places, then teacher-forcing its own output with the
    places it drew, gives the same tokens back (MSE 0): the loop feeds each written token at
    the place it was drawn at, as training does; with and without the KV cache alike."""
    torch.manual_seed(6)
    m = make(folders, place_head=_cells(make(folders)), place_input=True, max_visual_tokens=4)
    with torch.no_grad():
        m.stop_head.bias.fill_(-5.0)
    src_sets, src_seeds = m.image_token_sets([_image()], seeds=True)
    prompt = "<image>\nMake the red circle blue."
    args = prompt_batch(m, [prompt], [m.readable(src_sets, src_seeds)], start_image=True)
    assert torch.equal(args[4][0, :len(src_seeds[0])], src_seeds[0])
    a = m.generate(*args, max_new_tokens=1, place="draw", generator=torch.Generator().manual_seed(2))[0]
    b = m.generate(*args, max_new_tokens=1, place="draw", generator=torch.Generator().manual_seed(2),
                   use_cache=False)[0]
    assert torch.allclose(a.images[0], b.images[0], atol=2e-5) and torch.equal(a.seeds[0], b.seeds[0])
    assert a.images[0].shape[0] == 4 and a.seeds[0].shape == (4,) and bool((a.seeds[0] != UNKNOWN_SEED).all())
    conv = [{"from": "human", "value": prompt}, {"from": "gpt", "value": "<image>"}]
    kw = m.collate([{"conversations": conv, "images": src_sets + a.images, "seeds": src_seeds + a.seeds}])
    same = m(**kw).visual_loss.item()
    assert same < 1e-8
    other = m(**m.collate([{"conversations": conv, "images": src_sets + a.images,
                            "seeds": [torch.full_like(src_seeds[0], NO_SEED)] + a.seeds}]))
    assert other.visual_loss.item() > 1e-6 + 100 * same                   # the source's places are read
    assert m.readable(a.images, a.seeds)[0][1] is a.seeds[0]


def test_place_input_lets_the_lm_copy_a_read_tokens_place(folders):
    """One source token at a random cell, the target the same token: the place of the written
    token is the source's. Reading places, the place loss falls towards 0; without them the
    tokens (random, independent of their cells) carry no place and it stays near log(8)."""
    cells = _cells(make(folders))
    g = torch.Generator().manual_seed(0)
    conv = [{"from": "human", "value": "<image>\nMake the red circle blue."}, {"from": "gpt", "value": "<image>"}]

    def run(place_input):
        torch.manual_seed(0)
        m = make(folders, place_head=cells, place_input=place_input, place_loss_weight=1.0)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
        T = int(m.config.token_dim)
        for _ in range(120):
            toks = torch.randn(32, 1, T, generator=g)
            seeds = (torch.randint(0, 8, (32, 1), generator=g) * (cells // 8))
            kw = m.collate([{"conversations": conv, "images": [t, t], "seeds": [s, s]} for t, s in zip(toks, seeds)])
            out = m(**kw)
            opt.zero_grad()
            out.place_loss.backward()
            opt.step()
        return out.place_loss.item()
    a, b = run(True), run(False)
    assert a < 0.3 < 1.5 < b


def test_place_dropout_trains_the_unknown_place_and_keeps_the_place_loss(folders):
    from setok_cli.models.setokim.place import drop_places
    s = torch.arange(12).view(4, 3)
    assert drop_places(s, 0.0) is s and drop_places(None, 0.5) is None
    assert bool((drop_places(s, 1.0) == UNKNOWN_SEED).all())
    torch.manual_seed(0)
    d = drop_places(torch.arange(300).view(100, 3), 0.3)
    rows = (d == UNKNOWN_SEED).all(1)
    assert bool(((d == UNKNOWN_SEED).any(1) == rows).all()) and 15 < int(rows.sum()) < 45   # whole images
    torch.manual_seed(7)
    m = make(folders, place_head=_cells(make(folders)), place_dropout=1.0)
    sets, seeds = m.image_token_sets([_image()], seeds=True)
    conv = [{"from": "human", "value": "Generate an image: a red circle."}, {"from": "gpt", "value": "<image>"}]
    kw = m.collate([{"conversations": conv, "images": sets, "seeds": seeds}])
    unknown = m(**m.collate([{"conversations": conv, "images": sets}]))
    m.eval()
    placed = m(**kw)
    m.train()
    dropped = m(**kw)
    assert dropped.place_loss.item() == pytest.approx(placed.place_loss.item(), rel=1e-6)       # true seeds
    assert dropped.visual_loss.item() == pytest.approx(unknown.visual_loss.item(), rel=1e-6)    # at "unknown"
    assert dropped.visual_loss.item() != pytest.approx(placed.visual_loss.item(), rel=1e-3)
    with pytest.raises(UserError, match="place_dropout must be in"):
        SetokimConfig(lm=dict(TINY_LM), place_dropout=2)


def test_snap_source_writes_the_prompt_images_tokens_at_their_own_seeds(folders):
    """`generate(snap_source=True)` (a looking answer, `setok ask --snap`): every written token is
    the nearest token of the row's prompt image by direction, fed back and recorded at that
    token's own seed, whatever cell the place head drew; a prompt without images is refused."""
    from setok_cli.models.setokim.generate import _snap_source
    x = torch.tensor([[1.0, 0.1], [0.0, -2.0], [3.0, 3.0]])
    src = torch.tensor([[[2.0, 0.0], [0.0, 5.0]], [[0.0, 1.0], [0.1, -1.0]], [[1.0, 1.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True], [True, True], [False, False]])
    seeds = torch.tensor([[4, 9], [2, 7], [1, 1]])
    got, s = _snap_source(x, src, mask, seeds)
    assert torch.equal(got, torch.stack([src[0, 0], src[1, 1], x[2]])) and s.tolist() == [4, 7, UNKNOWN_SEED]
    torch.manual_seed(6)
    m = make(folders, place_head=_cells(make(folders)), place_input=True, max_visual_tokens=3)
    with torch.no_grad():
        m.stop_head.bias.fill_(-5.0)
    src_sets, src_seeds = m.image_token_sets([_image()], seeds=True)
    args = prompt_batch(m, ["<image>\nMake the red circle blue."], [m.readable(src_sets, src_seeds)], start_image=True)
    a = m.generate(*args, max_new_tokens=1, place="draw", snap_source=True,
                   generator=torch.Generator().manual_seed(2))[0]
    b = m.generate(*args, max_new_tokens=1, place="draw", generator=torch.Generator().manual_seed(2))[0]
    assert a.images[0].shape[0] == 3
    for tok, seed in zip(a.images[0], a.seeds[0]):
        j = int(((src_sets[0] - tok).abs().amax(1)).argmin())
        assert torch.allclose(tok, src_sets[0][j], atol=1e-4) and int(seed) == int(src_seeds[0][j])
    assert not torch.allclose(a.images[0], b.images[0])                   # unsnapped, the head's own tokens
    with pytest.raises(UserError, match="snap_source"):
        m.generate(*prompt_batch(m, ["Generate an image: a red circle."], start_image=True), snap_source=True)
