"""Repository-level checks: CI runs exactly the README's test command."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_block(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(title)
    block = text[start:].split("```bash", 1)[1].split("```", 1)[0]
    return block.strip()


def test_ci_runs_the_readme_test_command():
    cmd = _readme_block("Run the tests")
    ci = (ROOT / ".ci" / "run").read_text()
    assert cmd in ci.splitlines(), f"README test command {cmd!r} not in .ci/run"
