"""`distgan train`: load the config (command line > YAML file > defaults) and run the training."""

from __future__ import annotations

import errno
import sys

import click

from distgan.config import describe, load_config
from distgan.errors import DistganError
from distgan.run import load_from_args, resolve_recipe, run
from distgan.trainer import EXIT_PREEMPTED

WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
"""A full disk or an unwritable folder: the user's to fix, reported in one line."""


@click.command("train", context_settings={"ignore_unknown_options": True})
@click.option("--config", "config", type=click.Path(dir_okay=False), help="YAML recipe (default: configs/default.yaml).")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and model sizes, then exit.")
@click.option("--help-config", is_flag=True, help="List every config key with the value this command would use (recipe and overrides applied) and its meaning.")
@click.option("--local_rank", "--local-rank", "local_rank", type=int, hidden=True, help="Set by the deepspeed launcher; ignored.")
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
def train_command(config: str | None, dry_run: bool, help_config: bool, local_rank: int | None, overrides: tuple[str, ...]) -> None:
    """Train a GAN. OVERRIDES are section.key=value pairs (command line > file > defaults).

    \b
    Examples:
      distgan train
      distgan train train.steps=200 data.batch_size=16
      accelerate launch distgan/train.py --config configs/resnet-64.yaml
      ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 distgan/train.py dist.expect_world_size=2
      torchrun --standalone --nproc_per_node 2 -m distgan.train train.steps=200
    """
    if help_config:  # the values this very command line would train with, not the bare dataclass defaults
        recipe = resolve_recipe(config)
        click.echo(f"# distgan train: command line > {recipe or 'no recipe'} > defaults\n"
                   f"{describe(load_config(recipe, list(overrides)))}")
        return
    try:
        status = run(load_from_args(config, overrides), dry_run=dry_run)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        # A full disk or an unwritable folder outside a checkpoint save (samples, metrics):
        # checkpoints are only ever replaced once a new one is complete, so the last one is intact.
        raise DistganError(f"cannot write {e.filename or 'to the run folder'}: {e.strerror}. Checkpoints already "
                           "written are intact; free space or fix the folder, then rerun (train.resume=auto).") from e
    if status == "preempted":
        sys.exit(EXIT_PREEMPTED)
