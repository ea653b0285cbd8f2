"""The two ways Setokim writes real tokens. The copy head (a pointer from the tokens being
written to the tokens read): an oracle pointer reproduces the source exactly in the loss and
in generation, rows without a source get nothing, it survives save / load, and bad widths are
one line. The token bank (models/setokim/bank.py): nearest() on known values; generation with
a bank writes only bank tokens or tokens of the prompt's images; save / load, and a bank that
does not fit the model's SeTok is one line."""
import pytest
import torch

from setok_cli.errors import UserError
from setok_cli.models.setokim import (Setokim, SetokimConfig, build_word_tokenizer, collate_conversations,
                                      pack_token_sets, prompt_batch, render_conversation)
from setok_cli.models.setokim.bank import build_bank, load_bank, load_bank_layouts, nearest, save_bank

TINY_LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2, max_position_embeddings=256)
EDIT = "Make the red circle blue."
GEN = "Generate an image: a red circle."

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, write_tiny_stage1):
    root = tmp_path_factory.mktemp("setokim_copy")
    write_tiny_stage1(root / "stage1" / "checkpoints" / "step_00000010")
    build_word_tokenizer(extra_texts=[EDIT, GEN]).save_pretrained(root / "tok")
    return root


def oracle(folders, K=4) -> Setokim:
    """A copy head that copies the i-th read token into the i-th written one (rank
    embeddings 10 * one-hot, content terms 0, gate ~1) over a visual head that predicts 0."""
    torch.manual_seed(0)
    m = Setokim.from_config(SetokimConfig(lm=dict(TINY_LM), text_tokenizer=str(folders / "tok"),
                                          stage1=str(folders / "stage1"), copy_head=8, max_visual_tokens=K))
    with torch.no_grad():
        last = m.visual_head.net[2]
        last.weight.zero_(), last.bias.zero_()
        c = m.copy_head
        for lin in (c.q, c.k):
            lin.weight.zero_(), lin.bias.zero_()
        c.out_rank.weight.copy_(10 * torch.eye(K, 8))
        c.src_rank.weight.copy_(10 * torch.eye(K, 8))
        c.gate.weight.zero_(), c.gate.bias.fill_(30.0)
    return m


def edit_and_generate_batch(m, src, tgt_edit, tgt_gen):
    convs = [[{"from": "human", "value": "<image>\n" + EDIT}, {"from": "gpt", "value": "<image>"}],
             [{"from": "human", "value": GEN}, {"from": "gpt", "value": "<image>"}]]
    ids, labels, attn = collate_conversations([render_conversation(c, m.text_tokenizer) for c in convs], m.pad_id)
    tokens, mask = pack_token_sets([src, tgt_edit, tgt_gen])
    return ids, labels, attn, tokens, mask


def test_oracle_pointer_copies_the_source_in_the_loss(folders, tmp_path):
    m = oracle(folders)
    g = torch.Generator().manual_seed(1)
    src, tgt, gen = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g), torch.randn(2, 8, generator=g)
    # the edit's target is its source: only the generation row (no source: copy 0, head 0) is left
    out = m(*edit_and_generate_batch(m, src, src.clone(), gen))
    assert out.num_visual == 5
    assert out.visual_loss.item() == pytest.approx((gen ** 2).sum().item() / (5 * 8), rel=1e-5)
    # another target: the loss is what copying the source leaves
    out = m(*edit_and_generate_batch(m, src, tgt, gen))
    want = (((src - tgt) ** 2).sum() + (gen ** 2).sum()) / (5 * 8)
    assert out.visual_loss.item() == pytest.approx(want.item(), rel=1e-5)
    out.loss.backward()                                      # the pointer trains
    assert m.copy_head.k.weight.grad is not None and m.copy_head.k.weight.grad.abs().sum() > 0
    # the head's own loss beside the mixed one: + w * MSE(head, target), the head predicting 0
    m.config.copy_head_own_loss = 0.5
    out_own = m(*edit_and_generate_batch(m, src, tgt, gen))
    own = ((tgt ** 2).sum() + (gen ** 2).sum()) / (5 * 8)
    assert out_own.visual_loss.item() == pytest.approx((want + 0.5 * own).item(), rel=1e-5)
    m.config.copy_head_own_loss = 0.0
    # a half-open gate: the token is the mean of the copied one and the head's (0 here)
    with torch.no_grad():
        m.copy_head.gate.bias.fill_(0.0)
    out = m(*edit_and_generate_batch(m, src, tgt, gen))
    want = (((src / 2 - tgt) ** 2).sum() + (gen ** 2).sum()) / (5 * 8)
    assert out.visual_loss.item() == pytest.approx(want.item(), rel=1e-5)
    # without the pointer the same head predicts 0 everywhere
    m.copy_head = None
    out = m(*edit_and_generate_batch(m, src, tgt, gen))
    assert out.visual_loss.item() == pytest.approx(((tgt ** 2).sum() + (gen ** 2).sum()).item() / 40, rel=1e-5)


def test_oracle_pointer_copies_the_source_when_generating(folders):
    m = oracle(folders, K=3)
    with torch.no_grad():
        m.stop_head.weight.zero_(), m.stop_head.bias.fill_(-5.0)      # write the full 3 tokens
    g = torch.Generator().manual_seed(2)
    src = torch.randn(3, 8, generator=g)
    args = prompt_batch(m, ["<image>\n" + EDIT, GEN], images=[[src], []], start_image=True)
    a = m.generate(*args, max_new_tokens=2, use_cache=True)
    soft = m.generate(*args, max_new_tokens=2, copy="soft")
    assert torch.allclose(soft[0].images[0], src, atol=1e-4)              # the oracle pointer is one-hot anyway
    with pytest.raises(UserError, match="copy must be"):
        m.generate(*args, copy="exact")
    b = m.generate(*args, max_new_tokens=2, use_cache=False)
    assert torch.allclose(a[0].images[0], src, atol=1e-5)             # the i-th token copied from the i-th
    assert torch.allclose(a[1].images[0], torch.zeros(3, 8), atol=1e-6)   # nothing to copy from text
    for x, y in zip(a, b):
        assert torch.allclose(x.images[0], y.images[0], atol=1e-5)


def test_copy_head_saved_and_loaded(folders, tmp_path):
    m = oracle(folders)
    with torch.no_grad():
        m.copy_head.q.weight.normal_()
    m.save_pretrained(tmp_path / "run")
    m2 = Setokim.from_pretrained(tmp_path / "run")
    assert m2.config.copy_head == 8 and m2.copy_head is not None
    g = torch.Generator().manual_seed(3)
    batch = edit_and_generate_batch(m, *(torch.randn(k, 8, generator=g) for k in (3, 3, 2)))
    m.eval(), m2.eval()
    assert m(*batch).loss.item() == pytest.approx(m2(*batch).loss.item(), rel=1e-6)


@pytest.mark.parametrize("bad", [-1, True, 2.5, "64"])
def test_bad_copy_head_width_is_one_line(bad):
    with pytest.raises(UserError, match="copy_head must be 0"):
        SetokimConfig(lm=dict(TINY_LM), copy_head=bad)
    with pytest.raises(UserError, match="copy_head_own_loss must be"):
        SetokimConfig(lm=dict(TINY_LM), copy_head=8, copy_head_own_loss=-1)
    with pytest.raises(UserError, match="copy_head works with visual_head: mse"):
        SetokimConfig(lm=dict(TINY_LM), copy_head=8, visual_head="diffusion")


def test_copy_head_known_values_soft_and_hard():
    from setok_cli.models.setokim import CopyHead
    c = CopyHead(hidden=2, token_dim=3, max_tokens=3, width=2)
    with torch.no_grad():
        for lin in (c.q, c.k):
            lin.weight.zero_(), lin.bias.zero_()
        c.out_rank.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        c.src_rank.weight.copy_(torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0]]))
        c.gate.weight.zero_(), c.gate.bias.fill_(0.5)
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    h, rank, src_rank = torch.zeros(2, 2), torch.tensor([0, 1]), torch.tensor([0, 1, 2])
    allowed = torch.tensor([[True, True, True], [True, True, False]])
    s = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, -1e9]]) / 2 ** 0.5       # q . k / sqrt(width)
    g = torch.sigmoid(torch.tensor(0.5))
    soft, gate = c(h, rank, x, src_rank, allowed)
    assert torch.allclose(soft, torch.softmax(s, -1) @ x, atol=1e-6) and torch.allclose(gate, g.expand(2, 1))
    hard, _ = c(h, rank, x, src_rank, allowed, hard=True)
    assert torch.allclose(hard, torch.stack([x[0], x[0]]), atol=1e-6)   # argmax; a tie takes the first
    _, none = c(h, rank, x, src_rank, torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(none, torch.zeros(2, 1))                          # nothing to copy: the gate is shut


# ---- the token bank ----------------------------------------------------------------------

def banked(folders, K=3) -> Setokim:
    torch.manual_seed(0)
    m = Setokim.from_config(SetokimConfig(lm=dict(TINY_LM), text_tokenizer=str(folders / "tok"),
                                          stage1=str(folders / "stage1"), max_visual_tokens=K))
    with torch.no_grad():
        m.stop_head.bias.fill_(-5.0)                       # write all K tokens
        m.token_mean.normal_(0, 1.0)                       # a non-trivial standardisation
        m.token_std.uniform_(0.5, 2.0)
    return m.eval()


def test_nearest_known_values():
    bank = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.tensor([[9.0, 1.0], [1.0, 8.0], [4.0, 4.0]])
    assert torch.equal(nearest(x, bank), bank[[1, 2, 0]])
    extra = [torch.tensor([[9.0, 1.5]]), torch.zeros(0, 2), torch.tensor([[20.0, 20.0]])]
    out = nearest(x, bank, extra)                          # row 0: the extra token is closer; row 2: the bank's
    assert torch.equal(out, torch.stack([extra[0][0], bank[2], bank[0]]))
    # the margin: row 2's extra token is 22.6 away, the bank's 5.66; it wins from a margin of 4 on
    assert torch.equal(nearest(x, bank, extra, source_margin=3.9)[2], bank[0])
    assert torch.equal(nearest(x, bank, extra, source_margin=4.1)[2], extra[2][0])


def _members(rows: torch.Tensor, pool: torch.Tensor) -> bool:
    return bool((torch.cdist(rows.float(), pool.float()).min(1).values < 1e-4).all())


def test_generation_writes_only_bank_or_source_tokens(folders):
    m = banked(folders)
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(7, 8, generator=g) * 3
    src = torch.randn(4, 8, generator=g) * 3
    args = prompt_batch(m, [f"<image>\n{EDIT}", GEN], [[src], []], start_image=True)
    plain = m.generate(*args, max_new_tokens=3)
    snapped = m.generate(*args, max_new_tokens=3, bank=bank)
    assert [o.images[0].shape[0] for o in snapped] == [3, 3]
    assert not _members(plain[0].images[0], torch.cat([bank, src]))     # without a bank: regressed tokens
    assert _members(snapped[0].images[0], torch.cat([bank, src]))       # the edit: bank or its source image
    assert _members(snapped[1].images[0], bank)                         # generation from text: the bank only
    # the bank reaches the tokens fed back: a one-token bank and no source gives that token throughout
    one = m.generate(*prompt_batch(m, [GEN], start_image=True), max_new_tokens=3, bank=bank[:1])
    assert torch.allclose(one[0].images[0], bank[:1].expand(3, -1), atol=1e-5)
    with pytest.raises(UserError, match="token bank"):
        m.generate(*args, bank=torch.zeros(3, 5))


def test_save_load_and_mismatch(folders, tmp_path):
    m = banked(folders)
    imgs = [torch.randint(0, 255, (40, 40, 3), dtype=torch.uint8).numpy() for _ in range(3)]
    tokens, layouts = build_bank(m, imgs, batch_size=2)
    assert tokens.shape[0] == sum(t.shape[0] for t in m.image_token_sets(imgs)) and tokens.shape[1] == 8
    assert layouts.shape == (tokens.shape[0], 256) and layouts.dtype == torch.bool
    save_bank(tmp_path / "bank.safetensors", tokens, m, layouts)
    assert torch.equal(load_bank(tmp_path / "bank.safetensors", m), tokens)
    assert torch.equal(load_bank_layouts(tmp_path / "bank.safetensors"), layouts)
    save_bank(tmp_path / "old.safetensors", tokens, m)                 # a bank without layouts still loads
    assert torch.equal(load_bank(tmp_path / "old.safetensors", m), tokens)
    assert load_bank_layouts(tmp_path / "old.safetensors") is None
    with pytest.raises(UserError, match="layouts"):
        save_bank(tmp_path / "bad.safetensors", tokens, m, layouts[:, :10])
    with pytest.raises(UserError, match="no such token bank"):
        load_bank(tmp_path / "nope.safetensors", m)
    (tmp_path / "junk.safetensors").write_bytes(b"not a bank")
    with pytest.raises(UserError, match="not a token bank"):
        load_bank(tmp_path / "junk.safetensors", m)
    with torch.no_grad():                                  # another SeTok: the bank no longer fits
        next(m.setok.parameters()).add_(0.5)
    with pytest.raises(UserError, match="another SeTok"):
        load_bank(tmp_path / "bank.safetensors", m)
