"""Preemption: checkpoint at the next step boundary and exit so the job can be requeued.

SIGUSR1 or SIGTERM to any rank, or a `PREEMPT` file in the run folder, sets a local flag;
every `every` steps all ranks OR their flags with one small all-reduce, so they all save at the
same step boundary and exit together with EXIT_PREEMPTED (slurm/train.sh requeues the job).
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import torch

log = logging.getLogger("distgan")

PREEMPT_FILE = "PREEMPT"


class PreemptionWatch:
    """A flag raised by a signal or a PREEMPT file, agreed on by all ranks."""

    def __init__(self, run_dir: Path, backend, every: int = 5):
        self.file = Path(run_dir) / PREEMPT_FILE
        self.backend, self.every = backend, every
        self._signalled = False
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGUSR1, signal.SIGTERM):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        log.warning("Received %s: will checkpoint at the next step boundary.", signal.Signals(signum).name)
        self._signalled = True

    def requested(self, step: int) -> bool:
        """Collective (every rank calls it with the same step): True on all ranks or none."""
        if step % self.every:
            return False
        local = self._signalled or self.file.exists()
        flag = torch.tensor(float(local), device=self.backend.device)
        agreed = self.backend.all_reduce_max(flag).item() > 0
        if agreed and self.backend.is_main:
            # Consumed: a requeued job must not see it again and stop immediately.
            self.file.unlink(missing_ok=True)
        return agreed


