import json

from click.testing import CliRunner

from setok_cli.cli.main import cli


def test_setok_data_shapes(tmp_path):
    out = tmp_path / "w"
    r = CliRunner().invoke(cli, ["data", "shapes", "--out", str(out), "--n", "5", "--size", "64",
                                 "--seed", "1", "--splits", "0.6,0.2,0.2", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["splits"]["train"]["pairs"] == 3 and summary["splits"]["test"]["objects"] == 1
    assert (out / "train" / "scenes" / "000000.json").exists()
    r = CliRunner().invoke(cli, ["data", "shapes", "--out", str(out), "--n", "5"])
    assert r.exit_code == 0 and "train" in r.output


def test_setok_data_shapes_user_errors(tmp_path):
    for args in (["--splits", "0.9,0.9"], ["--n", "0"], ["--size", "8"]):
        r = CliRunner().invoke(cli, ["data", "shapes", "--out", str(tmp_path / "x"), *args])
        assert r.exit_code == 2, (args, r.output)
        assert "Traceback" not in r.output
    f = tmp_path / "file"
    f.write_text("")
    r = CliRunner().invoke(cli, ["data", "shapes", "--out", str(f), "--n", "2"])
    assert r.exit_code == 2
