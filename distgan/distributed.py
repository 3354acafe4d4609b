"""Process facts: rank/world discovery and world-size sanity."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("distgan")

class WorldSizeError(RuntimeError):
    """The launcher started a different number of processes than was asked for."""


def check_world_size(expected: int, actual: int) -> None:
    """Stop when N processes were asked for and a different number exist.

    `accelerate launch --cpu --num_processes 2` silently starts ONE process; without this check
    the run would train on one process while the user believes it uses two.
    """
    if expected and expected != actual:
        hint = ""
        if actual == 1:
            hint = (" On a machine without GPUs, `accelerate launch --cpu --num_processes N` starts one process: use "
                    "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N` or "
                    "`--config_file launch/cpu-2proc.yaml` instead.")
        raise WorldSizeError(f"dist.expect_world_size={expected} but the launcher started {actual} process(es).{hint}")


def launched_world_size() -> int:
    """World size the launcher announced through the environment (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
