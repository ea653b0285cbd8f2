"""`setok eval TASK --data JSON [--pred JSON] [--json]`: score a model on SPEC data."""
from __future__ import annotations

import json

import click

from ..eval.tasks import TASKS


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, (list, tuple)):
        return "x".join(str(x) for x in v)
    return str(v)


_EPILOG = """\b
Prediction files (--pred), JSON lists, paths relative to the file; any entry may
name its data entry by "index" instead of the matching keys:
  vqa       {"question_id", "answer"}       (question_id = the instruct entry's "id")
  caption   {"image", "caption"}            (matched by image file name)
  segment   {"image", "expression", "mask": png}
  generate  {"caption" or "prompt", "image": png}
  edit      {"source", "instruction", "image": png}
"""


@click.command("eval", epilog=_EPILOG)
@click.argument("task", type=click.Choice(TASKS))
@click.option("--data", "data", required=True, type=click.Path(),
              help="SPEC data file (tokenizer: objects.json or pairs.json; vqa: instruct.json; caption and "
                   "generate: pairs.json; segment: referring.json; edit: edits.json).")
@click.option("--pred", "pred", type=click.Path(), help="Predictions JSON (every task but tokenizer).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--model", type=click.Path(), help="tokenizer: a saved SeTok directory.")
@click.option("--encoder", help="tokenizer: encoder spec (builtin, or a local HF model).")
@click.option("--mode", type=click.Choice(["hard", "soft", "threshold", "fixed"]), help="tokenizer: clustering mode.")
@click.option("--k", type=int, help="tokenizer: KNN k of the density.")
@click.option("--bandwidth", type=float, help="tokenizer: clustering bandwidth.")
@click.option("--max-tokens", type=int, help="tokenizer: most tokens per image.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1), help="tokenizer: images per batch.")
@click.option("--limit", type=click.IntRange(1), help="Score only the first N entries (tokenizer).")
def eval_cmd(task, data, pred, as_json, model, encoder, mode, k, bandwidth, max_tokens, batch_size, limit):
    """Score TASK (tokenizer, vqa, caption, segment, generate, edit) on --data."""
    from ..errors import UserError
    from ..eval import tasks as T

    if task == "tokenizer":
        if pred is not None:
            raise UserError("--pred is not used by the tokenizer task (it runs the tokenizer itself)")
        res = T.eval_tokenizer(data, model=model, encoder=encoder, mode=mode, k=k, bandwidth=bandwidth,
                               max_tokens=max_tokens, batch_size=batch_size, limit=limit, progress=not as_json)
    else:
        if any(v is not None for v in (model, encoder, mode, k, bandwidth, max_tokens)):
            raise UserError(f"--model/--encoder/--mode/--k/--bandwidth/--max-tokens apply to the tokenizer task only, "
                            f"not {task}")
        res = getattr(T, f"eval_{task}")(data, pred)
    if as_json:
        click.echo(json.dumps(res))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"setok eval {task}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, v in res.items():
        if key not in ("task",):
            table.add_row(key, _fmt(v))
    Console().print(table)
