"""Fetch the next batches in a background thread while the step computes.

Receiving a batch from a loader worker costs the training process about 2 ms (unpickling the
shared-memory handles); at ~0.1 s per step on a small model that alone is a few percent. A
thread hides it: torch releases the GIL inside its kernels, so the hand-over runs during the
step. The thread also owns the loader, so its worker processes are forked from a thread with the
preemption signals blocked (SIGTERM/SIGUSR1 then reach only the rank, which checkpoints).

The data position for checkpoints is the stream's state right after the batch the trainer last
*consumed* (not the batches fetched ahead), so resume stays exact.
"""

from __future__ import annotations

import queue
import signal
import threading
from typing import Any

from distgan.preemption import SIGNALS


class Prefetcher:
    """Iterator over a stream's batches, `depth` batches ahead, with a consumed-position state."""

    def __init__(self, stream, depth: int = 2):
        self.stream = stream
        self.state: dict[str, Any] = stream.state_dict()  # position before the first consumed batch
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distgan-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            for batch in self.stream:
                item = (batch, self.stream.state_dict(), None)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
            self._queue.put((None, None, e))

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self):
        batch, state, error = self._queue.get()
        if error is not None:
            raise error
        self.state = state
        return batch

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread (it finishes the batch it is fetching, then exits)."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()  # unblock a put
            except queue.Empty:
                break
        self._thread.join(timeout)
