"""The `setok` command. Sub-commands are imported lazily so `setok --help` is instant
and a broken optional dependency only affects the command that needs it."""
from __future__ import annotations

import importlib

import click

from ..errors import UserError
from ..version import __version__

# name -> "module:attribute"; each module holds one click command (or group).
COMMANDS = {
    "tokenize": "setok_cli.cli.tokenize:tokenize",
    "train": "setok_cli.cli.train:train",
    "data": "setok_cli.cli.data:data",
    "eval": "setok_cli.cli.eval:eval_cmd",
    "bench-kernels": "setok_cli.cli.bench:bench_kernels",
    "bench-reduce": "setok_cli.cli.reduce:bench_reduce",
    "env": "setok_cli.cli.env:env",
    "caption": "setok_cli.cli.setokim:caption_cmd",
    "generate": "setok_cli.cli.setokim:generate_cmd",
    "edit": "setok_cli.cli.setokim:edit_cmd",
    "ask": "setok_cli.cli.setokim:ask_cmd",
    "segment": "setok_cli.cli.setokim:segment_cmd",
    "chat": "setok_cli.cli.setokim:chat_cmd",
    "export": "setok_cli.cli.setokim:export_cmd",
    "bank": "setok_cli.cli.setokim:bank_cmd",
}


class UserClickError(click.ClickException):
    """A `UserError` seen by click: printed as one line, exit code 2."""

    exit_code = 2

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            from ..data.worker_errors import worker_message
            raise UserClickError(worker_message(str(e))) from None
        except OSError as e:
            # a folder that cannot be made or written, a full disk: the path and the reason
            # (EPIPE to a closed pager is not the user's mistake: let click handle it)
            if isinstance(e, BrokenPipeError):
                raise
            from ..files import os_error_message
            raise UserClickError(os_error_message(e)) from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="setok")
def cli():
    """SeTok: semantic-equivalent vision tokenization, from kernels to Setokim."""


def main(argv=None):
    """Console entry point (`setok`)."""
    cli.main(args=argv, prog_name="setok")


if __name__ == "__main__":
    main()
