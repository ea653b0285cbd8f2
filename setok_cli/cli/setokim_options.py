"""The options Setokim's commands share (cli/setokim.py): sampling, the token bank, the
detokenizer, data files; and what they set up."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import UserError


def _sampling_options(f):
    opts = [
        click.option("--model", "model_path", required=True, metavar="RUN",
                     help="A stage-2/3 run folder (its latest checkpoint), a checkpoint, or a Setokim folder."),
        click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0),
                     help="Text sampling temperature (0: greedy)."),
        click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
                     help="Nucleus sampling mass for text."),
        click.option("--max-new-tokens", default=48, show_default=True, type=click.IntRange(min=1),
                     help="Most text tokens per answer."),
        click.option("--visual-steps", type=click.IntRange(min=1),
                     help="DDIM steps of the diffusion visual head (default: its config)."),
        click.option("--visual-temperature", type=click.FloatRange(min=0),
                     help="Noise scale of the diffusion visual head, or the temperature over the codebook "
                          "head's codes (0: the most likely; default: the head's config)."),
        click.option("--copy", "copy_mode", default="hard", show_default=True, type=click.Choice(["hard", "soft"]),
                     help="A model with a copy head: copy the source token it points at most (hard) or the "
                          "pointer's weighted mean (soft, as trained)."),
        click.option("--seed", default=0, show_default=True, type=int, help="Sampling seed."),
        click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1)),
        click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _bank_option(f):
    f = click.option("--place-temperature", default=1.0, show_default=True, type=click.FloatRange(min=0),
                     help="A model with a place head: temperature of each token's drawn seed cell (0: the most "
                          "likely).")(f)
    f = click.option("--place", "place_mode", default="auto", show_default=True,
                     type=click.Choice(["auto", "draw", "off"]),
                     help="A model with a place head: which images draw their tokens' places (auto: those "
                          "written without an input image; an edit keeps its source's places).")(f)
    f = click.option("--snap-metric", default="cos", show_default=True, type=click.Choice(["cos", "l2"]),
                     help="With --bank: the nearest token by L2, or by direction (cos).")(f)
    f = click.option("--max-overlap", default=0.25, show_default=True, type=click.FloatRange(0, 1),
                     help="With a bank that stores layouts: an object token is snapped only where at most this share "
                          "of it lies on the objects already written in the image (1: no check).")(f)
    f = click.option("--source-margin", default=2.5, show_default=True, type=click.FloatRange(min=0, min_open=True),
                     help="With --bank: snap to the input image's nearest token unless the bank's is this many "
                          "times closer.")(f)
    return click.option("--bank", "bank_path", type=click.Path(dir_okay=False), metavar="FILE",
                        help="Snap every written token to the nearest real token of this bank (or of the "
                             "input image): `setok bank DATA --model RUN --out FILE` makes one.")(f)


def _detok_option(f):
    return click.option("--detokenizer", "detok_path", metavar="RUN",
                        help="Decode written images with this stage-1 run's detokenizer instead of the model's own: "
                             "one trained over the same tokenizer (recipes/tiny/detokenizer.yaml).")(f)


def _use_detokenizer(model, detok_path) -> None:
    if detok_path:
        from ..models.setokim import use_detokenizer
        use_detokenizer(model, detok_path)


def _use_bank(opts, bank_path, model, source_margin, max_overlap, snap_metric, place_mode="auto",
              place_temperature=1.0) -> None:
    opts.source_margin, opts.max_overlap, opts.snap_metric = source_margin, max_overlap, snap_metric
    opts.place, opts.place_temperature = place_mode, place_temperature
    if bank_path:
        from ..models.setokim.bank import load_bank, load_bank_layouts
        opts.bank = load_bank(bank_path, model)
        opts.bank_layouts = load_bank_layouts(bank_path) if max_overlap < 1 else None
        if max_overlap < 1 and opts.bank_layouts is None:
            click.echo(f"note: {bank_path} stores no token layouts, so written objects are not kept apart; "
                       "rebuild it with `setok bank` to use --max-overlap", err=True)


def _check_bank(bank_path, detok_path=None) -> None:
    """Before the model loads: a named bank file and detokenizer run must exist."""
    if detok_path:
        from ..models.stage1 import stage1_folder
        stage1_folder(detok_path)
    if bank_path and not Path(bank_path).is_file():
        raise UserError(f"{bank_path}: no such token bank (make one with `setok bank DATA --model RUN --out FILE`)")


def _file_options(f):
    f = click.option("--limit", type=click.IntRange(min=1), help="Only the first N entries of --data.")(f)
    f = click.option("--pred-out", type=click.Path(dir_okay=False),
                     help="With --data: where to write the predictions JSON for `setok eval`.")(f)
    f = click.option("--data", type=click.Path(), help="Run over a SPEC data file instead of the arguments.")(f)
    return f
