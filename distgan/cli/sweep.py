"""`distgan sweep`: expand a sweep file into trials; print, write or submit them as a SLURM array."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from distgan.sweep import SWEEP_SH, describe, load_sweep, submit, write_folder


@click.command("sweep")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Print the trials (every config validated) and write nothing.")
@click.option("--write", "write_only", is_flag=True, help="Write the sweep folder (trial-NNN/trial.yaml) without submitting.")
@click.option("--submit", "do_submit", is_flag=True, help="Write the sweep folder and submit one SLURM array task per trial.")
@click.option("--sbatch", "sbatch_args", default="", metavar="ARGS",
              help="Extra sbatch options for --submit, as one string (e.g. \"--nodes 2 --gpus-per-node 8\").")
@click.option("--parallel", type=int, default=0, help="With --submit: at most this many trials at once (--array=...%N).")
@click.option("--script", type=click.Path(dir_okay=False, path_type=Path), default=SWEEP_SH, show_default=True,
              help="The array script.")
def sweep_command(file: str, dry_run: bool, write_only: bool, do_submit: bool, sbatch_args: str, parallel: int,
                  script: Path) -> None:
    """Expand the sweep FILE (grid or random search) into trials, each a run folder under the
    sweep folder and a W&B run in the sweep's group. Every trial's config is validated first.

    \b
    Examples:
      distgan sweep configs/sweeps/lr-grid.yaml --dry-run
      distgan sweep configs/sweeps/lr-grid.yaml --submit
      distgan sweep configs/sweeps/random-search.yaml --submit --parallel 4 --sbatch "--gpus-per-node 1"
      distgan sweep configs/sweeps/lr-grid.yaml --write && sbatch --array=0-3 slurm/sweep.sh runs/sweep-lr-grid
      distgan report runs/sweep-lr-grid/trial-*                    # compare the trials afterwards
    """
    if sum((dry_run, write_only, do_submit)) != 1:
        raise click.UsageError("give one of --dry-run, --write or --submit")
    sweep = load_sweep(file)
    click.echo(describe(sweep))
    if write_only:
        click.echo(f"wrote {write_folder(sweep)}; submit with: sbatch --array=0-{len(sweep.trials) - 1} "
                   f"{SWEEP_SH.relative_to(SWEEP_SH.parent.parent)} {sweep.folder}")
    elif do_submit:
        job = submit(sweep, shlex.split(sbatch_args), script=script, parallel=parallel)
        click.echo(f"submitted array job {job}: {len(sweep.trials)} trials, logs {sweep.name}-{job}_<i>.out")
