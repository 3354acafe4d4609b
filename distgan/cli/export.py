"""`distgan export`: a trained generator as a shareable folder (optionally pushed to the Hub)."""

from __future__ import annotations

import click

from distgan.export.build import export_run
from distgan.export.hub import check_push, push


@click.command("export")
@click.option("--ckpt", required=True, type=click.Path(exists=True), help="Run folder (its latest checkpoint) or checkpoint folder.")
@click.option("--out", required=True, type=click.Path(), help="Export folder to write.")
@click.option("--n", "n", default=64, show_default=True, help="Images in the sample grid.")
@click.option("--seed", default=0, show_default=True, help="Latent seed of the sample grid.")
@click.option("--force", is_flag=True, help="Replace an existing --out folder.")
@click.option("--push", "repo_id", default=None, metavar="REPO_ID",
              help="Also upload the folder to this Hugging Face Hub model repo (needs huggingface_hub and HF_TOKEN "
                   "or `hf auth login`; refused before any work otherwise).")
@click.option("--private", is_flag=True, help="With --push: create the repo as private.")
def export_command(ckpt: str, out: str, n: int, seed: int, force: bool, repo_id: str | None, private: bool) -> None:
    """Write the EMA generator of CKPT as a folder to share: model.safetensors, config.json,
    samples.png and a README.md model card (data license included), in the Hub's layout.

    \b
    Examples:
      distgan export --ckpt runs/default --out exports/emoji
      distgan export --ckpt runs/default/checkpoints/best --out exports/emoji-best --n 16
      distgan export --ckpt runs/default --out exports/emoji --push alice/emoji-dcgan
      distgan sample --ckpt exports/emoji --n 64 --out grid.png     # an export samples like a run
    """
    if repo_id:
        check_push(repo_id)  # before any work: a refused push writes nothing, here or remotely
    folder = export_run(ckpt, out, n=n, seed=seed, force=force)
    click.echo(f"wrote {folder}")
    if repo_id:
        click.echo(f"pushed {folder} to {repo_id}: {push(folder, repo_id, private=private)}")
