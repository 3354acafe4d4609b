"""Built-in datasets materialized into shards once, under ``data.cache_dir``.

``materialize`` builds the shards of ``builtin:<name>`` once per (name, resolution, channels); an
fcntl lock makes concurrent ranks wait for one builder, and the build goes to a temporary folder
renamed at the end, so a killed build is simply rebuilt next time.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from pathlib import Path

from distgan.data.builtin import check_name
from distgan.data.format import MANIFEST
from distgan.data.shards import write_shards

BUILD_VERSION = 2  # part of the cache key: bump it when what a built-in materializes to changes (2: class_counts)
_SHARD_SIZE = {"twemoji": 500, "fashion-mnist": 2000}


def _default_progress() -> bool:
    # A bar only for a person watching; DISTGAN_NO_PROGRESS=1 silences it like the trainer's.
    return sys.stderr.isatty() and os.environ.get("DISTGAN_NO_PROGRESS") != "1"


def cache_key(name: str, resolution: int, channels: int) -> str:
    return f"{name}-r{resolution}-c{channels}-v{BUILD_VERSION}"


def materialize(name: str, resolution: int, channels: int, cache_dir: str | os.PathLike,
                workers: int | None = None, progress: bool | None = None) -> Path:
    """Shards of ``builtin:<name>`` at this resolution/channels under cache_dir; built once.

    Safe with several processes: the first takes an exclusive fcntl lock and builds into
    ``<key>.tmp-<pid>``, renamed to ``<key>`` when dataset.json is written; the others block on
    the lock and then find the finished folder. (fcntl locks need a local or lock-capable file
    system; on NFS without locking, build once before launching.)
    """
    check_name(name)
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    key = cache_key(name, resolution, channels)
    final = cache / key
    if (final / MANIFEST).is_file():
        return final
    with open(cache / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if we are killed
        try:
            if (final / MANIFEST).is_file():
                return final  # another process built it while we waited
            for stale in [*cache.glob(f"{key}.tmp-*"), final]:
                shutil.rmtree(stale, ignore_errors=True)  # leftovers of a killed build
            tmp = cache / f"{key}.tmp-{os.getpid()}"
            write_shards(f"builtin:{name}", tmp, resolution=resolution, channels=channels, crop="center",
                         resize_filter="lanczos", fmt="png", shard_size=_SHARD_SIZE[name],
                         workers=workers or min(4, os.cpu_count() or 1), shuffle=True, seed=0,
                         progress=_default_progress() if progress is None else progress)
            os.rename(tmp, final)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final
