"""`distgan shards`: pack images into webdataset shards with a dataset.json manifest."""

from __future__ import annotations

import os
from pathlib import Path

import click

from distgan.data.decode import FILTERS
from distgan.data.format import FORMATS, SKIPPED
from distgan.data.shards import write_shards


@click.command("shards", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--resolution", type=click.IntRange(min=1), default=64, show_default=True, help="Side in pixels.")
@click.option("--channels", type=click.Choice(["1", "3"]), default="3", show_default=True,
              help="1 = grayscale, 3 = RGB (transparency is flattened onto white).")
@click.option("--crop", type=click.Choice(["center", "none"]), default="center", show_default=True,
              help="center: square center crop before resizing; none: squash to a square.")
@click.option("--resize-filter", type=click.Choice(sorted(FILTERS)), default="lanczos", show_default=True)
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="png", show_default=True,
              help="Image encoding inside the shards (png is lossless).")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Samples per shard.")
@click.option("--workers", type=click.IntRange(min=1), default=min(8, os.cpu_count() or 1), show_default=True,
              help="Processes decoding and resizing.")
@click.option("--prefix", default="train", show_default=True, help="Shard file name prefix.")
@click.option("--overwrite", is_flag=True, help="Replace the shards of a non-empty OUT.")
@click.option("--shuffle/--no-shuffle", default=True, show_default=True,
              help="Shuffle the sample order (seeded) so that classes mix across shards.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of that shuffle.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Keep only the first N images of the shuffled order (a fixed random subset, for small-data runs).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def shards_command(src, out, resolution, channels, crop, resize_filter, fmt, shard_size, workers, prefix,
                   overwrite, shuffle, seed, limit, quiet):
    """Pack SRC images into webdataset tar shards in OUT, with a dataset.json manifest.

    SRC is an image folder (searched recursively; first-level subfolders become class labels),
    a .zip or .tar of images, or builtin:twemoji / builtin:fashion-mnist. Unreadable files are
    skipped and listed in OUT/skipped.txt.

    \b
    Example:
      distgan shards ~/pictures/flowers data/flowers --resolution 64 --shard-size 2000
      distgan shards builtin:twemoji data/twemoji32 --resolution 32
      distgan shards builtin:twemoji data/twemoji-500 --resolution 32 --limit 500   # a 500-image subset
    """
    m = write_shards(src, out, resolution=resolution, channels=int(channels), crop=crop, resize_filter=resize_filter,
                     fmt=fmt, shard_size=shard_size, workers=workers, prefix=prefix, overwrite=overwrite,
                     shuffle=shuffle, seed=seed, progress=not quiet, limit=limit)
    note = f", {m['skipped']} skipped (see {Path(out) / SKIPPED})" if m["skipped"] else ""
    click.echo(f"wrote {m['num_samples']} samples in {len(m['shards'])} shards to {out}{note}; "
               f"{len(m['class_names'])} classes")
