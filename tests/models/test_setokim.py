"""Setokim: splice, losses, heads, text, save/load, generation, meta sizing, bad inputs, learning."""
import json
import math

import numpy as np
import pytest
import torch

from setok_cli.errors import UserError
from setok_cli.models.setokim import (IGNORE_INDEX, IMAGE_TOKEN_INDEX, CodebookHead, CodebookHeadConfig,
                                      DiffusionHead, DiffusionHeadConfig, MSEHead,
                                      Setokim, SetokimConfig, build_word_tokenizer, collate_conversations,
                                      decode_images, order_tokens, pack_token_sets, parameter_table, prompt_batch,
                                      render_conversation, sample_logits, splice, UNCOND_GENERATE)

P = IMAGE_TOKEN_INDEX
TINY_LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2, max_position_embeddings=256)
TEXTS = ["A red circle and two blue squares.", "There are three objects in the image: a green star.",
         "Make the red circle blue.", "Describe the image briefly.", "Generate an image: a red circle."]


pytestmark = pytest.mark.usefixtures("one_thread")     # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def folders(tmp_path_factory, write_tiny_stage1):
    """A tiny stage-1 checkpoint (SeTok with 8-wide tokens + a tiny detokenizer) and a word tokenizer."""
    root = tmp_path_factory.mktemp("setokim")
    write_tiny_stage1(root / "stage1" / "checkpoints" / "step_00000010")   # a run folder: its latest checkpoint
    build_word_tokenizer(extra_texts=TEXTS).save_pretrained(root / "tok")
    return root


def make(folders, **kw) -> Setokim:
    cfg = SetokimConfig(lm=dict(TINY_LM), text_tokenizer=str(folders / "tok"), stage1=str(folders / "stage1"),
                        **kw)
    return Setokim.from_config(cfg)


def convs():
    return [[{"from": "human", "value": "<image>\nDescribe the image briefly."},
             {"from": "gpt", "value": "A red circle."}],
            [{"from": "human", "value": "Generate an image: a red circle."}, {"from": "gpt", "value": "<image>"}]]


def batch(model, seed=0, ks=(3, 2)):
    g = torch.Generator().manual_seed(seed)
    sets = [torch.randn(k, 8, generator=g) for k in ks]
    ids, labels, attn = collate_conversations([render_conversation(c, model.text_tokenizer) for c in convs()],
                                              model.pad_id)
    tokens, mask = pack_token_sets(sets)
    return ids, labels, attn, tokens, mask


# ---- splice -------------------------------------------------------------------------

def _two_rows():
    # row 0 reads an image of K=2; row 1 reads one of K=3 and writes one of K=1; row 1 is 4 long
    ids = torch.tensor([[1, 5, P, 6, 7], [1, P, 8, P, 0]])
    labels = torch.tensor([[-100, -100, -100, 6, 7], [-100, -100, 8, P, -100]])
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    tmask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]]).bool()
    return ids, labels, attn, tmask


def test_splice_positions_masks_labels():
    ids, labels, attn, tmask = _two_rows()
    sp = splice(ids, labels, attn, tmask, img_start_id=50, img_end_id=51, pad_id=0)
    S, E, V = 50, 51, -1
    assert sp.ids.tolist() == [[1, 5, S, V, V, E, 6, 7, 0, 0], [1, S, V, V, V, E, 8, S, V, E]]
    assert sp.labels.tolist() == [[-100] * 6 + [6, 7, -100, -100],
                                  [-100] * 6 + [8, S, -100, -100]]     # [Img] of the written image is a target
    assert sp.attention_mask.tolist() == [[1] * 8 + [0, 0], [1] * 10]
    assert sp.position_ids[1].tolist() == list(range(10))
    assert sp.vis_dst.tolist() == [3, 4, 12, 13, 14, 18] and sp.vis_src.tolist() == list(range(6))
    assert sp.pred_pos.tolist() == [17] and sp.pred_src.tolist() == [5]   # [Img] at 17 predicts v_1 (packed row 5)
    assert sp.stop_pos.tolist() == [17, 18] and sp.stop_target.tolist() == [0.0, 1.0]
    assert sp.image_start.tolist() == [2, 11, 17]


def test_splice_left_padding_and_cut():
    ids, labels, attn, tmask = _two_rows()
    sp = splice(ids, labels, attn, tmask, img_start_id=50, img_end_id=51, pad_id=0, padding_side="left")
    assert sp.ids[0].tolist() == [0, 0, 1, 5, 50, -1, -1, 51, 6, 7]
    assert sp.attention_mask[0].tolist() == [0, 0] + [1] * 8
    assert sp.position_ids[0, 2:].tolist() == list(range(8))
    assert sp.vis_dst[:2].tolist() == [5, 6]
    cut = splice(ids, labels, attn, tmask, img_start_id=50, img_end_id=51, pad_id=0, max_length=8)
    assert cut.ids[1].tolist() == [1, 50, -1, -1, -1, 51, 8, 50]
    assert cut.pred_pos.numel() == 0 and cut.stop_pos.numel() == 0     # the written image fell off the end
    with pytest.raises(ValueError, match="1 <image> placeholders in input_ids but 3 images"):
        splice(ids[:1], labels[:1], attn[:1], tmask, img_start_id=50, img_end_id=51, pad_id=0)


def test_image_token_sets_in_seed_order(folders):
    m = make(folders)
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, :] = (30, 30, 30)
    img[4:24, 40:60] = (220, 30, 30)            # top right, seeded before ...
    img[40:60, 4:24] = (30, 30, 220)            # ... bottom left in raster order
    sets = m.image_token_sets([img])
    out = m.setok.tokenize([img])
    n = int(out.num_tokens[0])
    seeds = out.seeds[0, :n].tolist()
    order = sorted(range(n), key=lambda i: (seeds[i] < 0, seeds[i] if seeds[i] >= 0 else 0, i))
    assert n >= 2 and len(sets) == 1 and torch.equal(sets[0], out.tokens[0, order])


def test_order_tokens_raster_then_remainder():
    tokens = torch.arange(4.0).view(1, 4, 1)
    seeds = torch.tensor([[5, -1, 2, 9]])
    mask = torch.tensor([[True, True, True, False]])
    t, m = order_tokens(tokens, mask, seeds)
    assert t.view(-1).tolist() == [2.0, 0.0, 1.0, 3.0] and m.tolist() == [[True, True, True, False]]


# ---- heads ---------------------------------------------------------------------------

def test_mse_head_known_value():
    head = MSEHead(2, 2, 2)
    with torch.no_grad():
        for lin in (head.net[0], head.net[2]):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
    gelu = [x * 0.5 * (1 + math.erf(x / math.sqrt(2))) for x in (1.0, 2.0)]
    want = ((gelu[0] - 0.5) ** 2 + (gelu[1] + 1.0) ** 2) / 2
    got = head.loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]]))
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert head.loss(torch.zeros(0, 2), torch.zeros(0, 2)).item() == 0.0


def _cosine_alphas_cumprod(T):
    f = [math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
    betas = [min(1 - f[i + 1] / f[i], 0.999) for i in range(T)]
    return np.cumprod([1 - b for b in betas])


def test_diffusion_loss_known_schedule():
    torch.manual_seed(0)
    cfg = dict(width=16, depth=2, batch_mul=2, num_train_timesteps=100)
    head = DiffusionHead(6, 4, DiffusionHeadConfig(prediction_type="epsilon", **cfg))
    h, x0 = torch.randn(3, 6), torch.randn(3, 4)
    noise, t = torch.randn(6, 4), torch.tensor([0, 10, 50, 99, 3, 70])
    # untrained: the zero-initialised output layer predicts 0, so the loss is E[target^2]
    assert head.loss(h, x0, noise=noise, timesteps=t).item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)
    ac = torch.tensor(_cosine_alphas_cumprod(100), dtype=torch.float32)[t].view(-1, 1)
    v = ac.sqrt() * noise - (1 - ac).sqrt() * x0.repeat_interleave(2, 0)      # v = sqrt(abar) eps - sqrt(1-abar) x0
    vhead = DiffusionHead(6, 4, DiffusionHeadConfig(**cfg))                   # the default: v_prediction
    assert vhead.loss(h, x0, noise=noise, timesteps=t).item() == pytest.approx(v.pow(2).mean().item(), rel=1e-5)
    seen = {}
    real = head.denoise

    def spy(x_t, tt, hh):
        seen["x_t"] = x_t
        return real(x_t, tt, hh)

    head.denoise = spy
    head.loss(h, x0, noise=torch.zeros(6, 4), timesteps=t)              # zero noise: x_t = sqrt(abar_t) x0
    assert torch.allclose(seen["x_t"], ac.sqrt() * x0.repeat_interleave(2, 0), atol=1e-6)
    head.loss(h, x0, noise=noise, timesteps=t)
    want = ac.sqrt() * x0.repeat_interleave(2, 0) + (1 - ac).sqrt() * noise
    assert torch.allclose(seen["x_t"], want, atol=1e-5)

    # an oracle denoiser that knows x0: zero loss, and few-step DDIM lands on x0
    abar = head.train_scheduler.alphas_cumprod

    def oracle(x_t, tt, hh):
        a = abar[tt].view(-1, 1)
        return (x_t - a.sqrt() * target) / (1 - a).sqrt()

    head.denoise = oracle
    target = x0.repeat_interleave(2, 0)
    assert head.loss(h, x0, noise=noise, timesteps=t).item() < 1e-9
    target = x0
    assert torch.allclose(head.sample(h, steps=3, generator=torch.Generator().manual_seed(1)), x0, atol=1e-4)


@pytest.mark.parametrize("pred", ["v_prediction", "epsilon"])
def test_diffusion_head_samples_near_its_data(pred):
    """300 steps on 4 conditions, each a point plus noise of std 0.1; 4 DDIM steps land near
    the condition's point (an epsilon model stepped from t = 999 misses by ~2700)."""
    torch.manual_seed(0)
    means, conds = torch.randn(4, 8), torch.randn(4, 16)
    head = DiffusionHead(16, 8, DiffusionHeadConfig(width=64, depth=2, prediction_type=pred))
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3)
    for _ in range(300):
        c = torch.randint(0, 4, (32,))
        loss = head.loss(conds[c], means[c] + 0.1 * torch.randn(32, 8))
        opt.zero_grad()
        loss.backward()
        opt.step()
    c = torch.arange(4).repeat(8)
    s = head.sample(conds[c], steps=4, generator=torch.Generator().manual_seed(0))
    assert (s - means[c]).pow(2).mean().sqrt().item() < 0.3


def test_projector_whiten(folders, tmp_path):
    """zca whitens (unit covariance in every direction); with projector_whiten the model fits it
    with the token statistics, the projector reads x @ W in the forward pass and in generation
    alike (`project`), and it is saved and loaded."""
    from setok_cli.models.setokim.heads import zca
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 5, generator=g) @ torch.tensor([[3.0, 0, 0, 0, 0], [2.9, 0.1, 0, 0, 0], [0, 0, 1, 0, 0],
                                                          [0, 0, 0, 0.5, 0], [0, 0, 0, 0, 2]])
    w = zca(z, eps=0).float()
    c = (z - z.mean(0)) @ w
    assert torch.allclose(c.t() @ c / z.shape[0], torch.eye(5), atol=1e-3)
    assert torch.allclose(w, w.t(), atol=1e-5)                                      # ZCA: symmetric
    m = make(folders, projector_whiten=True)
    tokens = torch.randn(6, 3, 8, generator=g) @ torch.randn(8, 8, generator=g)
    mask = torch.ones(6, 3, dtype=torch.bool)
    m.fit_token_stats(tokens, mask)
    assert torch.allclose(m.token_whiten, zca(m.normalize(tokens[mask])).float())
    x = m.normalize(tokens[0])
    assert torch.allclose(m.project(x), m.projector(x @ m.token_whiten), atol=1e-6)
    assert not torch.allclose(m.project(x), m.projector(x), atol=1e-3)
    ids, labels, attn, tk, mk = batch(m)
    sp = m.splice(ids, labels, attn, mk)
    emb = m.embed(sp, tk, mk).reshape(-1, m.lm.config.hidden_size)[sp.vis_dst]
    assert torch.allclose(emb, m.project(m.normalize(tk[mk][sp.vis_src])), atol=1e-5)
    m.save_pretrained(tmp_path / "w")
    assert torch.equal(Setokim.from_pretrained(tmp_path / "w").token_whiten, m.token_whiten)


def test_codebook_head_known_values():
    """k-means finds three well-separated centres; assign picks the nearest; the loss is the
    cross-entropy of the nearest code; temperature 0 returns the most likely code's centre."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])
    x = centres.repeat(50, 1) + 0.05 * torch.randn(150, 2, generator=g)
    head = CodebookHead(6, 2, CodebookHeadConfig(codes=3))
    assert head.fit(x) == 3
    got = head.codes[head.codes[:, 0].argsort()]
    assert torch.allclose(got, centres[centres[:, 0].argsort()], atol=0.05)
    assert torch.equal(head.assign(centres), torch.stack([(head.codes - c).norm(dim=1).argmin() for c in centres]))
    h = torch.randn(3, 6, generator=g)
    want = torch.nn.functional.cross_entropy(head(h), head.assign(centres))
    assert head.loss(h, centres).item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.equal(head.sample(h, temperature=0), head.codes[head(h).argmax(-1)])
    assert head.loss(h[:0], centres[:0]).item() == 0
    ref = CodebookHead(6, 2, CodebookHeadConfig(codes=3, refine=True, refine_weight=0.5))
    ref.fit(x)
    idx = ref.assign(centres)
    offset = ref.refine(torch.cat([h, ref.code_emb(idx)], -1))
    want = torch.nn.functional.cross_entropy(ref(h), idx) + 0.5 * (ref.codes[idx] + offset - centres).pow(2).mean()
    assert ref.loss(h, centres).item() == pytest.approx(want.item(), rel=1e-5)
    best = ref(h).argmax(-1)
    assert torch.allclose(ref.sample(h, temperature=0), ref.codes[best] + ref.refine(
        torch.cat([h, ref.code_emb(best)], -1)), atol=1e-6)
    few = CodebookHead(6, 2, CodebookHeadConfig(codes=8))
    assert few.fit(centres) == 8 and torch.isfinite(few.codes).all()    # fewer tokens than codes: repeats
    with pytest.raises(UserError):
        few.fit(centres[:0])


def test_keyed_codebook_every_token_a_code(folders, tmp_path):
    """codes: 0 with keyed logits: every distinct fitted token becomes a code (the config then
    records how many, so the saved model loads), the logits are <q(h), k(code)> / sqrt(w), and
    it learns to draw both modes of a two-mode target."""
    g = torch.Generator().manual_seed(0)
    toks = torch.randn(7, 3, 8, generator=g)
    m = make(folders, visual_head="codebook", codebook=CodebookHeadConfig(codes=0, keyed=True, refine=True))
    head = m.visual_head
    x = torch.cat([toks.reshape(-1, 8), toks[0]])                                  # 21 distinct, 3 repeated
    assert head.fit(x) == 21 and head.codes.shape == (21, 8) and m.config.codebook.codes == 21
    h = torch.randn(4, m.lm.config.hidden_size, generator=g)
    want = head.net(h) @ head.key(head.codes).t() / head.width ** 0.5
    assert torch.allclose(head(h), want, atol=1e-6)
    m.save_pretrained(tmp_path / "k")
    m2 = Setokim.from_pretrained(tmp_path / "k")
    assert torch.equal(m2.visual_head.codes, head.codes) and torch.allclose(m2.visual_head(h), head(h), atol=1e-6)
    with pytest.raises(UserError):
        CodebookHeadConfig(codes=0)                                                 # every token a code needs keyed
    a, cond, targets = _two_modes()
    kh = CodebookHead(16, 4, CodebookHeadConfig(codes=0, keyed=True))
    kh.fit(targets)
    _train_head(kh, cond, targets)
    s = kh.sample(cond.expand(400, 16), temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert 0.4 < (s[:, 0] > 0).float().mean().item() < 0.6


def _two_modes():
    """One condition (1, 16); targets (128, 4): +a or -a, half each."""
    torch.manual_seed(0)
    a = torch.tensor([3.0, -2.0, 1.0, 2.5])
    return a, torch.randn(1, 16), torch.cat([a.expand(64, 4), -a.expand(64, 4)])


def _train_head(head, cond, targets, steps=150):
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = head.loss(cond.expand(targets.shape[0], cond.shape[1]), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_codebook_head_samples_modes_where_mse_averages():
    """One condition, targets +a or -a half the time each. The MSE head learns the mean (0),
    which is neither; the codebook head samples both modes, each about half the time, and
    every sample is a mode."""
    a, cond, targets = _two_modes()
    mse, cb = MSEHead(16, 4), CodebookHead(16, 4, CodebookHeadConfig(codes=2))
    cb.fit(targets)
    for head in (mse, cb):
        _train_head(head, cond, targets)
    assert mse(cond).abs().max().item() < 0.2                              # the average of the two modes
    s = cb.sample(cond.expand(400, 16), temperature=1.0, generator=torch.Generator().manual_seed(0))
    near = torch.minimum((s - a).norm(dim=1), (s + a).norm(dim=1))
    assert near.max().item() < 1e-4
    share = (s[:, 0] > 0).float().mean().item()
    assert 0.4 < share < 0.6


def test_sample_logits_greedy_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert sample_logits(logits).item() == 0
    g = torch.Generator().manual_seed(0)
    draws = {sample_logits(logits, 1.0, 0.6, g).item() for _ in range(300)}
    assert draws == {0, 1}                                   # 0.2 lies outside the 0.6 nucleus
    draws = {sample_logits(logits, 1.0, 1.0, g).item() for _ in range(300)}
    assert draws == {0, 1, 2}


# ---- text -----------------------------------------------------------------------------

def test_word_tokenizer_from_world_files(tmp_path):
    f = tmp_path / "pairs.json"
    f.write_text(json.dumps([{"image": "a.png", "caption": "There are two objects: a purple hexagon, a red star."}]))
    (tmp_path / "edits.json").write_text(json.dumps([{"source": "a.png", "target": "b.png",
                                                      "instruction": "Remove the cyan ellipse."}]))
    (tmp_path / "instruct.json").write_text(json.dumps([{"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nHow many octagons?"}, {"from": "gpt", "value": "7"}]}]))
    (tmp_path / "referring.json").write_text(json.dumps([{"image": "a.png", "expression": "the leftmost kite",
                                                          "mask": "m.png"}]))
    tok = build_word_tokenizer([f] + [tmp_path / f"{n}.json" for n in ("edits", "instruct", "referring")])
    for w in ("cyan", "octagons", "7", "leftmost", "Remove"):
        assert "▁" + w in tok.get_vocab(), w
    text = "There are two objects: a purple hexagon, a red star."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == text
    assert tok("a zebra", add_special_tokens=False)["input_ids"][1] == tok.unk_token_id
    tok.save_pretrained(tmp_path / "t")
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(tmp_path / "t")(text)["input_ids"] == tok(text)["input_ids"]
    with pytest.raises(UserError, match="not found"):
        build_word_tokenizer([tmp_path / "nope.json"])


def test_render_conversation_labels(folders):
    tok = build_word_tokenizer(extra_texts=TEXTS)
    conv = [{"from": "human", "value": "<image>\nMake the red circle blue."}, {"from": "gpt", "value": "<image>"},
            {"from": "human", "value": "Describe the image briefly."}, {"from": "gpt", "value": "A red circle."}]
    ids, labels = render_conversation(conv, tok)

    def t(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    from setok_cli.models.setokim import VICUNA_SYSTEM
    p1 = t(VICUNA_SYSTEM + " USER: ") + [P] + t("Make the red circle blue. ASSISTANT:")
    p2 = t("USER: Describe the image briefly. ASSISTANT:")
    eos = tok.eos_token_id
    assert ids == [tok.bos_token_id] + p1 + [P, eos] + p2 + t("A red circle.") + [eos]
    assert labels == [IGNORE_INDEX] * (1 + len(p1)) + [P, eos] + [IGNORE_INDEX] * len(p2) + t("A red circle.") + [eos]
    assert "USER : Make" not in tok.decode([i for i in ids if i >= 0])   # spacing kept: "USER: Make"


def test_images_after_text_in_training_and_inference_alike(folders, tmp_path):
    from setok_cli.models.setokim import place_images, prompt_batch
    assert place_images("<image>\nMake the red circle blue.", "after_text") == "Make the red circle blue.\n<image>"
    assert place_images("<image>\nMake the red circle blue.", "before_text") == "<image>\nMake the red circle blue."
    assert place_images("<image>", "after_text") == "<image>"
    tok = build_word_tokenizer(extra_texts=TEXTS)
    conv = [{"from": "human", "value": "<image>\nMake the red circle blue."}, {"from": "gpt", "value": "<image>"}]
    ids, labels = render_conversation(conv, tok, image_placement="after_text")

    def t(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    from setok_cli.models.setokim import VICUNA_SYSTEM
    p1 = t(VICUNA_SYSTEM + " USER: Make the red circle blue.") + [P] + t(" ASSISTANT:")
    assert ids == [tok.bos_token_id] + p1 + [P, tok.eos_token_id]
    assert labels == [IGNORE_INDEX] * (1 + len(p1)) + [P, tok.eos_token_id]    # the read image still carries no label

    m = make(folders, image_placement="after_text")
    sample = {"conversations": conv, "images": [torch.randn(3, 8), torch.randn(2, 8)]}
    train_ids = m.collate([sample])["input_ids"][0].tolist()
    assert train_ids == ids
    infer_ids = prompt_batch(m, [conv[0]["value"]], [[sample["images"][0]]])[0][0].tolist()
    assert infer_ids == ids[:len(p1) + 1]                       # the prompt a pipeline renders is training's prefix
    m.save_pretrained(tmp_path / "m")
    assert Setokim.from_pretrained(tmp_path / "m").config.image_placement == "after_text"
    with pytest.raises(UserError, match="image_placement"):
        make(folders, image_placement="last")


def test_system_prompt_opens_training_and_prompts_alike(folders, tmp_path):
    """`system_prompt` ("" for none) opens every rendered conversation: training's ids, a pipeline's prompt
    and the saved config agree; a non-string is one UserError."""
    from setok_cli.models.setokim import prompt_batch
    tok = build_word_tokenizer(extra_texts=TEXTS)
    conv = [{"from": "human", "value": "<image>\nMake the red circle blue."}, {"from": "gpt", "value": "<image>"}]
    ids, _ = render_conversation(conv, tok, system="")

    def t(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    assert ids[:1 + len(t("USER:"))] == [tok.bos_token_id] + t("USER:")      # nothing before the user's turn
    assert len(render_conversation(conv, tok)[0]) > len(ids)                   # the Vicuna default is longer
    m = make(folders, system_prompt="")
    sample = {"conversations": conv, "images": [torch.randn(3, 8), torch.randn(2, 8)]}
    assert m.collate([sample])["input_ids"][0].tolist() == ids
    prompt = prompt_batch(m, [conv[0]["value"]], [[sample["images"][0]]])[0][0].tolist()
    assert prompt == ids[:len(prompt)] and len(prompt) < len(ids)
    m.save_pretrained(tmp_path / "m")
    assert Setokim.from_pretrained(tmp_path / "m").config.system_prompt == ""
    with pytest.raises(UserError, match="system_prompt"):
        make(folders, system_prompt=None)


# ---- the model -----------------------------------------------------------------------

def test_losses_match_hand_computed(folders):
    torch.manual_seed(0)
    m = make(folders)
    ids, labels, attn, tokens, mask = batch(m)
    out = m(ids, labels, attn, tokens, mask)
    # oracles: the LM's own shifted cross-entropy on the spliced labels; MSE at the positions
    # from [Img] on in the row that writes its image (row 1, image 1 with K = 2)
    sp = m.splice(ids, labels, attn, mask)
    emb = m.embed(sp, tokens, mask)
    hf_loss = m.lm(inputs_embeds=emb, attention_mask=sp.attention_mask, position_ids=sp.position_ids,
                   labels=sp.labels).loss
    assert out.text_loss.item() == pytest.approx(hf_loss.item(), rel=1e-5)
    # each row's summed text loss and its number of targets (the trainer's per-source losses)
    logits = m.lm(inputs_embeds=emb, attention_mask=sp.attention_mask, position_ids=sp.position_ids).logits[:, :-1]
    lab = sp.labels[:, 1:]
    assert out.text_rows.shape == (ids.shape[0], 2)
    for b in range(ids.shape[0]):
        keep = lab[b] != -100
        want = torch.nn.functional.cross_entropy(logits[b][keep].float(), lab[b][keep], reduction="sum")
        assert out.text_rows[b, 0].item() == pytest.approx(want.item(), rel=1e-5)
        assert out.text_rows[b, 1].item() == keep.sum().item() > 0
    total, n = out.text_rows.sum(0).tolist()
    assert total / n == pytest.approx(out.text_loss.item(), rel=1e-5)
    h = m.hidden(emb, sp.attention_mask, sp.position_ids).last_hidden_state
    s = int((sp.ids[1] == m.img_start_id).nonzero()[0])
    assert torch.allclose(emb[1, s + 1], m.projector(tokens[1, 0]), atol=1e-6)   # the token is fed back as input
    pred = m.visual_head(h[1, s:s + 2])
    assert out.visual_loss.item() == pytest.approx(((pred - tokens[1, :2]) ** 2).mean().item(), rel=1e-5)
    stop = m.stop_head(h[1, s:s + 3]).squeeze(-1)
    want = torch.nn.functional.binary_cross_entropy_with_logits(stop, torch.tensor([0.0, 0.0, 1.0]))
    assert out.stop_loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert out.num_visual == 2
    # [Img] and </s> are the written row's only text targets; the caption row's answer + </s>
    n_caption = len(m.text_tokenizer("A red circle.", add_special_tokens=False)["input_ids"]) + 1
    assert out.num_text == n_caption + 2


def test_text_weight_weighs_each_rows_cross_entropy(folders):
    torch.manual_seed(0)
    m = make(folders)
    ids, labels, attn, tokens, mask = batch(m)
    base = m(ids, labels, attn, tokens, mask)
    ones = m(ids, labels, attn, tokens, mask, text_weight=torch.ones(ids.shape[0]))
    assert ones.text_loss.item() == pytest.approx(base.text_loss.item(), rel=1e-6)
    w = torch.tensor([3.0, 0.0])                       # the caption row thrice, the written row not at all
    out = m(ids, labels, attn, tokens, mask, text_weight=w)
    rows = base.text_rows
    weighted = (w * rows[:, 0]).sum() / rows[:, 1].sum()
    assert (out.loss - base.loss).item() == pytest.approx((weighted - base.text_loss).item(), rel=1e-4)
    assert torch.equal(out.text_rows, base.text_rows) and out.text_loss == base.text_loss   # logged: unweighted
    assert out.visual_loss.item() == pytest.approx(base.visual_loss.item(), rel=1e-6)
    out.loss.backward()                                 # row 1's text gives no gradient: the rest still trains
    assert m.projector.net[0].weight.grad is not None


def test_visual_weight_is_a_weighted_mean_of_token_errors(folders):
    torch.manual_seed(0)
    m = make(folders)
    ids, labels, attn, tokens, mask = batch(m)
    base = m(ids, labels, attn, tokens, mask)
    ones = m(ids, labels, attn, tokens, mask, visual_weight=torch.ones(mask.shape))
    assert ones.visual_loss.item() == pytest.approx(base.visual_loss.item(), rel=1e-6)
    w = torch.ones(mask.shape)
    w[1, 1] = 4.0                                   # the second token of the written image
    out = m(ids, labels, attn, tokens, mask, visual_weight=w)
    sp = m.splice(ids, labels, attn, mask)
    h = m.hidden(m.embed(sp, tokens, mask), sp.attention_mask, sp.position_ids).last_hidden_state
    s = int((sp.ids[1] == m.img_start_id).nonzero()[0])
    err = ((m.visual_head(h[1, s:s + 2]) - tokens[1, :2]) ** 2).sum(-1)
    want = (err[0] + 4 * err[1]) / (5 * tokens.shape[-1])
    assert out.visual_loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert out.text_loss.item() == pytest.approx(base.text_loss.item(), rel=1e-6)


def test_collate_and_padding_do_not_leak(folders):
    m = make(folders)
    g = torch.Generator().manual_seed(0)
    sets = [torch.randn(3, 8, generator=g), torch.randn(2, 8, generator=g)]
    samples = [{"conversations": c, "images": [s]} for c, s in zip(convs(), sets)]
    b = m.collate(samples)
    assert torch.equal(b["input_ids"], batch(m)[0]) and b["image_token_mask"].sum(1).tolist() == [3, 2]
    sp = m.splice(b["input_ids"], b["labels"], b["attention_mask"], b["image_token_mask"])
    h = m.hidden(m.embed(sp, b["image_tokens"], b["image_token_mask"]), sp.attention_mask,
                 sp.position_ids).last_hidden_state
    for i in range(2):                                     # each row alone = the row in the padded batch
        one = m.collate(samples[i:i + 1])
        s1 = m.splice(one["input_ids"], one["labels"], one["attention_mask"], one["image_token_mask"])
        h1 = m.hidden(m.embed(s1, one["image_tokens"], one["image_token_mask"]), s1.attention_mask,
                      s1.position_ids).last_hidden_state[0]
        assert torch.allclose(h[i, : h1.shape[0]], h1, atol=1e-5)
    with pytest.raises(UserError, match="sample 7: 1 <image> mark"):
        m.collate([{"id": 7, "conversations": convs()[0], "images": []}])


def test_length_groups_minimise_padding_against_brute_force():
    import itertools

    from setok_cli.models.setokim.splice import length_groups
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        lengths = torch.randint(1, 40, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g)
        groups = int(torch.randint(1, 5, (1,), generator=g))
        parts = length_groups(lengths, groups)
        assert 1 <= len(parts) <= groups
        assert sorted(torch.cat(parts).tolist()) == list(range(len(lengths)))      # a partition
        padded = sum(len(p) * int(lengths[p].max()) for p in parts)
        ls = sorted(lengths.tolist())                                           # oracle: every cut of the sorted rows
        best = min(sum((b - a) * ls[b - 1] for a, b in zip((0,) + cuts, cuts + (len(ls),)))
                   for j in range(min(groups, len(ls)))
                   for cuts in itertools.combinations(range(1, len(ls)), j))
        assert padded == best, (lengths.tolist(), groups)


def test_row_groups_give_the_same_loss_and_gradients(folders):
    torch.manual_seed(0)
    m = make(folders)
    g = torch.Generator().manual_seed(1)
    short = [{"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": "A red circle."}]
    long = short + [{"from": "human", "value": "Make the red circle blue."}, {"from": "gpt", "value": "<image>"},
                    {"from": "human", "value": "Generate an image: a red circle."}, {"from": "gpt", "value": "<image>"}]
    samples = [{"conversations": c, "images": [torch.randn(k, 8, generator=g) for k in ks]}
               for c, ks in [(short, [2]), (long, [3, 2, 4]), (short, [1]), (long, [2, 2, 1]), (short, [3])]]
    b = m.collate(samples)
    outs, grads = [], []
    for groups in (1, 3):
        m.zero_grad()
        out = m(**b, row_groups=groups)
        out.loss.backward()
        outs.append(out)
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    assert outs[0].num_text == outs[1].num_text and outs[0].num_visual == outs[1].num_visual > 0
    for k in ("loss", "text_loss", "visual_loss", "stop_loss"):
        assert getattr(outs[1], k).item() == pytest.approx(getattr(outs[0], k).item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    # the rows really ran in groups: each group is cut to its own longest row
    sp = m.splice(b["input_ids"], b["labels"], b["attention_mask"], b["image_token_mask"])
    calls = []
    hook = m.lm.get_decoder().register_forward_pre_hook(lambda mod, a, kw: calls.append(kw["inputs_embeds"].shape[:2]),
                                                        with_kwargs=True)
    m(**b, row_groups=3)
    hook.remove()
    lengths = sorted(sp.attention_mask.sum(1).tolist())                          # 3 short rows, 2 long of unequal length
    assert sorted(tuple(c) for c in calls) == [(1, lengths[3]), (1, lengths[4]), (3, lengths[2])]
    assert sum(c[0] * c[1] for c in calls) < len(samples) * sp.attention_mask.shape[1]


def test_shared_prefix_length():
    from setok_cli.models.setokim.splice import shared_prefix
    e = torch.randn(3, 6, 4)
    e[1:, :4] = e[0, :4]                                            # 4 columns alike, then rows differ
    att, pos = torch.ones(3, 6, dtype=torch.long), torch.arange(6).expand(3, 6)
    assert shared_prefix(e, att, pos) == 4
    assert shared_prefix(e[:1], att[:1], pos[:1]) == 0              # one row: nothing to share
    e[:] = e[0]                                                     # identical rows keep a position each
    assert shared_prefix(e, att, pos) == 5
    att[2, 3:] = 0                                                  # the shortest row (3 tokens) keeps one
    assert shared_prefix(e, att, pos) == 2


def test_shared_prefix_gives_the_same_loss_and_gradients(folders):
    torch.manual_seed(0)
    m = make(folders)
    g = torch.Generator().manual_seed(1)
    short = [{"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": "A red circle."}]
    long = short + [{"from": "human", "value": "Make the red circle blue."}, {"from": "gpt", "value": "<image>"}]
    gen = [{"from": "human", "value": "Generate an image: a red circle."}, {"from": "gpt", "value": "<image>"}]
    samples = [{"conversations": c, "images": [torch.randn(k, 8, generator=g) for k in ks]}
               for c, ks in [(short, [2]), (long, [3, 2]), (gen, [2]), (long, [2, 4]), (short, [3])]]
    b = m.collate(samples)
    sp = m.splice(b["input_ids"], b["labels"], b["attention_mask"], b["image_token_mask"])
    # what every row shares: BOS, the system prompt and "USER:", to the first row that differs (the generation row)
    system = len(m.text_tokenizer(m.config.system_prompt, add_special_tokens=False)["input_ids"])
    differ = int((sp.ids != sp.ids[:1]).any(0).long().argmax())
    assert differ > system
    for groups in (1, 3):
        outs, grads = [], []
        for prefix in (False, True):
            m.zero_grad()
            calls = []
            hook = m.lm.get_decoder().register_forward_pre_hook(
                lambda mod, a, kw: calls.append(tuple(kw["inputs_embeds"].shape[:2])), with_kwargs=True)
            out = m(**b, row_groups=groups, prefix=prefix)
            hook.remove()
            out.loss.backward()
            outs.append(out)
            grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
        assert calls[0] == (1, differ)                                      # the prefix ran once, for one row
        assert sum(c[0] for c in calls[1:]) == len(samples) and all(c[1] <= sp.ids.shape[1] - differ for c in calls[1:])
        assert outs[0].num_text == outs[1].num_text and outs[0].num_visual == outs[1].num_visual > 0
        for k in ("loss", "text_loss", "visual_loss", "stop_loss"):
            assert getattr(outs[1], k).item() == pytest.approx(getattr(outs[0], k).item(), rel=1e-5, abs=1e-6)
        assert torch.allclose(grads[1], grads[0], rtol=1e-4, atol=1e-6)
        assert grads[0].abs().max() > 0

def test_bf16_lm_under_fp32_heads(folders):
    m = make(folders, lm_dtype="bfloat16", visual_head="diffusion")
    assert m.lm.dtype == torch.bfloat16 and m.head_dtype == torch.float32
    out = m(*batch(m))
    out.loss.backward()
    assert torch.isfinite(out.loss) and m.projector.net[0].weight.grad is not None
    g = m.generate(*prompt_batch(m, ["Generate an image: a red circle."], start_image=True), max_new_tokens=2,
                   max_visual_tokens=2)
    assert g[0].images[0].dtype == torch.float32


def test_read_images_carry_no_visual_loss(folders):
    m = make(folders)
    ids, labels, attn, tokens, mask = batch(m)
    out = m(ids[:1], labels[:1], attn[:1], tokens[:1], mask[:1])          # caption only
    assert out.num_visual == 0 and out.visual_loss.item() == 0.0 and out.stop_loss.item() == 0.0
    out.loss.backward()
    assert m.visual_head.net[0].weight.grad is not None                   # connected (DDP needs every grad)
    assert all(p.grad is None for p in m.setok.parameters())              # the stage-1 parts are frozen
    m.zero_grad(set_to_none=True)
    text = m.collate([{"conversations": [{"from": "human", "value": "Describe the image briefly."},
                                         {"from": "gpt", "value": "A red circle."}]}])
    m(**text).loss.backward()                                             # no image in the batch at all
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)   # DDP: every trainable grad


def test_save_load_identical(folders, tmp_path):
    for head in ("mse", "diffusion", "codebook"):
        torch.manual_seed(1)
        m = make(folders, visual_head=head, codebook=CodebookHeadConfig(codes=4))
        m.fit_token_stats(torch.randn(4, 3, 8) * 2 + 1, torch.ones(4, 3, dtype=torch.bool))
        ids, labels, attn, tokens, mask = batch(m)
        run = tmp_path / head
        m.save_pretrained(run / "checkpoints" / "step_00000005")
        m.save_pretrained(run / "checkpoints" / "step_00000005")           # over an existing folder
        assert {p.name for p in (run / "checkpoints" / "step_00000005").iterdir()} >= {
            "config.json", "model.safetensors", "lm", "tokenizer", "setok", "detokenizer"}
        m2 = Setokim.from_pretrained(run)                                 # the run folder: its latest checkpoint
        m.eval()
        torch.manual_seed(2)
        a = m(ids, labels, attn, tokens, mask)
        torch.manual_seed(2)
        b = m2(ids, labels, attn, tokens, mask)
        assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-6, abs=1e-7)
        assert torch.equal(m2.token_std, m.token_std) and m2.img_start_id == m.img_start_id
        if head == "codebook":                                            # the fitted codes travel
            assert torch.equal(m2.visual_head.codes, m.visual_head.codes)
        px = torch.rand(1, 3, 112, 112)
        assert torch.equal(m.encode_images(px)[0], m2.encode_images(px)[0])
    m.save_pretrained(tmp_path / "light", save_stage1=False)            # stage 1 by reference
    assert not (tmp_path / "light" / "setok").exists()
    m3 = Setokim.from_pretrained(tmp_path / "light")
    assert torch.equal(m3.encode_images(px)[0], m.encode_images(px)[0]) and m3.detokenizer is not None


def _generating_model(folders, head):
    torch.manual_seed(3)
    # x0-prediction: an untrained eps-predictor's DDIM samples blow up to ~1e5 (divided by
    # sqrt(abar) at t = 999), where allclose would no longer tell two samples apart
    m = make(folders, visual_head=head, max_visual_tokens=3, diffusion=DiffusionHeadConfig(prediction_type="sample"))
    with torch.no_grad():
        m.stop_head.bias.fill_(-5.0)                       # write the full 3 tokens, then text
        m.lm.get_output_embeddings().weight[m.eos_id] = 0   # random weights: keep </s> from ending at once
        for p in m.visual_head.parameters():                # MAR's zero init ignores the hidden state
            if not p.any():
                p.normal_(0, 0.1)
    return m


@pytest.mark.parametrize("head", ["mse", "diffusion", "codebook"])
def test_kv_cache_equals_no_cache(folders, head):
    m = _generating_model(folders, head)
    g = torch.Generator().manual_seed(0)
    sets = [torch.randn(2, 8, generator=g)]
    args = prompt_batch(m, ["<image>\nMake the red circle blue.", "Generate an image: a red circle."],
                        images=[sets, []], start_image=True)
    kw = dict(max_new_tokens=4, visual_steps=2)
    a = m.generate(*args, use_cache=True, generator=torch.Generator().manual_seed(5), **kw)
    b = m.generate(*args, use_cache=False, generator=torch.Generator().manual_seed(5), **kw)
    for x, y in zip(a, b):
        assert x.ids == y.ids and x.text == y.text
        assert len(x.images) == len(y.images) >= 1
        # tight: a one-position RoPE slip in the cached path moves these by ~1e-4
        assert all(torch.allclose(i, j, rtol=0, atol=2e-5) for i, j in zip(x.images, y.images))
    assert [len(x.images[0]) for x in a] == [3, 3] and a[0].ids[0] == m.img_end_id
    if head == "mse":                                      # left padding: a row alone = the row in a batch
        alone = m.generate(*prompt_batch(m, ["Generate an image: a red circle."], start_image=True), **kw)
        assert alone[0].ids == a[1].ids and torch.allclose(alone[0].images[0], a[1].images[0], atol=1e-5)
    with torch.no_grad():
        m.stop_head.bias.fill_(5.0)                         # stop at once: still one token per image
    one = m.generate(*args, **kw)
    assert [len(x.images[0]) for x in one] == [1, 1]
    pics = decode_images(m, a[0].images, steps=1)
    assert pics.shape == (1, 3, 16, 16) and 0 <= float(pics.min()) and float(pics.max()) <= 1


@pytest.mark.parametrize("head", ["mse", "codebook"])
def test_guidance_oracles(folders, head):
    """Classifier-free guidance: with the unconditional prompt equal to the prompt, any scale
    gives the unguided output; at scale 0 the written tokens are those the unconditional
    prompt writes alone (its rows are fed what they themselves pick)."""
    m = _generating_model(folders, head)
    if head == "codebook":
        with torch.no_grad():
            m.visual_head.refine = None                    # centres only: exact comparisons
    cond = prompt_batch(m, ["Generate an image: a red circle.", "Generate an image: two blue squares."],
                        start_image=True)
    un = prompt_batch(m, [UNCOND_GENERATE] * 2, start_image=True)
    # codes drawn at temperature 1 (a random head's argmax ignores the prompt), the same draws in each call
    kw = dict(max_new_tokens=4, visual_temperature=1.0, generator=torch.Generator().manual_seed(0))

    def gen(*args, **more):
        kw["generator"].manual_seed(0)
        return m.generate(*args, **kw, **more)
    plain = gen(*cond)
    same = gen(*cond, guidance=3.0, uncond=prompt_batch(m, ["Generate an image: a red circle.",
                                                                   "Generate an image: two blue squares."],
                                                               start_image=True)[:2])
    for x, y in zip(plain, same):
        assert x.ids == y.ids and all(torch.allclose(i, j, atol=1e-5) for i, j in zip(x.images, y.images))
    alone = gen(*un)
    zero = gen(*cond, guidance=0.0, uncond=un[:2])
    for x, y in zip(alone, zero):
        assert len(x.images[0]) == len(y.images[0]) == 3
        assert torch.allclose(x.images[0], y.images[0], atol=1e-5)
    # a large scale changes what is written (a random LM's prompts differ little in their hidden states)
    big = gen(*cond, guidance=1e3, uncond=un[:2])
    assert any(not torch.allclose(z.images[0], p.images[0], atol=1e-3) for z, p in zip(big, plain))
    with pytest.raises(UserError):
        gen(*cond, guidance=2.0)                                                     # no unconditional prompts
    with pytest.raises(UserError):
        gen(*cond, guidance=2.0, uncond=prompt_batch(m, [UNCOND_GENERATE] * 2)[:2])  # no [Img] at the end


def test_meta_vicuna_7b_parameter_count():
    cfg = SetokimConfig(lm="lmsys/vicuna-7b-v1.5", token_dim=1152)     # not on disk: the known architecture
    m = Setokim.on_meta(cfg)
    rows = {r[0]: r[1:] for r in parameter_table(m)}
    assert rows["lm"][0] == 6_738_415_616 + 2 * 2 * 4096                 # + [Img], [/Img] in embed and head
    assert rows["projector"][0] == 1152 * 4096 + 4096 + 4096 * 4096 + 4096
    assert rows["stop_head"][0] == 4097
    assert rows["all"][0] == sum(v[0] for k, v in rows.items() if k != "all")
    assert m.img_start_id == 32000 and m.img_end_id == 32001


def test_bad_inputs_one_line(folders, tmp_path):
    m = make(folders)
    broken = tmp_path / "broken"
    m.save_pretrained(broken)
    (broken / "lm" / "model.safetensors").unlink()                                  # a half-copied checkpoint
    cases = [
        lambda: Setokim.from_pretrained(broken),
        lambda: make(folders, token_dim=9),                                           # mismatched stage 1
        lambda: Setokim.from_config(SetokimConfig(lm=dict(TINY_LM), text_tokenizer=str(folders / "tok"),
                                                  stage1=str(tmp_path / "missing"))),
        lambda: Setokim.from_pretrained(tmp_path / "missing"),
        lambda: Setokim.from_pretrained(folders / "stage1"),                          # a stage-1 run, not Setokim
        lambda: Setokim.from_pretrained(folders / "tok"),                             # some other folder
        lambda: prompt_batch(m, ["   "]),                                             # empty prompt
        lambda: prompt_batch(m, ["<image>\nDescribe the image briefly."]),            # an <image> without image
        lambda: SetokimConfig(visual_head="l1"),
        lambda: Setokim.from_config(SetokimConfig(text_tokenizer=str(folders / "tok"), stage1=str(folders / "stage1"))),
        lambda: m.generate(*prompt_batch(m, ["Describe the image briefly."]), max_new_tokens=0),
        lambda: m.generate(*prompt_batch(m, ["Describe the image briefly."]), top_p=0),
        lambda: m.generate(*prompt_batch(m, ["Describe the image briefly."]), visual_steps=0),
    ]
    for i, f in enumerate(cases):
        with pytest.raises(UserError) as e:
            f()
        assert "\n" not in str(e.value) and str(e.value), i


# ---- learning -------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["mse", "diffusion", "codebook"])
def test_toy_task_lowers_text_and_visual_losses(folders, head):
    """Four concepts, each a caption and a fixed token set (2-4 tokens): read -> caption and
    caption -> write. 40 AdamW steps lower the text, visual and stop losses."""
    torch.manual_seed(0)
    m = make(folders, visual_head=head, diffusion=DiffusionHeadConfig(width=32, depth=2, batch_mul=4),
             codebook=CodebookHeadConfig(codes=16))
    caps = ["A red circle.", "Two blue squares.", "A green star.", "Three objects."]
    g = torch.Generator().manual_seed(0)
    sets = [torch.randn(k, 8, generator=g) for k in (2, 3, 4, 3)]
    rendered, images = [], []
    for c, s in zip(caps, sets):
        rendered.append(render_conversation([{"from": "human", "value": "<image>\nDescribe the image briefly."},
                                             {"from": "gpt", "value": c}], m.text_tokenizer))
        rendered.append(render_conversation([{"from": "human", "value": f"Generate an image: {c}"},
                                             {"from": "gpt", "value": "<image>"}], m.text_tokenizer))
        images += [s, s]
    ids, labels, attn = collate_conversations(rendered, m.pad_id)
    tokens, mask = pack_token_sets(images)
    m.fit_token_stats(tokens, mask)
    if head == "codebook":
        m.visual_head.fit(m.normalize(tokens[mask]))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    hist = []
    m.train()
    for _ in range(40):
        out = m(ids, labels, attn, tokens, mask)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        hist.append((out.text_loss.item(), out.visual_loss.item(), out.stop_loss.item()))
    first, last = np.mean(hist[:3], 0), np.mean(hist[-3:], 0)
    assert last[0] < 0.5 * first[0]
    assert last[1] < (0.5 if head == "mse" else 0.8) * first[1]
    assert last[2] < 0.5 * first[2]
