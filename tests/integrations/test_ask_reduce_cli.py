"""`setok ask --model LLAVA_FOLDER --reduce METHOD`: the reducer from the command line."""
from click.testing import CliRunner

from setok_cli.cli.main import cli
from test_llava_reduce import _save_tiny_llava


def _run(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_ask_a_llava_folder_with_and_without_a_reducer(tmp_path, chelsea_path):
    folder = _save_tiny_llava(tmp_path / "llava")
    for extra in ([], ["--reduce", "setok"], ["--reduce", "tome", "--budget", "4"]):
        res = _run(["ask", chelsea_path, "what colour is it ?", "--model", folder, "--max-new-tokens", "2",
                    "--threads", "1", *extra])
        assert res.exit_code == 0, res.output
        assert len(res.output.strip().splitlines()) <= 1
    for extra, msg in ((["--reduce", "zip"], "unknown reducer"), (["--reduce", "tome", "--budget", "999"], "budget")):
        res = _run(["ask", chelsea_path, "what colour is it ?", "--model", folder, *extra])
        assert res.exit_code == 2 and res.output.startswith("error:") and msg in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1


def test_reduce_on_a_setokim_run_is_one_line(tmp_path, chelsea_path):
    (tmp_path / "run").mkdir()
    res = _run(["ask", chelsea_path, "what?", "--model", tmp_path / "run", "--reduce", "setok"])
    assert res.exit_code == 2 and "--reduce" in res.output and len(res.output.strip().splitlines()) == 1
