"""Preemption: checkpoint at the next step boundary and exit so the job can be requeued.

SIGUSR1 or SIGTERM to any rank, or a `PREEMPT` file in the run folder, sets a local flag;
every `every` steps all ranks OR their flags with one small all-reduce, so they all save at the
same step boundary and exit together with EXIT_PREEMPTED = 17 (slurm/train.sh requeues the job).

The PREEMPT file doubles as the "stopped for preemption" marker: when the ranks agree to stop, the
main process (re)writes it as "preempted at step N (reason)", and it stays until the next start of
the trainer removes it. Wrappers need it because launchers do not pass the exit code 17 through.

Which signals reach the ranks: `accelerate launch`/`torchrun` forward only TERM/INT/HUP/QUIT, to
the whole process group of each worker (and SIGKILL it 30 s later), so SIGUSR1 must be sent to a
rank itself; SLURM signals every process of a step, and slurm/train.sh turns the batch shell's
USR1 into the PREEMPT file as well. DataLoader workers must not die of those signals before their
rank has saved: see `signals_blocked`. The launcher's own exit code is 1 when its workers exit
17, so wrappers go by the DONE marker (written on completion) and the PREEMPT marker.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from pathlib import Path
from typing import Iterator

import torch

log = logging.getLogger("distgan")

PREEMPT_FILE = "PREEMPT"
MARKER_PREFIX = "preempted at step"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Block SIGUSR1/SIGTERM in this thread for the block; processes forked inside inherit the block.

    Wrap whatever may start DataLoader workers. Launchers stop a rank with `killpg` (torchrun,
    accelerate) and SLURM signals every process of a step, so the workers get the TERM too;
    torch's worker handler makes them die of it and the rank then crashes ("DataLoader worker is
    killed by signal") instead of checkpointing. Workers forked with the signals blocked keep
    them pending and are shut down by their rank as usual. A signal that arrives during the
    block is delivered to the rank's handler as soon as the block ends.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class PreemptionWatch:
    """A flag raised by a signal or a PREEMPT file, agreed on by all ranks."""

    def __init__(self, run_dir: Path, backend, every: int = 5):
        self.file = Path(run_dir) / PREEMPT_FILE
        self.backend, self.every = backend, every
        self.signal_name = ""
        if backend.is_main and self._read().startswith(MARKER_PREFIX):
            # Our own marker, left by the previous (preempted) attempt, is not a new request; a
            # request made while this process was starting (an empty file) still counts.
            self.file.unlink(missing_ok=True)
        self._previous: dict[int, object] = {}
        # Signal handlers can only be installed from the main thread (a trainer driven from a
        # worker thread, e.g. in a notebook, still gets the PREEMPT file).
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # Only set a flag: the handler runs between two bytecodes of arbitrary code (maybe inside
        # a collective or a logging call), so the work happens at the next step boundary.
        self.signal_name = signal.Signals(signum).name

    @property
    def signalled(self) -> bool:
        return bool(self.signal_name)

    def requested(self, step: int) -> bool:
        """Collective (every rank calls it with the same step): True on all ranks or none."""
        if step % self.every:
            return False
        local = self.signalled or self.file.exists()
        agreed = local
        if self.backend.world_size > 1:  # one small all-reduce (and host sync) only when there are peers
            flag = torch.tensor(float(local), device=self.backend.device)
            agreed = self.backend.all_reduce_max(flag).item() > 0
        if local:
            why = f"received {self.signal_name}" if self.signalled else f"found {self.file}"
            log.warning("Rank %d %s: checkpointing at step %d, then exiting for a requeue.", self.backend.rank, why, step)
        if agreed and self.backend.is_main:
            why = self.signal_name or ("PREEMPT file" if local else "another rank")
            try:
                self.file.write_text(f"{MARKER_PREFIX} {step} ({why})\n")
            except OSError as e:  # the checkpoint matters more than the marker
                log.warning("Could not write %s: %s", self.file, e)
        return agreed

    def _read(self) -> str:
        try:
            return self.file.read_text()
        except OSError:
            return ""

    def close(self) -> None:
        """Put the previous signal handlers back (a second trainer in the same process, tests)."""
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
        self._previous.clear()
