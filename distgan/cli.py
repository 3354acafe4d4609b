"""The `distgan` command: train, shards, sample, eval, report, bench (thin wrappers over the library)."""

from __future__ import annotations

import errno
import sys

import click

EXIT_CONFIG = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="distgan")
def main() -> None:
    """distgan: train GANs on one GPU or many nodes.

    \b
    Examples:
      distgan train                                   # small GAN on the built-in emoji
      distgan train --config configs/resnet-64.yaml train.steps=20000
      distgan shards ~/images data/shards --resolution 64
      distgan sample --ckpt runs/default --n 64 --out grid.png
      distgan eval --ckpt runs/default --n 5000
      distgan report runs/default
    """


@main.command("train", context_settings={"ignore_unknown_options": True})
@click.option("--config", "config", type=click.Path(dir_okay=False), help="YAML recipe (default: configs/default.yaml).")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and model sizes, then exit.")
@click.option("--help-config", is_flag=True, help="List every config key with its default and meaning.")
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
    """
    from distgan.config import ConfigError, describe
    from distgan.train import load_from_args, run

    if help_config:
        click.echo(describe())
        return
    try:
        cfg = load_from_args(config, overrides)
        status = run(cfg, dry_run=dry_run)
    except ConfigError as e:
        click.echo(f"distgan: config error: {e}", err=True)
        sys.exit(EXIT_CONFIG)
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        # A full disk or an unwritable folder outside a checkpoint save (samples, metrics):
        # checkpoints are only ever replaced once a new one is complete, so the last one is intact.
        click.echo(f"distgan: error: cannot write {e.filename or 'to the run folder'}: {e.strerror}. Checkpoints "
                   "already written are intact; free space or fix the folder, then rerun (train.resume=auto).", err=True)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - turn known failures into one clear line
        if type(e).__name__ in _KNOWN_ERRORS:
            click.echo(f"distgan: error: {e}", err=True)
            sys.exit(1)
        raise
    if status == "preempted":
        from distgan.trainer import EXIT_PREEMPTED

        sys.exit(EXIT_PREEMPTED)


# Failures whose message is the whole story (no traceback for the user).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
_KNOWN_ERRORS = {"DataError", "CheckpointError", "NonFiniteLossError", "WorldSizeError", "EvalError", "PeerFailureError"}


@main.command("sample")
@click.option("--ckpt", required=True, type=click.Path(exists=True), help="Checkpoint folder or run folder (its latest checkpoint).")
@click.option("--n", "n", default=64, show_default=True, help="Number of images.")
@click.option("--out", required=True, type=click.Path(), help="A .png file for a grid, or a folder for N separate PNGs.")
@click.option("--seed", default=0, show_default=True, help="Latent seed (the same seed gives the same images).")
@click.option("--class", "class_", type=int, default=None, help="Class index for a conditional model (default: one row per class).")
@click.option("--raw", is_flag=True, help="Use the raw generator instead of the EMA generator.")
def sample_command(ckpt: str, n: int, out: str, seed: int, class_: int | None, raw: bool) -> None:
    """Generate images from a checkpoint.

    \b
    Examples:
      distgan sample --ckpt runs/default --n 64 --out grid.png
      distgan sample --ckpt runs/cond/checkpoints/step-000005000 --n 16 --class 3 --out cls3.png
      distgan sample --ckpt runs/default --n 1000 --out fakes/      # 1000 separate PNGs
    """
    from distgan.sampling import sample_to

    try:
        path = sample_to(ckpt, n=n, out=out, seed=seed, class_index=class_, raw=raw)
    except (ValueError, RuntimeError) as e:
        click.echo(f"distgan: error: {e}", err=True)
        sys.exit(1)
    click.echo(f"wrote {path}")


@main.command("bench", context_settings={"ignore_unknown_options": True})
@click.argument("which", type=click.Choice(["loop", "data", "throughput", "all"]), default="all")
@click.option("--config", "config", type=click.Path(dir_okay=False), help="YAML recipe (default: configs/default.yaml).")
@click.option("--steps", default=40, show_default=True, help="Timed generator steps per measurement (after as many warm-up steps).")
@click.option("--rounds", default=3, show_default=True, help="Alternating rounds; the median ratio is reported.")
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
def bench_command(which: str, config: str | None, steps: int, rounds: int, overrides: tuple[str, ...]) -> None:
    """Measure distgan's overhead as ratios in one run; prints one JSON line per benchmark.

    \b
    loop        distgan's trainer vs a plain PyTorch loop on the same in-memory batches (target <= 1.03)
    data        trainer fed by shards vs by the same batches in memory (target <= 1.05)
    throughput  the data stream alone, img/s with 1 and 2 loader workers

    \b
    Examples:
      distgan bench loop
      distgan bench all --steps 100 --rounds 5 data.batch_size=64
      OMP_NUM_THREADS=1 distgan bench data --config configs/default.yaml
    """
    import json

    from distgan import bench

    cfg = bench.default_config(config, list(overrides))
    runs = {"loop": [bench.loop_overhead], "data": [bench.data_overhead], "throughput": [bench.data_throughput],
            "all": [bench.loop_overhead, bench.data_overhead, bench.data_throughput]}[which]
    for fn in runs:
        kwargs = {"batches": steps} if fn is bench.data_throughput else {"steps": steps, "rounds": rounds}
        click.echo(json.dumps(fn(cfg, **kwargs)))


def _add_optional_commands() -> None:
    """Commands that live next to their library code."""
    from distgan.data.shards import shards_command
    from distgan.evaluation import eval_command
    from distgan.report import report_command

    main.add_command(shards_command, "shards")
    main.add_command(eval_command, "eval")
    main.add_command(report_command, "report")


try:
    _add_optional_commands()
except ImportError:  # pragma: no cover - only while a part is being built
    pass

if __name__ == "__main__":
    main()
