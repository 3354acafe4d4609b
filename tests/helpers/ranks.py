"""A minimal multi-process launcher for tests: `python tests/helpers/ranks.py N PID_DIR -- ARGS`.

It does what `torchrun --nproc_per_node N` does for a CPU run (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR/PORT in each process's environment; accelerate then forms a gloo group), but the
ranks are forked from one process that has already imported torch and distgan, which saves
several seconds per launch on a small CI machine. Each rank trains like `distgan train ARGS`
(through `rank_harness.main`, so DISTGAN_TEST_* behaviours apply) and writes its pid to
PID_DIR/rank-R.pid (so a test can signal one rank). The exit code is the ranks'
common exit code (17 when all were preempted), else the first non-zero one; a rank killed by a
signal counts as 128 + the signal number.

The training path is the same as under `accelerate launch`; tests that need the real launcher
(its exit-code behaviour, signal forwarding) use it directly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rank_harness import main as train_main  # a sibling script; imports torch and distgan once, before forking

from distgan.distributed import free_port

def main(argv: list[str]) -> int:
    n, pid_dir, sep, *args = argv
    assert sep == "--", "usage: ranks.py N PID_DIR -- TRAIN_ARGS"
    n, pid_dir = int(n), Path(pid_dir)
    pid_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    pids = []
    for rank in range(n):
        pid = os.fork()
        if pid == 0:
            if n > 1:  # N=1: a plain `distgan train` process, as without a launcher
                os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                                  GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                  ACCELERATE_USE_CPU="1")
            (pid_dir / f"rank-{rank}.pid").write_text(str(os.getpid()))
            code = 1
            try:
                code = train_main(args)
            except BaseException:  # noqa: BLE001 - report, then exit like a crashed rank
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    codes = []
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        codes.append(os.waitstatus_to_exitcode(status))
    codes = [128 - c if c < 0 else c for c in codes]
    print(f"ranks.py: exit codes {codes}", file=sys.stderr, flush=True)
    if len(set(codes)) == 1:
        return codes[0]
    return next(c for c in codes if c)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
