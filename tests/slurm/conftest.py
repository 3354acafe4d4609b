"""Session fixture ``slurm_cluster``: a real SLURM cluster on loopback (see cluster.py).

Skips (with the reason written to the terminal, not only to the -rs summary) only when the cluster
cannot run on this machine at all: not root, or slurm missing and not installable with apt. Any
other start-up failure is an error that carries the daemon logs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cluster as _cluster  # noqa: E402


@pytest.fixture(scope="session")
def slurm_cluster():
    try:
        _cluster.ensure_installed()
    except _cluster.ClusterUnavailable as exc:
        reason = f"loopback SLURM cluster unavailable: {exc}"
        print(f"\n[tests/slurm] SKIP: {reason}", file=sys.__stderr__, flush=True)
        pytest.skip(reason)
    c = _cluster.SlurmCluster()
    c.start()
    print(f"\n[tests/slurm] cluster up in {c.startup_seconds:.2f}s at {c.base} "
          f"(nodes {', '.join(c.nodes)}, slurmctld port {c.ports['slurmctld']})",
          file=sys.__stderr__, flush=True)
    try:
        yield c
    finally:
        c.stop()
