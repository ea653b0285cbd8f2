"""`setok eval TASK --data JSON [--pred JSON] [--json]`: score a model on SPEC data;
`setok eval reconstruct --model CKPT --data pairs.json`: score a stage-1 checkpoint."""
from __future__ import annotations

import json

import click

from ..eval.harness import TASKS

ALL_TASKS = TASKS + ("reconstruct",)


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

reconstruct scores a stage-1 checkpoint (--model: checkpoints/step_* or its run
folder) on a pairs.json with instances and scenes: reconstructions, the token
canvas and the ceiling (object recall and precision), mask-decoder mIoU, FG-ARI /
mBO trained vs untrained, image <-> caption retrieval R@1/R@5.
"""


@click.command("eval", epilog=_EPILOG)
@click.argument("task", type=click.Choice(ALL_TASKS))
@click.option("--data", "data", required=True, type=click.Path(),
              help="SPEC data file (tokenizer: objects.json or pairs.json; reconstruct, caption and generate: "
                   "pairs.json; vqa: instruct.json; segment: referring.json; edit: edits.json).")
@click.option("--pred", "pred", type=click.Path(), help="Predictions JSON (vqa, caption, segment, generate, edit).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--model", type=click.Path(),
              help="tokenizer: a saved SeTok folder; reconstruct: a stage-1 checkpoint or run folder.")
@click.option("--encoder", help="tokenizer: encoder spec (builtin, or a local HF model).")
@click.option("--mode", type=click.Choice(["hard", "soft", "threshold", "fixed"]), help="tokenizer: clustering mode.")
@click.option("--k", type=int, help="tokenizer: KNN k of the density.")
@click.option("--bandwidth", type=float, help="tokenizer: clustering bandwidth.")
@click.option("--max-tokens", type=int, help="tokenizer: most tokens per image.")
@click.option("--batch-size", type=click.IntRange(1), help="tokenizer, reconstruct: images per batch (default 16 and 25).")
@click.option("--limit", type=click.IntRange(1),
              help="Score only the first N entries of --data (as `setok ask|caption|... --limit N` writes them).")
@click.option("--steps", type=click.IntRange(1), help="reconstruct: sampling steps (default: the detokenizer's).")
@click.option("--seed", type=int, help="reconstruct: seed of the sampling noise [0].")
@click.option("--grid", type=click.Path(dir_okay=False),
              help="reconstruct: write originals / reconstructions / canvas / segments of the first batch as a PNG.")
@click.option("--threads", type=click.IntRange(1), help="reconstruct: CPU threads (default: torch's).")
@click.option("--against", type=click.Path(),
              help="vqa, caption, segment, generate, edit: a second predictions JSON of the same --data; prints "
                   "--pred minus --against for each metric with a 95% paired-bootstrap interval over the items.")
@click.option("--resamples", type=click.IntRange(100), default=2000, show_default=True,
              help="--against: bootstrap resamples (seeded by --seed, default 0).")
def eval_cmd(task, data, pred, as_json, model, encoder, mode, k, bandwidth, max_tokens, batch_size, limit,
             steps, seed, grid, threads, against, resamples):
    """Score TASK (tokenizer, reconstruct, vqa, caption, segment, generate, edit) on --data."""
    from ..errors import UserError
    from ..eval import harness as T

    tok_opts = dict(encoder=encoder, mode=mode, k=k, bandwidth=bandwidth, max_tokens=max_tokens)
    if against is not None:
        if any(v is not None for v in (model, batch_size, steps, grid, threads, *tok_opts.values())):
            raise UserError("--against compares two prediction files: --model/--encoder/--mode/--k/--bandwidth/"
                            "--max-tokens/--batch-size/--steps/--grid/--threads do not apply")
        return _compare(task, data, pred, against, limit, resamples, seed, as_json)
    rec_opts = dict(steps=steps, seed=seed, grid=grid, threads=threads)
    if task != "reconstruct" and any(v is not None for v in rec_opts.values()):
        raise UserError(f"--steps/--seed/--grid/--threads apply to the reconstruct task only, not {task}")
    if task in ("tokenizer", "reconstruct"):
        if pred is not None:
            raise UserError(f"--pred is not used by the {task} task (it runs the model itself)")
    elif any(v is not None for v in (model, batch_size, *tok_opts.values())):
        raise UserError(f"--model/--encoder/--mode/--k/--bandwidth/--max-tokens/--batch-size apply to the "
                        f"tokenizer and reconstruct tasks only, not {task}")
    if task == "tokenizer":
        res = T.eval_tokenizer(data, model=model, batch_size=batch_size or 16, limit=limit,
                               progress=not as_json, **tok_opts)
    elif task == "reconstruct":
        res = _reconstruct(data, model, as_json, batch_size, limit, tok_opts, **rec_opts)
    else:
        res = getattr(T, f"eval_{task}")(data, pred, limit=limit)
    if as_json:
        click.echo(json.dumps(res))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"setok eval {task}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, v in res.items():
        if key not in ("task", "per_shape"):
            table.add_row(key, _fmt(v))
    console = Console()
    console.print(table)
    if res.get("per_shape"):
        rows = res["per_shape"]
        cols = list(next(iter(rows.values())))
        shape_table = Table(title="objects right per shape")
        shape_table.add_column("shape")
        for c in cols:
            shape_table.add_column(c, justify="right")
        for shape, counts in rows.items():
            shape_table.add_row(shape, *(str(counts[c]) for c in cols))
        console.print(shape_table)


def _compare(task, data, pred, against, limit, resamples, seed, as_json) -> None:
    from ..errors import UserError
    from ..eval.compare import COMPARED, compare

    if task not in COMPARED:
        raise UserError(f"--against compares prediction files: {', '.join(COMPARED)}, not {task}")
    if pred is None:
        raise UserError("--against needs --pred: the predictions compared against it")
    res = compare(task, data, pred, against, limit=limit, resamples=resamples, seed=0 if seed is None else seed)
    if as_json:
        click.echo(json.dumps(res))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"setok eval {task}: --pred minus --against, 95% paired-bootstrap interval "
                        f"({resamples} resamples)")
    for col in ("metric", "--pred", "--against", "difference", "95% interval", "items"):
        table.add_column(col, justify="left" if col == "metric" else "right", no_wrap=True)
    for metric, d in res["diff"].items():
        interval = "-" if d["lo"] is None else f"{d['lo']:+.4f} .. {d['hi']:+.4f}"
        table.add_row(metric, _fmt(d["a"]), _fmt(d["b"]), f"{d['diff']:+.4f}", interval, str(d["items"]))
    Console().print(table)


def _reconstruct(data, model, as_json, batch_size, limit, tok_opts, steps, seed, grid, threads) -> dict:
    from ..errors import UserError
    from ..eval.reconstruct import evaluate_reconstruction, load_stage1, training_figures

    if model is None:
        raise UserError("reconstruct needs --model: a stage-1 checkpoint (checkpoints/step_*) or its run folder")
    if any(v is not None for v in tok_opts.values()):
        raise UserError("--encoder/--mode/--k/--bandwidth/--max-tokens apply to the tokenizer task only "
                        "(reconstruct uses the checkpoint's settings)")
    if threads is not None:
        import torch
        torch.set_num_threads(threads)
    parts = load_stage1(model)
    res = {"checkpoint": str(parts.folder)}
    res.update(evaluate_reconstruction(parts.setok, parts.detokenizer, parts.mask_decoder, parts.alignment, data,
                                       limit=limit, steps=steps, seed=0 if seed is None else seed,
                                       batch_size=batch_size or 25, image_size=parts.image_size,
                                       tokenizer_image_size=parts.tokenizer_image_size, grid=grid,
                                       progress=not as_json))
    res.update(training_figures(parts.folder))
    return res
