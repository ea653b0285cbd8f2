"""Token-bank snapping (models/setokim/bank.py): nearest() on known values; generation with a
bank writes only bank tokens or tokens of the prompt's images; save / load round trip and a
bank that does not fit the model's SeTok is one line."""
import pytest
import torch

from setok_cli.errors import UserError
from setok_cli.models.setokim import Setokim, SetokimConfig, build_word_tokenizer, prompt_batch
from setok_cli.models.setokim.bank import build_bank, load_bank, nearest, save_bank

TINY_LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2, max_position_embeddings=256)
EDIT = "Make the red circle blue."
GEN = "Generate an image: a red circle."

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, write_tiny_stage1):
    root = tmp_path_factory.mktemp("setokim_bank")
    write_tiny_stage1(root / "stage1" / "checkpoints" / "step_00000010")
    build_word_tokenizer(extra_texts=[EDIT, GEN]).save_pretrained(root / "tok")
    return root


def model(folders, K=3) -> Setokim:
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


def _members(rows: torch.Tensor, pool: torch.Tensor) -> bool:
    return bool((torch.cdist(rows.float(), pool.float()).min(1).values < 1e-4).all())


def test_generation_writes_only_bank_or_source_tokens(folders):
    m = model(folders)
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
    m = model(folders)
    imgs = [torch.randint(0, 255, (40, 40, 3), dtype=torch.uint8).numpy() for _ in range(3)]
    tokens = build_bank(m, imgs, batch_size=2)
    assert tokens.shape[0] == sum(t.shape[0] for t in m.image_token_sets(imgs)) and tokens.shape[1] == 8
    save_bank(tmp_path / "bank.safetensors", tokens, m)
    assert torch.equal(load_bank(tmp_path / "bank.safetensors", m), tokens)
    with pytest.raises(UserError, match="no such token bank"):
        load_bank(tmp_path / "nope.safetensors", m)
    (tmp_path / "junk.safetensors").write_bytes(b"not a bank")
    with pytest.raises(UserError, match="not a token bank"):
        load_bank(tmp_path / "junk.safetensors", m)
    with torch.no_grad():                                  # another SeTok: the bank no longer fits
        next(m.setok.parameters()).add_(0.5)
    with pytest.raises(UserError, match="another SeTok"):
        load_bank(tmp_path / "bank.safetensors", m)
