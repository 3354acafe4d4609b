"""Session fixture ``slurm_cluster``: a real SLURM cluster on loopback (see cluster.py).

Runs as root or as an ordinary user (the daemons run as the current user). Skips (with the reason
written to the terminal, not only to the -rs summary) only when the cluster cannot run on this
machine: slurm missing and not installable (apt needs root), or, for a non-root user, daemons that
the system refused to start (the reason and their logs in the message). As root any start-up
failure is an error that carries the daemon logs. `.ci/run` runs the suite as root.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cluster as _cluster  # noqa: E402


_NOTES: list[str] = []


def _say(config: pytest.Config, text: str) -> None:
    """Write a line to the terminal now (past output capture) and again in the summary."""
    _NOTES.append(text)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        print(text, file=sys.stderr)
        return
    if capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\n{text}")
    else:
        reporter.write_line(f"\n{text}")


def pytest_terminal_summary(terminalreporter):
    for text in _NOTES:
        terminalreporter.write_line(text)


@pytest.fixture(scope="session")
def slurm_cluster(request):
    try:
        _cluster.ensure_installed()
    except _cluster.ClusterUnavailable as exc:
        reason = f"loopback SLURM cluster unavailable: {exc}"
        _say(request.config, f"[tests/slurm] SKIP: {reason}")
        pytest.skip(reason)
    c = _cluster.SlurmCluster()
    try:
        c.start()
    except _cluster.ClusterUnavailable as exc:  # only for a non-root user (see SlurmCluster.start)
        reason = f"loopback SLURM cluster unavailable: {exc}"
        _say(request.config, f"[tests/slurm] SKIP: {reason}")
        pytest.skip(reason)
    _say(request.config, f"[tests/slurm] cluster up in {c.startup_seconds:.2f}s at {c.base} "
         f"(nodes {', '.join(c.nodes)}, slurmctld port {c.ports['slurmctld']})")
    try:
        yield c
    finally:
        c.stop()
