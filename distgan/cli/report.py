"""`distgan report`: one run's curves and latest grid in one PNG, or several runs compared."""

from __future__ import annotations

import json
from pathlib import Path

import click

from distgan.compare import X_AXES, compare, table
from distgan.report import render


@click.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="PNG to write (default: RUN/report.png; for several runs compare.png in their common folder).")
@click.option("--json", "as_json", is_flag=True, help="Several runs: print the ranked table as JSON (for scripts).")
@click.option("--x", "x_axis", type=click.Choice(list(X_AXES)), default="kimg", show_default=True,
              help="Several runs: horizontal axis, images seen or minutes of training.")
def report_command(runs: tuple[str, ...], out: str | None, as_json: bool, x_axis: str) -> None:
    """Render loss and FID curves and the latest sample grid of one RUN into a PNG; given several
    RUNS, overlay their FID and loss curves in one PNG and print a table ranked by best FID with
    the config keys on which they differ. Files among RUNS (a shell glob's sweep.json) are skipped.

    \b
    Examples:
      distgan report runs/default                    # writes runs/default/report.png
      distgan report runs/default --out default.png
      distgan report runs/sweep-lr-grid/*            # compare a sweep's trials
      distgan report runs/a runs/b --json | jq '.runs[0].run'
      distgan report runs/default runs/r3gan-twemoji-32 --x minutes   # FID against training time
    """
    folders = [r for r in runs if Path(r).is_dir()]
    if len(folders) == 1 and not as_json:
        click.echo(f"wrote {render(folders[0], out)}")
        return
    result = compare(folders, out, x_axis)
    click.echo(json.dumps(result, indent=1) if as_json else f"{table(result)}\nwrote {result['png']}")
