"""`distgan eval`: FID/KID of a checkpoint as one JSON line."""

from __future__ import annotations

import json
from pathlib import Path

import click

from distgan.errors import EvalError

from distgan.metrics.evaluation import evaluate_checkpoint
from distgan.report import log_evaluation


@click.command("eval")
@click.option("--ckpt", required=True, type=click.Path(exists=True), help="Checkpoint folder or run folder (its latest checkpoint).")
@click.option("--data", "data", default=None, help="Real images (any data.source); default: the checkpoint's training data.")
@click.option("--n", "n", type=int, default=None, help="Generated and real images (default: the run's eval.n_samples).")
@click.option("--extractor", type=click.Choice(["inception", "tiny"]), default=None,
              help="Feature network (default: the run's eval.extractor); `tiny` is for smoke tests only.")
@click.option("--weights", default=None, type=click.Path(), help="Inception weights file (TorchScript or pytorch-fid state dict).")
@click.option("--batch-size", type=int, default=None, help="Images per forward pass (default: the run's eval.batch_size).")
@click.option("--seed", default=0, show_default=True, help="Latent seed of the generated images.")
@click.option("--raw", is_flag=True, help="Evaluate the raw generator instead of the EMA generator.")
@click.option("--log", "log_row", is_flag=True,
              help="Also append the scores to the run's evals.jsonl, where `distgan report` draws them.")
def eval_command(ckpt: str, data: str | None, n: int | None, extractor: str | None, weights: str | None,
                 batch_size: int | None, seed: int, raw: bool, log_row: bool) -> None:
    """FID/KID of a checkpoint; prints one JSON line with the scores and their settings.

    \b
    Examples:
      distgan eval --ckpt runs/default --n 5000
      distgan eval --ckpt runs/default/checkpoints/step-000003000 --data data/shards --weights pt_inception.pth
      distgan eval --ckpt runs/default --n 256 --extractor tiny      # quick smoke check, not a real FID
      distgan eval --ckpt runs/default/checkpoints/step-000001000 --n 2000 --log   # a point of the FID curve
    """
    result = evaluate_checkpoint(ckpt, data=data, n=n, extractor=extractor, weights=weights, batch_size=batch_size,
                                 seed=seed, raw=raw, progress=lambda msg: click.echo(f"distgan eval: {msg}", err=True))
    if log_row:
        folder = Path(result["ckpt"]).parent
        if folder.name != "checkpoints":
            raise EvalError(f"--log: {result['ckpt']} is not a checkpoint inside a run folder (RUN/checkpoints/step-N)")
        log_evaluation(folder.parent, result)
    click.echo(json.dumps(result))
