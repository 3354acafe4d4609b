"""Preemption flags without a training run: the request/marker files, signal delivery around
forked loader workers, and the collective poll of long evaluation loops (real gloo processes).

The 2-process evaluation that is preempted mid-way, checkpoints and resumes is
tests/integration/test_preempt_eval.py.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import signal
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

from distgan.metrics.fid import _polled
from distgan.preemption import MARKER_FILE, PREEMPT_FILE, Preempted, PreemptionWatch, first_pull_blocked


class OneProcess:
    """What the watch asks of a backend in a single process (no peers: no collective is made)."""

    rank, world_size, is_main, device = 0, 1, True, torch.device("cpu")

    def all_reduce_max(self, tensor):  # pragma: no cover - never called with world_size 1
        return tensor


@pytest.fixture
def watch_factory():
    made = []

    def make(run_dir: Path, every: int = 1) -> PreemptionWatch:
        made.append(PreemptionWatch(run_dir, OneProcess(), every=every))
        return made[-1]

    yield make
    for watch in made:
        watch.close()  # the test process's own signal handlers come back


def test_request_touched_while_a_preempted_run_restarts_is_honoured(tmp_path, watch_factory):
    """Issue 19 item 2: the previous attempt left its marker; `touch PREEMPT` arrives while the
    restarted run is still importing (before its watch starts). With one file for both, the touch
    only refreshed the marker, which the new run deleted as stale, and trained on."""
    (tmp_path / MARKER_FILE).write_text("preempted at step 40 (SIGUSR1)\n")  # left by the attempt before
    (tmp_path / PREEMPT_FILE).touch()  # the new request, made during start-up
    watch = watch_factory(tmp_path)
    assert not (tmp_path / MARKER_FILE).exists()  # the old marker is gone ...
    assert (tmp_path / PREEMPT_FILE).exists()  # ... the request is not
    assert watch.requested(41)
    assert (tmp_path / MARKER_FILE).read_text() == "preempted at step 41 (PREEMPT file)\n"
    assert not (tmp_path / PREEMPT_FILE).exists()  # consumed: the next attempt is not stopped by it


def test_stale_marker_alone_is_not_a_request(tmp_path, watch_factory):
    (tmp_path / MARKER_FILE).write_text("preempted at step 40 (SIGTERM)\n")
    watch = watch_factory(tmp_path)
    assert not watch.requested(41) and not watch.pending()
    assert not (tmp_path / MARKER_FILE).exists() and not (tmp_path / PREEMPT_FILE).exists()


def test_signal_is_polled_every_n_steps_and_named_in_the_marker(tmp_path, watch_factory):
    watch = watch_factory(tmp_path, every=5)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert watch.pending() and watch.reason() == "received SIGUSR1"
    assert not watch.requested(3)  # not a poll step
    assert watch.requested(5)
    assert (tmp_path / MARKER_FILE).read_text() == "preempted at step 5 (SIGUSR1)\n"


class _MaskProbe(IterableDataset):
    """Yields, from inside a DataLoader worker, whether SIGTERM is blocked there."""

    def __iter__(self):
        yield torch.tensor(int(signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])))


def test_first_pull_blocked_forks_workers_blocked_and_leaves_the_rank_signalled(tmp_path, watch_factory):
    """The evaluation's loader workers must not die of the rank's SIGTERM, but the rank must see it
    during the evaluation (not when the evaluation is over, as when all of it ran blocked)."""
    watch = watch_factory(tmp_path)
    loader = DataLoader(_MaskProbe(), batch_size=None, num_workers=1,
                        multiprocessing_context=multiprocessing.get_context("fork"))
    received_in_first_pull = []

    def items():
        for item in loader:  # the worker is forked by this first pull
            # Aimed at this thread: a process-directed kill may be taken by any other thread that
            # happens to be alive (an earlier test's), which does not block it.
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # pending: the first pull is still blocked
            received_in_first_pull.append(watch.signalled)
            yield item

    pulled = list(first_pull_blocked(items()))
    assert [int(x) for x in pulled] == [1]  # the worker was forked with SIGTERM blocked
    assert received_in_first_pull == [False] and watch.signal_name == "SIGTERM"  # delivered right after
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the rank's mask is back


def test_polled_stops_at_the_first_poll_after_the_flag_in_one_process():
    flag = {"up": False}

    def items():
        for i in range(100):
            if i == 7:
                flag["up"] = True
            yield i

    seen = []
    with pytest.raises(Preempted):
        for i in _polled(items(), lambda: flag["up"], 5, 1, torch.device("cpu")):
            seen.append(i)
    assert seen == list(range(10))  # polls before items 0, 5, 10: stopped at the third
    assert list(_polled(range(12), None, 5, 1, torch.device("cpu"))) == list(range(12))
    assert list(_polled(range(12), lambda: False, 5, 1, torch.device("cpu"))) == list(range(12))


def _rank(rank: int, store: str, lengths: list[int], stop_on: tuple[int, int] | None, out) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))
    seen, stopped = [], False
    try:
        for i in _polled(range(lengths[rank]), lambda: stop_on is not None and stop_on[0] == rank and len(seen) >= stop_on[1],
                         3, 2, torch.device("cpu")):
            seen.append(i)
    except Preempted:
        stopped = True
    dist.barrier()  # both ranks made the same collectives: nothing is left pending
    out.put((rank, seen, stopped))
    dist.destroy_process_group()


@pytest.mark.parametrize("stop_on", [None, (1, 2), (0, 6)], ids=["no-stop", "short-rank-stops", "long-rank-stops"])
def test_polled_agrees_over_ranks_with_unequal_shares(tmp_path, stop_on):
    """Two gloo processes, 8 and 5 items (evaluation shares differ by up to a batch), a poll every
    3 items: without a stop both see all their items and neither hangs; a flag on either rank
    stops both at the same poll."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path / "store"), [8, 5], stop_on, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (seen, stopped)) for r, seen, stopped in (out.get(timeout=60) for _ in procs))
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    if stop_on is None:
        assert results == {0: (list(range(8)), False), 1: (list(range(5)), False)}
    elif stop_on == (1, 2):  # rank 1's flag is up from its 2nd item: seen at the poll before item 3
        assert results == {0: ([0, 1, 2], True), 1: ([0, 1, 2], True)}
    else:  # rank 0's flag from its 6th item, after rank 1 ran out (5 items): the poll before item 6
        assert results == {0: (list(range(6)), True), 1: (list(range(5)), True)}


def test_train_state_owes_an_evaluation_only_when_the_checkpoint_says_so():
    """Checkpoints written before `eval_owed` existed load as owing nothing; the flag round-trips."""
    from distgan.checkpoint import TrainState

    old = TrainState()
    old.load_state_dict({"step": 40, "d_step": 40, "nimg": 320})
    assert (old.step, old.nimg, old.eval_owed) == (40, 320, False)
    owed = TrainState(step=4, d_step=4, nimg=32, eval_owed=True)
    again = TrainState()
    again.load_state_dict(owed.state_dict())
    assert again == owed
