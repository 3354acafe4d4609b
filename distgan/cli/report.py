"""`distgan report`: loss and FID curves and the latest sample grid of a run in one PNG."""

from __future__ import annotations

import click

from distgan.report import render


@click.command("report")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="PNG to write (default: RUN/report.png).")
def report_command(run: str, out: str | None) -> None:
    """Render loss and FID curves and the latest sample grid of RUN into one PNG.

    \b
    Examples:
      distgan report runs/default                    # writes runs/default/report.png
      distgan report runs/default --out default.png
    """
    click.echo(f"wrote {render(run, out)}")
