"""Fetch the next batches in a background thread while the step computes.

Receiving a batch from a loader worker costs the training process about 2 ms (unpickling the
shared-memory handles); at ~0.1 s per step on a small model that alone is a few percent. A
thread hides it: torch releases the GIL inside its kernels, so the hand-over runs during the
step. The thread also owns the loader, so its worker processes are forked from a thread with the
preemption signals blocked (SIGTERM/SIGUSR1 then reach only the rank, which checkpoints).

The data position for checkpoints (`state_dict`, a per-rank checkpoint object) is the stream's
state right after the batch the trainer last *consumed* (not the batches fetched ahead), so resume
stays exact. It records the data source too: a run resumed on other data starts that data from
its beginning instead of applying a position that belongs to another dataset.
"""

from __future__ import annotations

import collections
import logging
import signal
import threading
from typing import Any, Iterator, Protocol

import torch

from distgan.device import indexed, use_in_this_thread
from distgan.preemption import SIGNALS

log = logging.getLogger("distgan")


class DataStream(Protocol):
    """What the trainer needs of its data: endless (images, labels) batches of this rank, the
    position in them, and counts of skipped samples. `data.stream.ImageStream` is the real one.

    Images are uint8 (N, C, H, W) pixels, which the trainer moves to the device and converts
    there (`data.normalize.normalize_images`), or float images already in [-1, 1] (synthetic
    streams of tests and benchmarks), which pass through unchanged."""

    info: Any
    """`DatasetInfo`: num_samples, resolution, channels, class_names, num_classes, source."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def stats(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class Prefetcher:
    """Iterator over a stream's batches, `depth` batches ahead (once `start`ed), with the
    consumed position as its checkpoint state."""

    carries_over_world_change = True
    """Every rank consumed as many batches as rank 0, so rank 0's position says where all ranks
    are: the stream continues that epoch under another world size (data/position.py)."""

    def __init__(self, stream: DataStream, source: str, depth: int = 4, device: torch.device | None = None):
        self.stream, self.source = stream, source
        self.device = indexed(device) if device is not None else None
        """The rank's device (with its index, read here on the training thread), made current in
        the fetching thread (`device.use_in_this_thread`)."""
        self.state: dict[str, Any] = stream.state_dict()  # position before the first consumed batch
        self._depth, self._low = depth, depth // 2
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="distgan-prefetch", daemon=True)

    def start(self) -> "Prefetcher":
        self._thread.start()
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"source": self.source, "position": self.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("source") != self.source:
            log.warning("data.source changed since the checkpoint: the data stream starts from its beginning.")
            return
        self.stream.load_state_dict(state["position"])
        self.state = self.stream.state_dict()

    def _run(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            use_in_this_thread(self.device)  # before the loader starts its pin thread from here
            for batch in self.stream:
                item = (batch, self.stream.state_dict(), None)
                with self._cond:
                    while len(self._items) >= self._depth and not self._stop:
                        self._cond.wait()
                    if self._stop:
                        return
                    self._items.append(item)
                    self._cond.notify()
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
            with self._cond:
                self._items.append((None, None, e))
                self._cond.notify()

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self):
        with self._cond:
            while not self._items:
                self._cond.wait()
            batch, state, error = self._items.popleft()
            if len(self._items) == self._low:
                # Wake the fetching thread only at the low-water mark, not for every batch: each
                # wake-up is a thread switch that the step pays for.
                self._cond.notify()
        if error is not None:
            raise error
        self.state = state
        return batch

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread (it finishes the batch it is fetching, then exits)."""
        with self._cond:
            self._stop = True
            self._items.clear()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
