"""`distgan import`: a foreign network pickle as a distgan export folder (nothing in it runs)."""

from __future__ import annotations

import click

from distgan.interop.importer import import_pickle


@click.command("import")
@click.argument("pkl", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(), help="Export folder to write.")
@click.option("--n", "n", default=16, show_default=True, help="Images in the sample grid.")
@click.option("--seed", default=0, show_default=True, help="Latent seed of the sample grid.")
@click.option("--force", is_flag=True, help="Replace an existing --out folder.")
def import_command(pkl: str, out: str, n: int, seed: int, force: bool) -> None:
    """Convert an NVlabs StyleGAN2-ADA or a brownvc/R3GAN network pickle (network-snapshot-*.pkl,
    or an official pretrained one) into a distgan export: G_ema, G and D as safetensors, the
    inferred stylegan2 or r3gan config, a model card naming the source and its license, a sample grid.

    The pickle is read with a restricted unpickler: no code from it runs (its embedded source is
    never executed); anything but network records, tensors and numbers is refused. StyleGAN3
    pickles, and networks outside StyleGAN2 config F (skip G, resnet D) or outside distgan's r3gan
    (per-stage block counts or group sizes, another resampling filter), are refused naming why.

    \b
    Examples:
      distgan import network-snapshot-005000.pkl --out exports/ffhq-sg2
      distgan sample --ckpt exports/ffhq-sg2 --n 16 --truncation 0.7 --out grid.png
      distgan train --config my-ffhq.yaml train.init_from=exports/ffhq-sg2   # fine-tune G, D, G_ema
    """
    folder = import_pickle(pkl, out, n=n, seed=seed, force=force)
    click.echo(f"wrote {folder} (from {pkl}; model.* keys of its config.json: what train.init_from needs)")
