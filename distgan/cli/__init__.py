"""The `distgan` command: one click group, one file per command group (train, data, sample, eval,
report, export, import, sweep, bench), each a thin wrapper over the library.

This group is the one place that turns a `DistganError` (a problem the user can fix) into one
line, `distgan: <label>: <message>`, and the error kind's exit code. `--debug` or
`DISTGAN_DEBUG=1` re-raises it to show the traceback. Any other exception (a bug) keeps its
traceback. An error every rank meets alike (`same_on_every_rank`, e.g. a missing package) is
reported by the main process only: one line per launch, not one per rank.

Each command module is imported on its own: one that cannot be imported (a package missing from
this environment) leaves the other commands working, and becomes a command that says, in one
line, what is missing and how to install it.
"""

from __future__ import annotations

import importlib
import os

import click

from distgan.errors import DistganError, MissingDependencyError
from distgan.optional import missing

DEBUG_ENV = "DISTGAN_DEBUG"

COMMANDS = (("train", "train", "train_command"), ("shards", "data", "shards_command"),
            ("sample", "sample", "sample_command"), ("eval", "eval", "eval_command"),
            ("report", "report", "report_command"), ("export", "export", "export_command"),
            ("import", "importer", "import_command"), ("sweep", "sweep", "sweep_command"),
            ("bench", "bench", "bench_command"))
"""(command name, module in distgan.cli, attribute), in the order `distgan --help` lists them."""


def _is_main_process() -> bool:
    """Rank 0 of a launch (torchrun/accelerate set RANK, srun SLURM_PROCID), or no launcher."""
    return (os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0") == "0"


class _ReportingGroup(click.Group):
    """Runs a command and reports its DistganError in one line (see the module docstring)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DistganError as e:
            if ctx.params.get("debug") or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            if _is_main_process() or not e.same_on_every_rank:
                click.echo(f"distgan: {e.label}: {e}", err=True)
            ctx.exit(e.exit_code)


def _unavailable(name: str, error: ImportError) -> click.Command:
    """A stand-in for a command whose module cannot be imported: listed, and says why when run."""
    problem = (missing(error.name, f"`distgan {name}`") if error.name
               else MissingDependencyError(f"`distgan {name}` cannot start: {error}"))

    def fail(args: tuple[str, ...]) -> None:
        raise problem

    short = f"(unavailable: no module '{error.name}'; run it to see the fix)" if error.name else "(unavailable)"
    return click.Command(name, callback=fail, help=f"Unavailable here: {problem}", short_help=short,
                         params=[click.Argument(["args"], nargs=-1, type=click.UNPROCESSED)],
                         context_settings={"ignore_unknown_options": True, "help_option_names": []})


def _load(name: str, module: str, attr: str) -> click.Command:
    try:
        return getattr(importlib.import_module(f"distgan.cli.{module}"), attr)
    except ImportError as e:
        # A package missing from this environment. Anything else (distgan's own import broken, a
        # syntax error) is a bug and keeps its traceback.
        if (e.name or "").split(".")[0] == "distgan":
            raise
        return _unavailable(name, e)


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
      distgan report runs/sweep-lr-grid/trial-*           # compare runs: curves and a table ranked by FID
      distgan export --ckpt runs/default --out exports/emoji
      distgan import network-snapshot-005000.pkl --out exports/sg2   # NVlabs StyleGAN2-ADA pickle
      distgan sweep configs/sweeps/lr-grid.yaml --submit
      distgan bench loop
      distgan --debug train data.source=data/broken   # an error with its traceback
    """


for _name, _module, _attr in COMMANDS:
    main.add_command(_load(_name, _module, _attr), _name)

__all__ = ["main", "COMMANDS", "DEBUG_ENV"]
