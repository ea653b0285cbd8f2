"""Snapping written tokens by direction and keeping written objects apart
(models/setokim/bank.py: `_dist`, `snap_placed`, `token_sets_with_layouts`): known values,
generation whose object tokens never overlap past `max_overlap`, and layouts that match
the tokens they describe."""
import pytest
import torch

from setok_cli.errors import UserError
from setok_cli.models.setokim import Setokim, SetokimConfig, build_word_tokenizer, prompt_batch
from setok_cli.models.setokim.bank import (LAYOUT_GRID, _dist, layout_centres, near_centre, nearest, same_region,
                                           snap_placed, token_sets_with_layouts)

TINY_LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2, max_position_embeddings=256)
GEN = "Generate an image: a red circle."
P = LAYOUT_GRID ** 2

pytestmark = pytest.mark.usefixtures("one_thread")


def lay(*patches) -> torch.Tensor:
    out = torch.zeros(P, dtype=torch.bool)
    out[list(patches)] = True
    return out


def test_cos_snaps_by_direction():
    bank = torch.tensor([[0.2, 0.0], [3.0, 3.0]])
    x = torch.tensor([[0.1, 0.1]])                      # a short token, as regression to the mean writes
    assert torch.equal(nearest(x, bank, metric="l2"), bank[[0]])
    assert torch.equal(nearest(x, bank, metric="cos"), bank[[1]])
    d = _dist(x, bank, "cos")                            # L2 of unit vectors: sqrt(2 - 2 cos)
    assert torch.allclose(d, torch.tensor([[(2 - 2 ** 0.5) ** 0.5, 0.0]]), atol=1e-6)
    with pytest.raises(UserError, match="metric"):
        _dist(x, bank, "dot")


def test_snap_placed_known_values():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [1.0, 0.01]])
    background = lay(*range(200))                                        # > half the grid: background
    layouts = torch.stack([lay(0, 1, 2, 3), lay(2, 3, 4, 5), lay(10, 11), background])
    x = torch.tensor([[1.0, 0.0]] * 4)
    used = torch.stack([torch.zeros(P, dtype=torch.bool), lay(0, 1, 2, 3), lay(0, 1, 2, 3, 4, 5, 10, 11),
                        lay(0)])
    bank3 = bank[:3]
    out, placed = snap_placed(x, bank3, layouts[:3], used)
    # row 0: nothing placed; 1: token 0 taken, token 1 overlaps 2/4 > 0.25, so token 2;
    # 2: everything taken: the nearest of all; 3: token 0 overlaps 1/4, not more than 0.25: free
    assert torch.equal(out, bank3[[0, 2, 0, 0]])
    assert torch.equal(placed[0], layouts[0]) and torch.equal(placed[1], layouts[2])
    out0, _ = snap_placed(x, bank3, layouts[:3], used, max_overlap=0.0)
    assert torch.equal(out0[3], bank3[1])                               # 1/4 on placed objects is too much now
    out1, _ = snap_placed(x, bank3, layouts[:3], used, max_overlap=1.0)
    assert torch.equal(out1, bank3[[0, 0, 0, 0]])                       # 1: nothing is ever taken: plain nearest
    # background tokens are never taken and never recorded
    outb, placedb = snap_placed(x[1:2], bank, layouts, used[1:2] | background)
    assert torch.equal(outb[0], bank[3]) and not placedb.any()


def test_regions_centres_and_allowed_candidates():
    G = LAYOUT_GRID
    layouts = torch.stack([lay(0, 1, G, G + 1), lay(G * G - 1), lay(0, 1), lay(*range(200))])
    assert torch.allclose(layout_centres(layouts)[:3], torch.tensor([[1 / G, 1 / G], [1 - 0.5 / G, 1 - 0.5 / G],
                                                                      [1 / G, 0.5 / G]]))
    near = near_centre(layouts, torch.tensor([[0.0, 0.0], [1.0, 1.0]]), radius=0.1)
    assert near.tolist() == [[True, False, True, False], [False, True, False, False]]     # never the background
    assert same_region(layouts, lay(0, 1, G, G + 1)[None], 0.5).tolist() == [[True, False, True, False]]
    assert same_region(layouts, lay(0, 1, G, G + 1)[None], 0.6).tolist() == [[True, False, False, False]]
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    allowed = torch.tensor([[False, True, True], [False, False, False]])   # row 1 allows none: all of them
    out, _ = snap_placed(x, bank, layouts[:3], torch.zeros(2, G * G, dtype=torch.bool), allowed=allowed)
    assert torch.equal(out, bank[[2, 0]])


def test_snap_placed_source_tokens():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    layouts = torch.stack([lay(40), lay(50)])
    x = torch.tensor([[1.0, 0.05], [1.0, 0.05]])
    src = [torch.tensor([[1.0, 0.1], [0.0, 1.0]]), torch.tensor([[1.0, 0.1], [0.0, 1.0]])]
    src_lay = [torch.stack([lay(0, 1), lay(5)]), torch.stack([lay(0, 1), lay(5)])]
    used = torch.stack([torch.zeros(P, dtype=torch.bool), lay(0)])
    out, placed = snap_placed(x, bank, layouts, used, src, src_lay, source_margin=10.0, max_overlap=0.25)
    assert torch.equal(out[0], src[0][0]) and torch.equal(placed[0], lay(0, 1))   # the source's token, recorded
    # row 1: the source token already lies on a placed object (its copy): the bank's token instead
    assert torch.equal(out[1], bank[0]) and torch.equal(placed[1], lay(40))


@pytest.fixture(scope="module")
def folders(tmp_path_factory, write_tiny_stage1):
    root = tmp_path_factory.mktemp("setokim_snap")
    write_tiny_stage1(root / "stage1" / "checkpoints" / "step_00000010")
    build_word_tokenizer(extra_texts=[GEN]).save_pretrained(root / "tok")
    return root


def banked(folders, K=6) -> Setokim:
    torch.manual_seed(0)
    m = Setokim.from_config(SetokimConfig(lm=dict(TINY_LM), text_tokenizer=str(folders / "tok"),
                                          stage1=str(folders / "stage1"), max_visual_tokens=K))
    with torch.no_grad():
        m.stop_head.bias.fill_(-5.0)                       # write all K tokens
    return m.eval()


def test_generation_keeps_objects_apart(folders):
    m = banked(folders)
    g = torch.Generator().manual_seed(0)
    M = 60
    bank = torch.randn(M, 8, generator=g) * 3
    # 60 objects at 12 places (5 per place, 16 patches each)
    layouts = torch.stack([lay(*range(16 * (i % 12), 16 * (i % 12) + 16)) for i in range(M)])
    args = prompt_batch(m, [GEN, GEN], start_image=True)
    plain = m.generate(*args, max_new_tokens=3, bank=bank)
    apart = m.generate(*args, max_new_tokens=3, bank=bank, bank_layouts=layouts, max_overlap=0.25)
    idx = lambda t: torch.cdist(t.float(), bank.float()).argmin(1)       # noqa: E731 (which bank token)
    places = [(idx(o.images[0]) % 12).tolist() for o in apart]
    assert all(len(set(p)) == len(p) == 6 for p in places)               # six tokens, six places
    assert places[0] == places[1]                                        # each row keeps its own record
    assert any(len(set((idx(o.images[0]) % 12).tolist())) < 6 for o in plain)   # (without layouts they collide)
    with pytest.raises(UserError, match="bank_layouts"):
        m.generate(*args, max_new_tokens=3, bank_layouts=layouts)
    with pytest.raises(UserError, match="max_overlap"):
        m.generate(*args, max_new_tokens=3, bank=bank, bank_layouts=layouts, max_overlap=1.5)
    with pytest.raises(UserError, match="snap_metric"):
        m.generate(*args, max_new_tokens=3, bank=bank, snap_metric="dot")


def test_layouts_match_the_tokens(folders):
    m = banked(folders)
    imgs = [torch.randint(0, 255, (40, 56, 3), dtype=torch.uint8).numpy() for _ in range(3)]
    sets, layouts = token_sets_with_layouts(m, imgs)
    for t, ref, lay_ in zip(sets, m.image_token_sets(imgs), layouts):
        assert torch.equal(t, ref)                                       # same tokens, same order
        assert lay_.shape == (t.shape[0], P) and lay_.dtype == torch.bool
        assert lay_.any(1).all()                                         # every token covers some patches
    # the layouts follow the tokenizer's own masks, reordered as the tokens are
    out = m.setok.tokenize(imgs[:1])
    gh, gw = out.image_grids[0]
    masks = out.masks[0, :, :gh, :gw].flatten(1).sum(1)[out.token_mask[0]]
    order = out.seeds[0][out.token_mask[0]].argsort(stable=True) if m.config.token_order != "given" else None
    if order is not None:
        masks = masks[order]
    scale = P / (gh * gw)
    assert torch.allclose(layouts[0].sum(1).float(), masks.float() * scale, rtol=0.35, atol=2)


def test_keep_source_pixels_pastes_only_copied_objects():
    import numpy as np

    from setok_cli.tasks.setokim import keep_source_pixels
    G, S = LAYOUT_GRID, 2 * LAYOUT_GRID                  # 2 x 2 pixels per layout cell
    source = np.full((S, S, 3), 10, np.uint8)
    edited = np.full((S, S, 3), 200, np.uint8)
    tokens = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    layouts = torch.stack([lay(0), lay(G + 5), lay(*range(1, 200))])   # two objects and the background
    written = torch.tensor([[1.0, 1e-5, 0.0],             # object 0 copied (up to rounding)
                            [0.0, 1.8, 0.0],              # object 1 rewritten: not a copy
                            [0.0, 0.0, 3.0]])             # the background copied
    out = keep_source_pixels(source, edited, tokens, layouts, written, grow=0)
    pasted = np.zeros((S, S), bool)
    pasted[0:2, 0:2] = True                               # cell 0 only: object 1 was not copied, the
    assert np.array_equal(out[..., 0] == 10, pasted)      # background never comes from the source
    out = keep_source_pixels(source, edited, tokens, layouts, written)        # grown by a cell: cells 0, 1, G, G + 1
    pasted[0:4, 0:4] = True
    assert np.array_equal(out[..., 0] == 10, pasted)
    # cells to exclude are never pasted, grown or not (an edit diff's dropped and new objects)
    out = keep_source_pixels(source, edited, tokens, layouts, written, exclude=lay(1, G))
    pasted[0:2, 2:4] = pasted[2:4, 0:2] = False
    assert np.array_equal(out[..., 0] == 10, pasted)
    assert np.array_equal(keep_source_pixels(source, edited, tokens, layouts, written[1:]), edited)
    with pytest.raises(ValueError, match="layouts"):
        keep_source_pixels(source, edited, tokens, layouts[:2], written)
