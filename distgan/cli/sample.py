"""`distgan sample`: images from a checkpoint's generator."""

from __future__ import annotations

import click

from distgan.sampling import sample_to


@click.command("sample")
@click.option("--ckpt", required=True, type=click.Path(exists=True), help="Export folder (`distgan export`), checkpoint folder or run folder (its latest checkpoint).")
@click.option("--n", "n", default=64, show_default=True, help="Number of images.")
@click.option("--out", required=True, type=click.Path(), help="A .png file for a grid, or a folder for N separate PNGs.")
@click.option("--seed", default=0, show_default=True, help="Latent seed (the same seed gives the same images).")
@click.option("--class", "class_", type=int, default=None, help="Class index for a conditional model (default: one row per class).")
@click.option("--raw", is_flag=True, help="Use the raw generator instead of the EMA generator.")
@click.option("--truncation", "psi", type=click.FloatRange(0.0, 1.0), default=1.0, show_default=True,
              help="Truncation psi for generators with a mapping network (stylegan2): below 1 trades variety for "
                   "quality by pulling w towards its average; 0 gives the average image.")
def sample_command(ckpt: str, n: int, out: str, seed: int, class_: int | None, raw: bool, psi: float) -> None:
    """Generate images from a checkpoint.

    \b
    Examples:
      distgan sample --ckpt runs/default --n 64 --out grid.png
      distgan sample --ckpt runs/cond/checkpoints/step-000005000 --n 16 --class 3 --out cls3.png
      distgan sample --ckpt runs/default --n 1000 --out fakes/      # 1000 separate PNGs
      distgan sample --ckpt exports/emoji --n 16 --out grid.png     # an export folder
      distgan sample --ckpt runs/stylegan2-ada-twemoji-32 --truncation 0.7 --out trunc.png
    """
    path = sample_to(ckpt, n=n, out=out, seed=seed, class_index=class_, raw=raw, truncation_psi=psi)
    click.echo(f"wrote {path}")
