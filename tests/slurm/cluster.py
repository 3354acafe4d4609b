"""A real SLURM cluster on loopback, for tests: one slurmctld and two simulated nodes (n1, n2).

Everything lives in a private temp dir (config, state, logs, a private munged with its own key
and socket), on free TCP ports, so it never touches /etc/slurm, the system munged, or a cluster
another test session runs on the same machine. Clients find it through ``SLURM_CONF``: use
:meth:`SlurmCluster.env` (or the helpers here, which use it).

Needs the Debian packages ``slurmctld slurmd slurm-client munge`` (``.ci/install-slurm.sh``, as
root). The daemons run as whoever starts the cluster: ``SlurmUser``/``SlurmdUser`` are the current
user, so an ordinary user runs it too (slurmd then starts only that user's jobs, without setuid,
which is all the tests submit; seen working with Debian 12's slurm 22.05). Where the system refuses
a non-root slurmd, :meth:`SlurmCluster.start` raises :class:`ClusterUnavailable` with the daemon
logs (the tests skip, saying so); as root a failed start is an error. Debian's slurm is built with MULTIPLE_SLURMD,
so several slurmd's share the host: each node has its own ``Port=`` and runs ``slurmd -N name``.

Cleanup: :meth:`SlurmCluster.stop` cancels all jobs, stops the daemons it started (TERM, then
KILL), then kills any process still carrying this cluster's marker variable in its environment
(slurmstepd's and job processes outlive slurmd otherwise). A watchdog process does the same if
the owning process dies without calling ``stop`` (e.g. pytest killed with SIGKILL).

Command line (for debugging): ``python tests/slurm/cluster.py up`` starts a cluster, prints the
``export SLURM_CONF=...`` line and stays in the foreground until Ctrl-C.
"""

from __future__ import annotations

import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARKER = "DISTGAN_SLURM_FIXTURE"
"""Environment variable set on every daemon and every job submitted through the helpers; its value
is ``<owner pid>:<base dir>``. Teardown kills whatever still carries it."""

NEEDED = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel",
          "munged", "munge", "mungekey")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                   "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"}
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin"])
_REPO = Path(__file__).resolve().parents[2]


class ClusterUnavailable(RuntimeError):
    """The cluster cannot run on this machine (slurm missing and not installable, or the daemons
    refused to start for a non-root user)."""


def which(name: str) -> str | None:
    return shutil.which(name, path=_SEARCH_PATH)


def missing_binaries() -> list[str]:
    return [b for b in NEEDED if which(b) is None]


def ensure_installed(allow_install: bool = True) -> None:
    """Raise ClusterUnavailable with the reason if the cluster cannot run here.

    Installs the packages with ``.ci/install-slurm.sh`` (apt) when they are missing, we are root,
    and ``allow_install`` is true (env ``DISTGAN_SLURM_NO_INSTALL=1`` turns it off).
    """
    missing = missing_binaries()
    if not missing:
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"slurm binaries missing ({', '.join(missing)}) and running as uid {os.geteuid()}, "
                                 "not root: apt-get cannot install them; run .ci/install-slurm.sh as root once "
                                 "(then these tests run as this user), or run the suite as root (.ci/run does)")
    if not allow_install or os.environ.get("DISTGAN_SLURM_NO_INSTALL") == "1":
        raise ClusterUnavailable(f"slurm binaries missing ({', '.join(missing)}); run .ci/install-slurm.sh")
    if which("apt-get") is None:
        raise ClusterUnavailable(f"slurm binaries missing ({', '.join(missing)}) and apt-get unavailable")
    script = _REPO / ".ci" / "install-slurm.sh"
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
    missing = missing_binaries()
    if proc.returncode != 0 or missing:
        raise ClusterUnavailable(
            f"installing slurm failed (rc={proc.returncode}, still missing {missing}):\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def parse_kv(line: str) -> dict[str, str]:
    """Parse one line of ``scontrol show ... -o`` (``Key=value Key2=value with spaces ...``)."""
    keys = list(re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/.]*)=", line))
    out: dict[str, str] = {}
    for i, m in enumerate(keys):
        end = keys[i + 1].start() if i + 1 < len(keys) else len(line)
        out.setdefault(m.group(1), line[m.end():end].strip())
    return out


# --------------------------------------------------------------------------------------------
# Finding and killing what a cluster left behind (by the marker in /proc/<pid>/environ)


def _marked_processes(predicate) -> list[int]:
    me = os.getpid()
    ancestors = set()
    pid = me
    while pid > 1:
        ancestors.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in ancestors:
            continue
        try:
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        for item in env.split(b"\0"):
            if item.startswith(MARKER.encode() + b"="):
                if predicate(item.split(b"=", 1)[1].decode(errors="replace")):
                    found.append(int(d.name))
                break
    return found


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie counts as dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_orphans() -> list[int]:
    """Kill processes of fixture clusters whose owning process is gone (a crashed earlier run)."""
    def orphan(value: str) -> bool:
        owner = value.split(":", 1)[0]
        return owner.isdigit() and not _pid_alive(int(owner))
    pids = _marked_processes(orphan)
    _kill_all(pids)
    return pids


def _watchdog(owner: int, marker_value: str) -> None:
    """Runs detached: when ``owner`` dies, kill everything carrying ``marker_value``."""
    os.environ.pop(MARKER, None)
    while _pid_alive(owner):
        time.sleep(1.0)
    for _ in range(3):
        _kill_all(_marked_processes(lambda v: v == marker_value))
        time.sleep(0.5)
    base = marker_value.split(":", 1)[1]
    if os.environ.get("DISTGAN_SLURM_KEEP") != "1" and Path(base).name.startswith("distgan-slurm-"):
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------------------------


class SlurmCluster:
    """A loopback SLURM cluster. ``with SlurmCluster() as c: jid = c.sbatch("job.sh")``."""

    def __init__(self, nodes: tuple[str, ...] = ("n1", "n2"), cpus_per_node: int = 8,
                 mem_mb: int = 4000, base: str | os.PathLike | None = None, keep: bool | None = None):
        self.nodes = tuple(nodes)
        self.cpus_per_node = cpus_per_node
        self.mem_mb = mem_mb
        self._own_base = base is None
        self.base = Path(base) if base else Path(tempfile.mkdtemp(prefix="distgan-slurm-", dir="/tmp"))
        self.keep = os.environ.get("DISTGAN_SLURM_KEEP") == "1" if keep is None else keep
        self.conf = self.base / "etc" / "slurm.conf"
        self.munge_socket = self.base / "munge" / "munge.socket"
        self.marker = f"{os.getpid()}:{self.base}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.startup_seconds: float | None = None
        self.ports: dict[str, int] = {}
        # Daemons run as this user; a non-root slurmd starts only this user's jobs (no setuid).
        self.user = pwd.getpwuid(os.geteuid()).pw_name

    # -- environment -------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        """Environment for clients and submitted jobs: the caller's env + SLURM_CONF + marker."""
        env = dict(os.environ)
        for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            del env[k]  # never leak an outer allocation's settings into this cluster
        env["PATH"] = _SEARCH_PATH if "/usr/sbin" not in env.get("PATH", "") else env["PATH"]
        env["SLURM_CONF"] = str(self.conf)
        env[MARKER] = self.marker
        env.update({k: str(v) for k, v in extra.items()})
        return env

    # -- lifecycle ---------------------------------------------------------------------------
    def _write_conf(self) -> None:
        for d in ("etc", "state/ctld", "log", "run", "munge"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        for n in self.nodes:
            (self.base / "state" / f"slurmd-{n}").mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)
        os.chmod(self.base / "munge", 0o755)
        ctld, slurmd, *node_ports = free_ports(2 + len(self.nodes))
        self.ports = {"slurmctld": ctld, "slurmd": slurmd, **dict(zip(self.nodes, node_ports))}
        b = self.base
        # Random job ids: slurm/train.sh derives its rendezvous port from the job id, and two test
        # sessions on one machine must not both start at job 1.
        first_job_id = random.randint(1, 4000) * 1000 + 1
        lines = f"""\
# Written by tests/slurm/cluster.py: a loopback test cluster. Not for production.
ClusterName=distgantest
FirstJobId={first_job_id}
SlurmctldHost=localhost
SlurmUser={self.user}
SlurmdUser={self.user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
SlurmctldPort={ctld}
SlurmdPort={slurmd}
StateSaveLocation={b}/state/ctld
SlurmdSpoolDir={b}/state/slurmd-%n
SlurmctldPidFile={b}/run/slurmctld.pid
SlurmdPidFile={b}/run/slurmd-%n.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_min_interval=0
JobRequeue=1
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=3
"""
        for n in self.nodes:
            lines += (f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={self.ports[n]} "
                      f"CPUs={self.cpus_per_node} RealMemory={self.mem_mb} State=UNKNOWN\n")
        lines += "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
        self.conf.write_text(lines)
        # Read by slurmd; with proctrack/linuxproc + task/none no cgroup plugin is loaded.
        (b / "etc" / "cgroup.conf").write_text(
            "# No cgroups in the loopback test cluster (proctrack/linuxproc, task/none).\n"
            "CgroupAutomount=no\nConstrainCores=no\nConstrainRAMSpace=no\nConstrainDevices=no\n")

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        out = open(self.base / "log" / f"{name}.out", "wb")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             env=self.env(), start_new_session=True, cwd=self.base)
        out.close()
        self.procs[name] = p
        return p

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if name != "watchdog" and p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}\n{self.logs()}")

    def start(self, timeout: float = 30.0) -> "SlurmCluster":
        ensure_installed()
        kill_orphans()
        t0 = time.monotonic()
        self._write_conf()
        # Watchdog first: whatever happens next, the daemons die with their owner.
        self.procs["watchdog"] = subprocess.Popen(
            [sys.executable, __file__, "--watchdog", str(os.getpid()), self.marker],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, env={k: v for k, v in os.environ.items() if k != MARKER})
        try:
            key = self.base / "munge" / "munge.key"
            subprocess.run([which("mungekey"), "--create", f"--keyfile={key}"], check=True,
                           capture_output=True, timeout=30)
            self._spawn("munged", [which("munged"), "--foreground", "--force",
                                   f"--socket={self.munge_socket}", f"--key-file={key}",
                                   f"--pid-file={self.base}/run/munged.pid",
                                   f"--log-file={self.base}/log/munged.log",
                                   f"--seed-file={self.base}/munge/munged.seed"])
            self._wait(lambda: self.munge_socket.exists(), 10, "munged socket")
            self._spawn("slurmctld", [which("slurmctld"), "-D", "-c", "-i", "-f", str(self.conf)])
            for n in self.nodes:
                self._spawn(f"slurmd-{n}", [which("slurmd"), "-D", "-N", n, "-f", str(self.conf)])

            def idle() -> bool:
                self._check_alive()
                r = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=10)
                states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
                return r.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes)
            self._wait(idle, timeout, "nodes idle")
        except BaseException as exc:
            logs = self.logs(20) if isinstance(exc, Exception) and os.geteuid() != 0 else ""
            self.stop()
            if logs:  # the system refused an ordinary user's daemons: a reason to skip, not a failure
                cause = (str(exc).splitlines() or [type(exc).__name__])[0]
                raise ClusterUnavailable(
                    f"as uid {os.geteuid()} ({self.user}, not root) the daemons did not come up ({cause}); this "
                    "system seems to need root for slurmd/munged here (.ci/run runs the suite as root). Daemon "
                    f"logs:\n{logs}") from exc
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Cancel all jobs, stop all daemons, kill leftovers. Safe to call twice."""
        if not self.procs:
            return
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            r = self.run("squeue", "-h", "-o", "%A", check=False, timeout=10)
            jobs = r.stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False, timeout=10)
                self._wait(lambda: not self.run("squeue", "-h", "-o", "%A", check=False,
                                                timeout=10).stdout.strip(), 15, None)
        order = [n for n in self.procs if n.startswith("slurmd-")] + ["slurmctld", "munged"]
        for name in order:
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                p.terminate()
        for name in order:
            p = self.procs.get(name)
            if p is None:
                continue
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        for _ in range(3):  # slurmstepd's and job processes that outlived slurmd
            pids = _marked_processes(lambda v: v == self.marker)
            if not pids:
                break
            _kill_all(pids)
            time.sleep(0.3)
        wd = self.procs.get("watchdog")
        if wd is not None and wd.poll() is None:
            wd.kill()
            wd.wait(timeout=10)
        self.procs.clear()
        if self._own_base and not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @staticmethod
    def _wait(cond, timeout: float, what: str | None, interval: float = 0.1) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if cond():
                return True
            if time.monotonic() > deadline:
                if what is None:
                    return False
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(interval)

    def logs(self, lines: int = 40) -> str:
        """Tails of the daemon logs, for failure messages."""
        out = []
        for f in sorted((self.base / "log").glob("*")):
            try:
                text = f.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            out.append(f"==> {f} <==\n" + "\n".join(text))
        return "\n".join(out)

    # -- clients -----------------------------------------------------------------------------
    def run(self, cmd: str, *args: str, check: bool = True, timeout: float = 30,
            env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None
            ) -> subprocess.CompletedProcess:
        """Run a slurm client command against this cluster."""
        r = subprocess.run([which(cmd) or cmd, *map(str, args)], capture_output=True, text=True,
                           timeout=timeout, env=env or self.env(), cwd=cwd)
        if check and r.returncode != 0:
            raise RuntimeError(f"{cmd} {' '.join(map(str, args))} failed ({r.returncode}):\n"
                               f"{r.stdout}{r.stderr}")
        return r

    def scontrol(self, *args: str, check: bool = True) -> str:
        return self.run("scontrol", *args, check=check).stdout

    def sbatch(self, script: str | os.PathLike, *args: str, sbatch_args: tuple[str, ...] = (),
               cwd: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> str:
        """Submit ``script`` (with ``args`` after it); returns the job id.

        ``sbatch_args`` go before the script (``("--nodes", "2")``). ``env`` adds variables to
        the submission environment; jobs get all of it (``--export=ALL``).
        """
        r = self.run("sbatch", "--parsable", "--export=ALL", *sbatch_args, str(script), *args,
                     env=self.env(**(env or {})), cwd=cwd)
        return r.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        out = self.scontrol("show", "job", "-o", str(job_id))
        return parse_kv(out.strip().splitlines()[0]) if out.strip() else {}

    def job_state(self, job_id: str) -> str:
        """Base state: PENDING, RUNNING, COMPLETING, COMPLETED, FAILED, ... ('' if unknown)."""
        return self.job_info(job_id).get("JobState", "")

    def wait_state(self, job_id: str, states, timeout: float = 60, interval: float = 0.2,
                   min_restarts: int = 0) -> dict[str, str]:
        """Wait until the job is in one of ``states`` (with Restarts >= min_restarts)."""
        states = {states} if isinstance(states, str) else set(states)
        info: dict[str, str] = {}

        def ok() -> bool:
            nonlocal info
            info = self.job_info(job_id)
            return info.get("JobState") in states and int(info.get("Restarts", 0)) >= min_restarts
        if not self._wait(ok, timeout, None, interval):
            raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout}s: "
                               f"{info.get('JobState')} restarts={info.get('Restarts')} "
                               f"reason={info.get('Reason')}\n{self.logs(15)}")
        return info

    def wait_job(self, job_id: str, timeout: float = 60) -> str:
        """Wait until the job has finished for good (a requeued job is not finished); return its
        final state (COMPLETED, FAILED, CANCELLED, ...). Raises TimeoutError."""
        return self.wait_state(job_id, TERMINAL_STATES, timeout)["JobState"]

    def requeue_fast(self, job_id: str, restarts: int = 1, timeout: float = 60,
                     delay: int = 2) -> dict[str, str]:
        """After the job was requeued (Restarts >= ``restarts``, back to PENDING), make it start
        in ``delay`` seconds instead of after the credential expiry (cred_expire=10 -> ~11-25 s).

        ``delay`` must be >= 1: slurmd revokes the job's credential when it kills the first run and
        compares times in whole seconds, so a restart within the same second fails to launch
        (slurmd: "Job N already killed, do not launch batch job ... Job credential revoked"; the
        job ends FAILED with RunTime 0). 2 s leaves a margin.
        """
        info = self.wait_state(job_id, {"PENDING", "RUNNING", *TERMINAL_STATES}, timeout,
                               min_restarts=restarts)
        if info["JobState"] == "PENDING":
            r = self.run("scontrol", "update", f"JobId={job_id}", f"StartTime=now+{delay}",
                         check=False)
            if r.returncode != 0 and self.job_state(job_id) == "PENDING":
                raise RuntimeError(f"scontrol update StartTime=now failed: {r.stdout}{r.stderr}")
        return info

    def signal_batch(self, job_id: str, sig: str = "USR1") -> None:
        """What ``--signal=B:USR1@T`` does at T seconds before the limit: signal the batch shell."""
        self.run("scancel", f"--signal={sig}", "--batch", str(job_id))

    def hostnames(self, nodelist: str) -> list[str]:
        return self.scontrol("show", "hostnames", nodelist).split()


def main(argv: list[str]) -> int:
    if argv[:1] == ["--watchdog"]:
        _watchdog(int(argv[1]), argv[2])
        return 0
    if argv[:1] == ["up"]:
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        with SlurmCluster() as c:
            print(f"cluster up in {c.startup_seconds:.2f}s; nodes {', '.join(c.nodes)}")
            print(f"export SLURM_CONF={c.conf} {MARKER}={c.marker}")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
