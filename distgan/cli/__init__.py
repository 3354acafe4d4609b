"""The `distgan` command: one click group, one file per command group (train, data, sample, eval,
report, bench), each a thin wrapper over the library.

This group is the one place that turns a `DistganError` (a problem the user can fix) into one
line, `distgan: <label>: <message>`, and the error kind's exit code. `--debug` or
`DISTGAN_DEBUG=1` re-raises it to show the traceback. Any other exception (a bug) keeps its
traceback.
"""

from __future__ import annotations

import os

import click

from distgan.cli.bench import bench_command
from distgan.cli.data import shards_command
from distgan.cli.eval import eval_command
from distgan.cli.report import report_command
from distgan.cli.sample import sample_command
from distgan.cli.train import train_command
from distgan.errors import DistganError

DEBUG_ENV = "DISTGAN_DEBUG"


class _ReportingGroup(click.Group):
    """Runs a command and reports its DistganError in one line (see the module docstring)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DistganError as e:
            if ctx.params.get("debug") or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            click.echo(f"distgan: {e.label}: {e}", err=True)
            ctx.exit(e.exit_code)


@click.group(cls=_ReportingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="distgan")
@click.option("--debug", is_flag=True, help=f"Show the traceback of an error (same as {DEBUG_ENV}=1).")
def main(debug: bool) -> None:
    """distgan: train GANs on one GPU or many nodes.

    \b
    Examples:
      distgan train                                   # small GAN on the built-in emoji
      distgan train --config configs/resnet-64.yaml train.steps=20000
      distgan shards ~/images data/shards --resolution 64
      distgan sample --ckpt runs/default --n 64 --out grid.png
      distgan eval --ckpt runs/default --n 5000
      distgan report runs/default
      distgan bench loop
      distgan --debug train data.source=data/broken   # an error with its traceback
    """


for _command in (train_command, shards_command, sample_command, eval_command, report_command, bench_command):
    main.add_command(_command)

__all__ = ["main", "DEBUG_ENV"]
