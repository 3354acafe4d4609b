"""Process facts in one place: who this process is, whether the launcher started what was asked,
and how a failure on one rank stops the others with a message that names it.

* `discover()` reads rank/world from the launcher's environment: torchrun / `accelerate launch`
  / the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK, ...), a SLURM step started with one
  task per process (`srun --ntasks-per-node=8 python distgan/train.py`), or Open MPI.
  `export_env()` writes what it found back as the torchrun variables, so that
  `init_process_group("env://")`, accelerate and deepspeed all read one consistent set.
* `check_world_size()` stops a run whose world size differs from the one asked for, explicitly
  (`dist.expect_world_size`) or as announced by the launcher (WORLD_SIZE, or the
  `accelerate launch` command line: `--cpu --num_processes 2` silently starts ONE process).
* `fail_fast()` wraps the training of every rank: a rank that raises posts its error in the
  rendezvous store before it exits; a rank whose collective then fails (peer gone, or
  `dist.timeout_s` passed) raises `PeerFailureError` naming the failed rank. That is gloo's
  behaviour: under NCCL a timed-out collective makes the watchdog abort the process (SIGABRT,
  TORCH_NCCL_ASYNC_ERROR_HANDLING), no `except` runs and nothing is named; hence the long
  default timeout (1800 s), which must outlast any work one rank does while the others wait.
* `cpu_share()` splits a node's SLURM CPU allocation between its ranks (loader workers and
  threads per rank); slurm/train.sh asks it through `python -m distgan.distributed cpu-share`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from distgan.errors import PeerFailureError, WorldSizeError

log = logging.getLogger("distgan")


# ---------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"
    """Who announced it: torchrun (also accelerate/deepspeed launchers), slurm, mpi or single."""


def _int(env: Mapping[str, str], *names: str, default: int) -> int:
    for name in names:
        value = env.get(name, "")
        if value.strip().lstrip("-").isdigit():
            return int(value)
    return default


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: `gpu[03-05,7],cpu1` -> `gpu03` (zero padding kept)."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not head:
        return nodelist
    prefix, ranges = head.group(1), head.group(3)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def discover(env: Mapping[str, str] | None = None) -> ProcessInfo:
    """Rank/world from the environment; torchrun variables win over SLURM/MPI ones (under
    slurm/train.sh, srun starts one `accelerate launch` per node, which sets RANK etc.)."""
    env = os.environ if env is None else env
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = _int(env, "MASTER_PORT", default=29500)
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE", default=1)
        local_world = _int(env, "LOCAL_WORLD_SIZE", default=world)
        return ProcessInfo(_int(env, "RANK", default=0), world, _int(env, "LOCAL_RANK", default=0), local_world,
                           _int(env, "GROUP_RANK", "NODE_RANK", default=0), addr, port, "torchrun")
    # Inside an srun step (SLURM_STEP_NUM_TASKS is only set there, not in the batch shell,
    # whose SLURM_NTASKS counts tasks that this process is not one of).
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        world = _int(env, "SLURM_STEP_NUM_TASKS", default=1)
        nodes = _int(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", default=1)
        if "MASTER_ADDR" not in env:
            addr = first_slurm_host(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        if "MASTER_PORT" not in env:
            port = 20000 + _int(env, "SLURM_JOB_ID", default=0) % 20000  # the port slurm/train.sh uses
        return ProcessInfo(_int(env, "SLURM_PROCID", default=0), world, _int(env, "SLURM_LOCALID", default=0),
                           max(1, world // max(1, nodes)), _int(env, "SLURM_NODEID", default=0), addr, port, "slurm")
    if "OMPI_COMM_WORLD_RANK" in env:
        world = _int(env, "OMPI_COMM_WORLD_SIZE", default=1)
        return ProcessInfo(_int(env, "OMPI_COMM_WORLD_RANK", default=0), world,
                           _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", default=0),
                           _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", default=world), 0, addr, port, "mpi")
    return ProcessInfo(master_addr=addr, master_port=port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_env(info: ProcessInfo | None = None, single_free_port: bool = False) -> ProcessInfo:
    """Set RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT where unset.

    `single_free_port`: a process started without a launcher gets a free port instead of 29500
    (deepspeed always opens a process group, and two single runs on one machine would clash).
    """
    info = info or discover()
    if info.source == "single" and single_free_port and "MASTER_PORT" not in os.environ:
        info = ProcessInfo(master_addr=info.master_addr, master_port=free_port())
    values = {"RANK": info.rank, "WORLD_SIZE": info.world_size, "LOCAL_RANK": info.local_rank,
              "LOCAL_WORLD_SIZE": info.local_world_size, "MASTER_ADDR": info.master_addr,
              "MASTER_PORT": info.master_port}
    for name, value in values.items():
        os.environ.setdefault(name, str(value))
    return info


# ---------------------------------------------------------------------------- CPUs of an allocation


MAX_GPU_WORKERS = 8
"""More loader workers per GPU rank than this only add memory (each holds its prefetched batches)."""


@dataclass(frozen=True)
class CpuShare:
    """How one node's CPUs are split between the ranks on it."""

    node_cpus: int
    ranks: int
    per_rank: int
    workers: int
    """DataLoader workers per rank (`data.workers`)."""
    threads: int
    """Compute threads per rank (OMP_NUM_THREADS)."""

    def shell(self) -> str:
        """Shell assignments for slurm/train.sh (`eval "$(python -m distgan.distributed cpu-share ...)"`)."""
        return (f"NODE_CPUS={self.node_cpus} CPUS_PER_RANK={self.per_rank} DATA_WORKERS={self.workers} "
                f"OMP_THREADS={self.threads}")


def allocated_cpus(env: Mapping[str, str] | None = None) -> int | None:
    """CPUs this job holds on this node under SLURM: SLURM_CPUS_PER_TASK (train.sh runs one task per
    node, which holds all of the node's ranks), else SLURM_CPUS_ON_NODE; None outside SLURM."""
    env = os.environ if env is None else env
    cpus = _int(env, "SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE", default=0)
    return cpus if cpus > 0 else None


def cpu_share(node_cpus: int, ranks: int, on_gpu: bool) -> CpuShare:
    """Split `node_cpus` between `ranks` processes, so that workers and threads do not oversubscribe.

    A GPU rank computes on its GPU: one CPU drives it and the rest of its share decodes data
    (workers = share - 1, at most MAX_GPU_WORKERS). A CPU rank computes with its own threads:
    one worker decodes (small images decode far faster than a step trains) when the share has
    room for it, and the rest are compute threads. A share of 1 CPU gets no worker: decoding then
    runs in the rank itself rather than competing with it."""
    ranks = max(1, ranks)
    per_rank = max(1, node_cpus // ranks)
    workers = min(MAX_GPU_WORKERS, per_rank - 1) if on_gpu else min(1, per_rank - 1)
    return CpuShare(node_cpus, ranks, per_rank, workers, max(1, per_rank - workers))


# ---------------------------------------------------------------------------- world size


def _accelerate_config_processes(path: Path) -> int:
    try:
        import yaml

        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, ValueError):
        return 0
    value = data.get("num_processes", 0) if isinstance(data, dict) else 0
    return int(value) if isinstance(value, int) else 0


def _default_accelerate_config() -> Path:
    home = os.environ.get("HF_HOME", os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"))
    return Path(os.environ.get("ACCELERATE_CONFIG_FILE", Path(home) / "accelerate" / "default_config.yaml")).expanduser()


def parse_accelerate_launch(argv: list[str]) -> int:
    """Processes an `accelerate launch` command line asks for (0: not such a command / not said).

    Reads `--num_processes N` (also `=N`), else `num_processes` of `--config_file F`, else of the
    default accelerate config. Arguments after the training script belong to the script.
    """
    argv = [a for a in argv if a]
    try:
        # `.../bin/accelerate launch` or `python -m accelerate.commands.accelerate_cli launch`
        i = next(i for i, a in enumerate(argv) if a == "launch" and i > 0 and "accelerate" in argv[i - 1])
    except StopIteration:
        return 0
    launch_args: list[str] = []
    for arg in argv[i + 1:]:
        if arg.endswith(".py") or arg == "-m":
            break
        launch_args.append(arg)
    config = None
    for j, arg in enumerate(launch_args):
        name, _, inline = arg.partition("=")
        value = inline or (launch_args[j + 1] if j + 1 < len(launch_args) else "")
        if name in ("--num_processes", "--num-processes") and value.isdigit():
            return int(value)
        if name in ("--config_file", "--config-file"):
            config = Path(value)
    return _accelerate_config_processes(config or _default_accelerate_config())


def _parent_cmdline() -> list[str]:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")


def requested_world_size(env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """(processes the launcher was asked for, how we know), or (0, "") when nothing says.

    WORLD_SIZE comes from torchrun-style launchers. `accelerate launch --cpu --num_processes 2`
    starts one process and exports nothing that says 2, so the parent's command line (Linux
    /proc) is read as well: the parent of the training process is the launcher itself.
    """
    env = os.environ if env is None else env
    if env.get("DISTGAN_SKIP_LAUNCH_CHECK") == "1":
        return 0, ""
    if "WORLD_SIZE" in env:
        return _int(env, "WORLD_SIZE", default=0), "WORLD_SIZE set by the launcher"
    parent = _parent_cmdline()
    asked = parse_accelerate_launch(parent)
    if asked:
        return asked, "by the `accelerate launch` command line or its config file"
    return 0, ""


_CPU_HINT = (" Without GPUs, `accelerate launch --cpu --num_processes N` (or a MULTI_CPU config without mpirun) "
             "starts ONE process: use `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N "
             "--num_machines 1 --dynamo_backend no distgan/train.py`, `--config_file launch/cpu-2proc.yaml`, or "
             "`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N distgan/train.py` (see launch/README.md).")


def check_world_size(expected: int, actual: int) -> None:
    """Stop when N processes were asked for and a different number exist.

    `expected` is `dist.expect_world_size` (0: not given); the launcher's own request is
    checked as well, so a silent single-process run is caught without the option.
    """
    if expected and expected != actual:
        hint = _CPU_HINT if actual == 1 else ""
        raise WorldSizeError(f"dist.expect_world_size={expected} but the launcher started {actual} process(es).{hint}")
    asked, how = requested_world_size()
    if asked and asked != actual:
        hint = _CPU_HINT if actual == 1 else ""
        raise WorldSizeError(f"{asked} processes were asked for ({how}) but the process group has {actual}; "
                             f"every process would train alone on the full data.{hint}")


# ---------------------------------------------------------------------------- failures

_FAIL_KEY = "distgan/failed/"
_STUCK_KEY = "distgan/collective-failed/"


def _default_store():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - a missing store only loses the failed rank's name
        return None


def _post(key: str, value: str) -> None:
    store = _default_store()
    if store is None:
        return
    try:
        store.set(key, value[:2000])
    except Exception:  # noqa: BLE001 - the store may be gone with a dead rank 0
        pass


def _read(prefix: str, world_size: int) -> dict[int, str]:
    store = _default_store()
    found: dict[int, str] = {}
    if store is None:
        return found
    for r in range(world_size):
        try:
            if store.check([f"{prefix}{r}"]):
                found[r] = store.get(f"{prefix}{r}").decode(errors="replace")
        except Exception:  # noqa: BLE001
            break
    return found


def announce_failure(rank: int, error: BaseException) -> None:
    """Post this rank's error where the other ranks can read it (best effort, never raises)."""
    _post(f"{_FAIL_KEY}{rank}", f"{type(error).__name__}: {error}")


def reported_failures(world_size: int) -> dict[int, str]:
    """Errors ranks posted with `announce_failure` (empty when none or no store)."""
    return _read(_FAIL_KEY, world_size)


def _is_collective_failure(error: BaseException) -> bool:
    import torch.distributed as dist

    kinds = tuple(k for k in (getattr(dist, "DistError", None),) if k is not None)
    if kinds and isinstance(error, kinds):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("gloo", "nccl", "timed out", "connection closed", "connection reset", "broken pipe"))


def explain_collective_failure(rank: int, world_size: int, timeout_s: float, error: BaseException,
                               grace_s: float | None = None) -> str:
    """Who is to blame when this rank's collective failed: a rank that posted an error, else the
    ranks that stayed silent (neither an error nor a failed collective of their own within a
    short grace: killed, crashed hard, or hung)."""
    import time

    _post(f"{_STUCK_KEY}{rank}", "1")
    grace = min(10.0, max(2.0, timeout_s / 2)) if grace_s is None else grace_s
    deadline = time.monotonic() + grace
    failed: dict[int, str] = {}
    silent: list[int] = []
    while True:
        failed = {r: m for r, m in reported_failures(world_size).items() if r != rank}
        stuck = _read(_STUCK_KEY, world_size)
        silent = [r for r in range(world_size) if r != rank and r not in failed and r not in stuck]
        if failed or not silent or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    first = str(error).splitlines()[0][:200] if str(error) else ""
    if failed:
        named = "; ".join(f"rank {r}: {m}" for r, m in sorted(failed.items()))
        return f"rank {rank} stopped because another rank failed ({named})"
    if silent:
        who = ", ".join(str(r) for r in silent)
        return (f"rank {rank} stopped: rank(s) {who} stopped taking part in collectives without reporting an error "
                f"(killed, crashed hard, or hung for more than dist.timeout_s={timeout_s:g} s). "
                f"This rank saw {type(error).__name__}: {first}")
    return (f"rank {rank} stopped: a collective failed or waited more than dist.timeout_s={timeout_s:g} s "
            f"({type(error).__name__}: {first}); no rank reported an error. The launcher's report names the process.")


@contextlib.contextmanager
def fail_fast(rank: int, world_size: int, timeout_s: float) -> Iterator[None]:
    """Around a rank's training: turn "a collective failed" into an error naming the failed rank.

    A rank that raises posts its error first; its peers, blocked in their next collective,
    fail as soon as its sockets close (or after `timeout_s` when it hangs), and name it. The
    launcher (torchrun, accelerate launch) then stops the remaining processes.
    """
    try:
        yield
    except Exception as error:
        if world_size <= 1:
            raise
        if not _is_collective_failure(error):
            announce_failure(rank, error)
            log.error("rank %d failed: %s: %s", rank, type(error).__name__, error)
            raise
        message = explain_collective_failure(rank, world_size, timeout_s, error)
        log.error("%s", message)
        raise PeerFailureError(message) from error


def _main(argv: list[str]) -> int:
    """`python -m distgan.distributed cpu-share RANKS_PER_NODE gpu|cpu`: the split of this node's
    SLURM allocation as shell assignments (slurm/train.sh); exit 1 outside SLURM."""
    if len(argv) != 3 or argv[0] != "cpu-share" or argv[2] not in ("gpu", "cpu") or not argv[1].isdigit():
        print("usage: python -m distgan.distributed cpu-share RANKS_PER_NODE gpu|cpu", file=sys.stderr)
        return 2
    cpus = allocated_cpus()
    if cpus is None:
        print("distgan.distributed cpu-share: neither SLURM_CPUS_PER_TASK nor SLURM_CPUS_ON_NODE is set", file=sys.stderr)
        return 1
    print(cpu_share(cpus, int(argv[1]), argv[2] == "gpu").shell())
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
