"""`distgan bench`: the benchmarks of distgan.benchmarks, one JSON line each."""

from __future__ import annotations

import json

import click

from distgan.benchmarks.comm import comm_report
from distgan.benchmarks.data import data_overhead, data_throughput
from distgan.benchmarks.loop import loop_overhead
from distgan.benchmarks.scaling import measure_scaling
from distgan.benchmarks.timing import default_config

IN_PROCESS = {"loop": loop_overhead, "data": data_overhead, "throughput": data_throughput}


@click.command("bench", context_settings={"ignore_unknown_options": True})
@click.argument("which", type=click.Choice([*IN_PROCESS, "scaling", "comm", "all"]), default="all")
@click.option("--config", "config", type=click.Path(dir_okay=False), help="YAML recipe (default: configs/default.yaml; not for scaling).")
@click.option("--steps", type=click.IntRange(min=1), default=40, show_default=True, help="Timed generator steps per measurement (after as many warm-up steps).")
@click.option("--rounds", type=click.IntRange(min=1), default=None, help="Alternating rounds; the median ratio (scaling: each setup's best) is reported. [default: 7; scaling: 2]")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="scaling: generator steps before timing starts.")
@click.option("--batch", default=32, show_default=True, help="scaling: images per process per step.")
@click.option("--width", default=32, show_default=True, help="scaling: G and D base width.")
@click.option("--skip-zero", is_flag=True, help="scaling: only the DDP measurement, not the ZeRO/FSDP optimizer sizes.")
@click.option("--compute-s", default=0.1, show_default=True, help="comm: one GPU's compute seconds per generator step.")
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
def bench_command(which: str, config: str | None, steps: int, rounds: int | None, warmup: int, batch: int, width: int,
                  skip_zero: bool, compute_s: float, overrides: tuple[str, ...]) -> None:
    """Measure distgan's overhead as ratios in one run; prints one JSON line per benchmark.

    \b
    loop        distgan's trainer vs a plain PyTorch loop on the same in-memory batches: median ratio
                (target <= 1.02) and ms per step added (target <= 1), with every round; per loop
                img/s, sec/kimg and, on a GPU, peak memory (runs on the GPU when there is one)
    data        trainer fed by shards vs by the same batches in memory (target <= 1.05)
    throughput  the data stream alone, img/s with 1 and 2 loader workers
    scaling     2 processes vs 1 on CPU (efficiency, target >= 0.85), and optimizer-state bytes
                per rank under DDP, ZeRO-1/2 and FSDP (several minutes; not part of `all`)
    comm        bytes all-reduced per generator step from the real models and phase list, and the
                projected step time / weak-scaling efficiency on 8 GPUs (NVLink) and 4x8 (InfiniBand)
    all         loop, data and throughput

    \b
    Examples:
      distgan bench loop
      distgan bench loop --config configs/r3gan-ffhq-64.yaml --steps 10 --rounds 3 dist.compile=true
      distgan bench all --steps 100 --rounds 5 data.batch_size=64
      OMP_NUM_THREADS=1 distgan bench data --config configs/default.yaml
      OMP_NUM_THREADS=1 distgan bench scaling --rounds 3
    """
    if which == "scaling":
        for row in measure_scaling(steps=steps, warmup=warmup, batch=batch, width=width, rounds=rounds or 2,
                                   skip_zero=skip_zero, overrides=overrides):
            click.echo(json.dumps(row))
        return
    cfg = default_config(config, list(overrides))
    if which == "comm":
        for row in comm_report(cfg, compute_s):
            click.echo(json.dumps(row))
        return
    for name in IN_PROCESS if which == "all" else [which]:
        kwargs = {"batches": steps} if name == "throughput" else {"steps": steps, "rounds": rounds or 7}
        click.echo(json.dumps(IN_PROCESS[name](cfg, **kwargs)))
