import pytest
import yaml

from setok_cli.cli.main import cli
from setok_cli.errors import UserError
from setok_cli.train.recipe import apply_overrides, dump_recipe, load_recipe, recipe_from_dict


def test_defaults_and_types(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("optim:\n  lr: 1e-3\ntrain:\n  max_steps: 10\n")
    r = load_recipe(p)
    assert r.optim.lr == pytest.approx(1e-3) and isinstance(r.optim.lr, float)   # YAML reads 1e-3 as str
    assert r.train.max_steps == 10 and r.model.detokenizer.mapper.num_queries == 8


def test_unknown_key_names_closest(tmp_path):
    with pytest.raises(UserError, match=r"'optim.lrr'.*did you mean 'lr'"):
        recipe_from_dict({"optim": {"lrr": 1}})
    with pytest.raises(UserError, match=r"'model.detokenizer.mapper.num_querys'.*'num_queries'"):
        recipe_from_dict({"model": {"detokenizer": {"mapper": {"num_querys": 4}}}})
    with pytest.raises(UserError, match=r"'trian'.*did you mean 'train'"):
        recipe_from_dict({"trian": {}})


def test_set_overrides_coerce_and_check(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  max_steps: 10\n")
    r = load_recipe(p, ["train.max_steps=20", "optim.lr=5e-4", "train.tensorboard=true",
                        "model.mask_decoder=null", "model.detokenizer.unet.layers_per_block=1",
                        "data.train=[a.json, b.json]"])
    assert r.train.max_steps == 20 and r.optim.lr == 5e-4 and r.train.tensorboard is True
    assert r.model.mask_decoder is None and r.model.detokenizer.unet == {"layers_per_block": 1}
    assert r.data.train == ["a.json", "b.json"]
    with pytest.raises(UserError, match=r"'train.max_step'.*did you mean 'max_steps'"):
        load_recipe(p, ["train.max_step=3"])
    with pytest.raises(UserError, match="must be int"):
        load_recipe(p, ["train.max_steps=abc"])
    with pytest.raises(UserError, match="key=value"):
        apply_overrides({}, ["train.max_steps"])


def test_resolved_roundtrip(tmp_path):
    r = recipe_from_dict({"train": {"max_steps": 7}})
    dump_recipe(r, tmp_path / "resolved.yaml")
    again = recipe_from_dict(yaml.safe_load((tmp_path / "resolved.yaml").read_text()))
    assert again == r


def test_cli_bad_key_is_one_line(tmp_path):
    from click.testing import CliRunner
    p = tmp_path / "r.yaml"
    p.write_text("optim:\n  warmup_ratoi: 0.1\n")
    res = CliRunner().invoke(cli, ["train", str(p)])
    assert res.exit_code == 2
    assert "error: unknown recipe key 'optim.warmup_ratoi'; did you mean 'warmup_ratio'" in res.output
    assert "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["train", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_shipped_recipes_validate():
    from pathlib import Path
    root = Path(__file__).resolve().parents[2] / "recipes"
    for name in ["stage1.yaml", "tiny/stage1.yaml"]:
        assert load_recipe(root / name).stage == "stage1"


def test_unquoted_yaml_booleans_in_string_keys(tmp_path):
    """`--set train.mixed_precision=no` (YAML 1.1 reads `no` as false) means "no"; any other
    boolean for a string key is one clear error, not the string 'False'."""
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  mixed_precision: bf16\n")
    assert load_recipe(p, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(UserError, match=r"'optim.schedule' must be a string.*quote"):
        load_recipe(p, ["optim.schedule=off"])


def test_mixed_precision_defaults_to_auto_and_is_checked(tmp_path):
    assert recipe_from_dict({}).train.mixed_precision == "auto"
    from pathlib import Path
    recipes = Path(__file__).resolve().parents[2] / "recipes"
    assert load_recipe(recipes / "stage1.yaml").train.mixed_precision == "auto"       # the paper recipe: per machine
    assert load_recipe(recipes / "tiny" / "stage1.yaml").train.mixed_precision == "no"  # fp32: README "Stage I in fp32"
    with pytest.raises(UserError, match=r"train.mixed_precision must be 'auto', 'no', 'fp16' or 'bf16', got 'fp8'"):
        recipe_from_dict({"train": {"mixed_precision": "fp8"}})
