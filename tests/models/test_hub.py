"""The one persistence layer (models/hub.py): what a user sees when loading goes wrong."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from setok_cli.errors import UserError
from setok_cli.models.hub import PretrainedModel, config_from_dict, resolve_checkpoint
from setok_cli.models.mask_decoder import MaskDecoder, MaskDecoderConfig
from setok_cli.models.setok import SeTok, SeTokConfig


@dataclass
class _Inner:
    width: int = 4


@dataclass
class _Cfg:
    n: int = 3
    inner: _Inner = None

    def __post_init__(self):
        if self.n < 1:
            raise ValueError("n must be >= 1")


class _Toy(PretrainedModel, model_type="test-toy", config_class=_Cfg, part_name="toy", subfolder="toy"):
    _unsaved_prefixes = ("frozen.",)

    def __init__(self, config: _Cfg):
        super().__init__()
        self.config = config
        self.lin = nn.Linear(config.n, 2)
        self.frozen = nn.Linear(2, 2)


def test_config_from_dict_is_strict_and_nested():
    c = config_from_dict(_Cfg, {"n": 2, "inner": {"width": 7}, "model_type": "x", "setok_version": "0"})
    assert c.n == 2 and isinstance(c.inner, _Inner) and c.inner.width == 7
    with pytest.raises(UserError, match=r"here: unknown _Cfg key\(s\) 'nn' \(did you mean 'n'\?\)"):
        config_from_dict(_Cfg, {"nn": 2}, where="here")
    with pytest.raises(UserError, match="unknown _Inner key"):
        config_from_dict(_Cfg, {"inner": {"widht": 1}})
    with pytest.raises(UserError, match="invalid _Cfg: n must be >= 1"):
        config_from_dict(_Cfg, {"n": 0})


def test_round_trip_skips_unsaved_and_checks_weights(tmp_path):
    torch.manual_seed(0)
    m = _Toy(_Cfg(n=3))
    m.save_pretrained(tmp_path / "toy")
    cfg = json.loads((tmp_path / "toy" / "config.json").read_text())
    assert cfg["model_type"] == "test-toy" and cfg["n"] == 3
    from safetensors.torch import load_file
    assert sorted(load_file(str(tmp_path / "toy" / "model.safetensors"))) == ["lin.bias", "lin.weight"]
    r = _Toy.from_pretrained(tmp_path / "toy")
    assert torch.equal(r.lin.weight, m.lin.weight) and not r.training
    # a checkpoint whose config no longer matches its weights: one line naming the tensors
    cfg["n"] = 5
    (tmp_path / "toy" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"shape mismatch in lin.weight \(2, 3\) vs \(2, 5\)"):
        _Toy.from_pretrained(tmp_path / "toy")


def test_failed_save_keeps_the_previous_files(tmp_path, monkeypatch):
    m = _Toy(_Cfg(n=3))
    m.save_pretrained(tmp_path / "toy")
    before = {p.name: p.read_bytes() for p in (tmp_path / "toy").iterdir()}
    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(UserError, match="No space left on device"):
        _Toy(_Cfg(n=3)).save_pretrained(tmp_path / "toy")
    assert {p.name: p.read_bytes() for p in (tmp_path / "toy").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]          # no temporary folder left


def test_wrong_part_says_what_the_folder_holds(tmp_path):
    ck = tmp_path / "run" / "checkpoints" / "step_00000010"
    SeTok(SeTokConfig(merger_dim=32, token_dim=8)).save_pretrained(ck / "setok")
    MaskDecoder(MaskDecoderConfig(token_dim=8)).save_pretrained(ck / "mask_decoder")
    with pytest.raises(UserError, match=r"holds the mask decoder, not the SeTok tokenizer; the SeTok tokenizer "
                                        r"of that checkpoint is .*step_00000010/setok$"):
        SeTok.from_pretrained(ck / "mask_decoder")
    # a checkpoint folder and a run folder (its latest checkpoint) both find the part
    assert SeTok.from_pretrained(ck).config.token_dim == 8
    assert resolve_checkpoint(tmp_path / "run") == ck
    assert SeTok.from_pretrained(tmp_path / "run").config.token_dim == 8
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="without checkpoints"):
        SeTok.from_pretrained(tmp_path / "empty")
    with pytest.raises(UserError, match="no config.json; not a saved mask decoder"):
        MaskDecoder.from_pretrained(tmp_path)


def test_legacy_folder_without_model_type_is_known_by_its_name(tmp_path):
    MaskDecoder(MaskDecoderConfig(token_dim=8)).save_pretrained(tmp_path / "mask_decoder")
    cfg = json.loads((tmp_path / "mask_decoder" / "config.json").read_text())
    del cfg["model_type"]
    (tmp_path / "mask_decoder" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="holds the mask decoder, not the SeTok tokenizer"):
        SeTok.from_pretrained(tmp_path / "mask_decoder")
    assert MaskDecoder.from_pretrained(tmp_path / "mask_decoder").config.token_dim == 8
