"""Preemption: checkpoint at the next step boundary (or in the middle of an evaluation) and exit
so the job can be requeued.

SIGUSR1 or SIGTERM to any rank, or a `PREEMPT` file in the run folder, sets a local flag;
every `every` steps all ranks OR their flags with one small all-reduce, so they all save at the
same step boundary and exit together with EXIT_PREEMPTED = 17 (slurm/train.sh requeues the job).
Long collective work between two step boundaries (an evaluation: minutes of Inception passes)
asks `pending()` every few batches through its own all-reduce (metrics/fid.py) and raises
`Preempted` on every rank together; the trainer then saves and exits the same way.

Two files, two meanings. `PREEMPT` is a request (a person's `touch`, or train.sh on SIGUSR1): the
trainer reads it and, once the ranks agree to stop, removes it. `PREEMPTED` is the marker the main
process writes then ("preempted at step N (reason)"): wrappers need it because launchers do not
pass the exit code 17 through; the next start of the trainer removes it. A request is never
mistaken for a marker, so a `touch PREEMPT` made while a restarted run is still starting up is
honoured (with one file for both, the restarted run deleted it as its own stale marker).

Which signals reach the ranks: `accelerate launch`/`torchrun` forward only TERM/INT/HUP/QUIT, to
the whole process group of each worker (and SIGKILL it 30 s later), so SIGUSR1 must be sent to a
rank itself; SLURM signals every process of a step, and slurm/train.sh turns the batch shell's
USR1 into the PREEMPT file as well. DataLoader workers must not die of those signals before their
rank has saved: they are forked with the signals blocked (`signals_blocked`, data/prefetch.py,
metrics/evaluation.py), while the rank itself keeps receiving them, also during an evaluation.
The launcher's own exit code is 1 when its workers exit 17, so wrappers go by the DONE marker
(written on completion) and the PREEMPTED marker.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

import torch

from distgan.errors import DistganError

log = logging.getLogger("distgan")
T = TypeVar("T")

PREEMPT_FILE = "PREEMPT"
"""The request: anyone may create it (`touch RUN_DIR/PREEMPT`); removed once the ranks act on it."""
MARKER_FILE = "PREEMPTED"
"""The marker: written by the main process when the ranks agreed to stop; removed at the next start."""
MARKER_PREFIX = "preempted at step"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


EXIT_PREEMPTED = 17
"""Exit code after a preemption checkpoint: "saved, please requeue me" (slurm/train.sh)."""


class Preempted(DistganError):
    """Every rank agreed to stop for a preemption in the middle of long collective work (an
    evaluation); raised on all ranks together, so none is left waiting in a collective. The
    trainer catches it and checkpoints; anywhere else it ends the process with EXIT_PREEMPTED."""

    exit_code = EXIT_PREEMPTED
    label = "preempted"


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


def first_pull_blocked(items: Iterable[T]) -> Iterator[T]:
    """Iterate `items`, taking only the first item with the signals blocked (`signals_blocked`).

    A DataLoader forks its workers when it is first pulled, so they inherit the block, and the
    rest of the loop runs with the signals delivered: a preemption during a long evaluation is
    seen at once instead of when the whole evaluation is over. Lazy: nothing is pulled (and no
    worker forked) until the caller asks for the first item.
    """
    it = iter(items)
    with signals_blocked():
        first = next(it, _END)
    if first is _END:
        return
    yield first
    yield from it


_END = object()


class PreemptionWatch:
    """A flag raised by a signal or a PREEMPT request, agreed on by all ranks."""

    def __init__(self, run_dir: Path, backend, every: int = 5):
        self.file = Path(run_dir) / PREEMPT_FILE
        self.marker = Path(run_dir) / MARKER_FILE
        self.backend, self.every = backend, every
        self.signal_name = ""
        if backend.is_main:
            # The previous (preempted) attempt's marker says nothing about this one. The request
            # file is left alone: whatever is in it now was asked of this run.
            self.marker.unlink(missing_ok=True)
        self._previous: dict[int, object] = {}
        # Signal handlers can only be installed from the main thread (a trainer driven from a
        # worker thread, e.g. in a notebook, still gets the PREEMPT file).
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # Only set a flag: the handler runs between two bytecodes of arbitrary code (maybe inside
        # a collective or a logging call), so the work happens at the next poll.
        self.signal_name = signal.Signals(signum).name

    @property
    def signalled(self) -> bool:
        return bool(self.signal_name)

    def pending(self) -> bool:
        """This rank's own flag (a signal, or the request file): not agreed with the others.
        Long collective loops all-reduce it themselves (metrics/fid.py)."""
        return self.signalled or self.file.exists()

    def requested(self, step: int) -> bool:
        """Collective (every rank calls it with the same step): True on all ranks or none."""
        if step % self.every:
            return False
        local = self.pending()
        agreed = local
        if self.backend.world_size > 1:  # one small all-reduce (and host sync) only when there are peers
            flag = torch.tensor(float(local), device=self.backend.device)
            agreed = self.backend.all_reduce_max(flag).item() > 0
        if local:
            log.warning("Rank %d %s: checkpointing at step %d, then exiting for a requeue.", self.backend.rank,
                        self.reason(), step)
        if agreed:
            self.stopping(step, local)
        return agreed

    def stopping(self, step: int, local: bool, during: str = "") -> None:
        """The ranks agreed to stop at `step`: the main process writes the marker, then consumes
        the request (in that order, so a wrapper always finds one of the two files)."""
        if not self.backend.is_main:
            return
        why = self.signal_name or ("PREEMPT file" if local else "another rank")
        try:
            self.marker.write_text(f"{MARKER_PREFIX} {step} ({why}{', ' + during if during else ''})\n")
            self.file.unlink(missing_ok=True)
        except OSError as e:  # the checkpoint matters more than the marker
            log.warning("Could not write %s: %s", self.marker, e)

    def gave_up(self, step: int, what: str) -> None:
        """All ranks gave up `what` (long collective work) at `step` for a preemption: say why
        (the ranks that were asked), then write the marker."""
        local = self.pending()
        if local:
            log.warning("Rank %d %s during %s at step %d: giving it up, checkpointing, then exiting for a requeue.",
                        self.backend.rank, self.reason(), what, step)
        self.stopping(step, local, during=f"during {what}")

    def reason(self) -> str:
        return f"received {self.signal_name}" if self.signalled else f"found {self.file}"

    def close(self) -> None:
        """Put the previous signal handlers back (a second trainer in the same process, tests)."""
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
        self._previous.clear()
