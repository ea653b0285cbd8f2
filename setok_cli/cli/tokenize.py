"""`setok tokenize IMAGE...`: images in, semantic tokens and their regions out."""
from __future__ import annotations

import sys

import click

from ..errors import UserError

MODES = ("hard", "soft", "threshold", "fixed")
PROGRESS_FROM = 4  # show a progress bar from this many inputs


@click.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--model", "model_dir", metavar="DIR", help="A tokenizer saved with save_pretrained / by training.")
@click.option("--encoder", metavar="SPEC",
              help="'builtin' (default), a local Hugging Face model folder, or a model id in the local HF cache.")
@click.option("--mode", type=click.Choice(MODES), help="Clustering mode (default: hard).")
@click.option("--k", type=click.IntRange(min=1), help="Neighbours for the density (default 8).")
@click.option("--bandwidth", type=click.FloatRange(min=0, min_open=True),
              help="Kernel radius in units of the image's feature spread (default 0.6).")
@click.option("--max-tokens", type=click.IntRange(min=2), help="Most tokens per image (default 64).")
@click.option("--min-scope", type=click.FloatRange(0, 1, max_open=True), help="Scope stop level (soft mode).")
@click.option("--threshold", type=float, help="Seed score threshold (threshold mode) / stop rule (hard, soft).")
@click.option("--show-masks", is_flag=True, help="Write <out>/<stem>_tokens.png: the image beside its token regions.")
@click.option("--json", "write_json", is_flag=True, help="Write <out>/<stem>_tokens.json: labels, seeds, counts.")
@click.option("--out", "out_dir", default=".", show_default=True, metavar="DIR", help="Folder for the outputs.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", type=click.IntRange(min=1),
              help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy machine).")
def tokenize(images, model_dir, encoder, mode, k, bandwidth, max_tokens, min_scope, threshold, show_masks,
             write_json, out_dir, batch_size, threads):
    """Tokenize IMAGE... (files, folders, globs) into a variable number of semantic tokens."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..models.setok import load_tokenizer
    from ..tasks.tokenize import Failure, tokenize_files

    if model_dir and encoder:
        raise UserError("give --model or --encoder, not both (a saved tokenizer names its encoder)")
    if show_masks or write_json:
        from ..files import ensure_dir
        ensure_dir(out_dir)  # before the model loads: an unwritable --out fails at once
    out = Console(highlight=False, soft_wrap=True)  # resolves sys.stdout when printing
    err = Console(file=sys.stderr, highlight=False, soft_wrap=True)
    model = load_tokenizer(model_dir, encoder, mode=mode, k=k, bandwidth=bandwidth, max_tokens=max_tokens,
                           min_scope=min_scope, threshold=threshold)
    cfg = model.config
    out.print(f"[bold]setok tokenize[/]: encoder [cyan]{escape(cfg.encoder)}[/], mode {cfg.mode}, k {cfg.k}, "
              f"bandwidth {cfg.bandwidth:g}, max tokens {cfg.max_tokens}")

    from ..images import expand_inputs

    total = sum(len(x) for x in expand_inputs(images))
    progress = None
    if total >= PROGRESS_FROM:
        # transient bar on stderr; while it runs rich redirects stdout above it
        progress = Progress(TextColumn("tokenizing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=err, transient=True)
        task = progress.add_task("tokenize", total=total)

    def report(r):
        if progress is not None:
            progress.advance(task)
        if isinstance(r, Failure):
            return
        where = escape(f"  -> {', '.join(r.outputs)}") if r.outputs else ""
        out.print(f"{escape(r.path)}: [bold]{r.num_tokens}[/] tokens, grid {r.grid[0]}x{r.grid[1]}, "
                  f"{r.seconds * 1000:.0f} ms{where}")

    def run():
        return tokenize_files(images, model, out_dir=out_dir, show_masks=show_masks, write_json=write_json,
                              batch_size=batch_size, on_result=report)

    if progress is not None:
        with progress:
            results, failures = run()
    else:
        results, failures = run()
    if results:
        n = sum(r.num_tokens for r in results)
        out.print(f"{len(results)} image(s), {n / len(results):.1f} tokens on average")
    for f in failures:
        msg = f.message if f.message.startswith(f.path) else f"{f.path}: {f.message}"
        click.echo(f"error: {msg}", err=True)
    if failures:
        click.echo(f"error: {len(failures)} of {len(results) + len(failures)} input(s) failed", err=True)
        sys.exit(2)

