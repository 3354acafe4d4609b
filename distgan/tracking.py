"""Run tracking from the main process: `metrics.jsonl` in the run folder, and W&B.

`metrics.jsonl` mirrors every scalar row, so nothing depends on the W&B server (`distgan report`
draws its curves from it).

W&B is driven with `wandb` directly, not through Accelerate's `WandBTracker`: that tracker's
start/log/finish write through `accelerate.logging`, which raises unless Accelerate's global
`PartialState` exists. The trainer is backend-agnostic (the DeepSpeed backend has no
Accelerator), and creating a PartialState from the main process alone may initialize a process
group from one rank. The tracker would also add nothing but a `wandb.init(project=...)` call:
`define_metric` and the summary need the `wandb.Run` anyway. `wandb` is imported only when on.

Step axis: every row carries `train/step` (distgan's generator step) and all metrics are plotted
against it (`define_metric("*", step_metric="train/step")`). W&B's own `_step` is left to count
log calls: after a requeue it would restart (offline runs ignore `resume`) or reject lower
steps, while `train/step` keeps increasing across requeues of the same run id.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import secrets
import string
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from distgan.config import Config

log = logging.getLogger("distgan")

STEP_KEY = "train/step"
"""distgan's own step key: the x axis of every W&B chart."""

_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "off"}


def wandb_credentials() -> bool:
    """True when W&B can log in without asking: WANDB_API_KEY, or a netrc entry for the API host."""
    if os.environ.get("WANDB_API_KEY", "").strip():
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    for name in filter(None, (os.environ.get("NETRC"), "~/.netrc", "~/_netrc")):
        path = Path(name).expanduser()
        try:
            if path.is_file() and netrc.netrc(str(path)).authenticators(host):
                return True
        except (netrc.NetrcParseError, OSError):
            continue  # an unreadable netrc is "no credentials", not a crash
    return False


def resolve_wandb_mode(setting: str) -> tuple[str, str]:
    """(`online`|`offline`|`off`, a hint for the log or "").

    `auto` honours an explicit WANDB_MODE from the environment, then goes online only with
    credentials; otherwise offline, never the interactive login prompt (which would hang a
    batch job). `online` without credentials also logs offline, with a warning, rather than
    raising: the tracker exists on the main process only, and an exception there alone would
    leave the other ranks waiting in their next collective until the timeout.
    """
    if setting == "off":
        return "off", ""
    if setting == "offline":
        return "offline", ""
    has_key = wandb_credentials()
    sync = "upload later with `wandb sync {dir}/wandb/offline-run-*`"
    if setting == "online":
        if has_key:
            return "online", ""
        return "offline", ("W&B: logging.wandb=online but no credentials were found (WANDB_API_KEY, or a ~/.netrc entry "
                           f"for api.wandb.ai from `wandb login`): logging offline instead; {sync}.")
    env = _ENV_MODES.get(os.environ.get("WANDB_MODE", "").strip().lower())
    if env:
        return env, ""
    if has_key:
        return "online", ""
    return "offline", f"W&B: no credentials found, logging offline; {sync}."


def new_run_id() -> str:
    """An 8-character base-36 id like W&B's own (from `secrets`: the training RNG is not touched)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class Tracker:
    """Writes scalar rows and images; a no-op on non-main ranks.

    `run_id` is the W&B run id from the checkpoint ("" on a fresh run); after construction
    `self.run_id` is the id in use, which the trainer stores in the next checkpoint.
    """

    def __init__(self, cfg: Config, run_dir: Path, is_main: bool, run_id: str = ""):
        self.cfg, self.run_dir, self.is_main = cfg, Path(run_dir), is_main
        self.run_id = run_id
        self.mode = "off"
        self._wandb = None  # the wandb.Run, main process only
        if is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a") if is_main else None
        if is_main:
            self.mode, hint = resolve_wandb_mode(cfg.logging.wandb)
            if self.mode != "off":
                self._start_wandb(hint)

    # ------------------------------------------------------------------ W&B
    def _start_wandb(self, hint: str) -> None:
        import wandb  # 1-2 s: only when W&B is on

        lg = self.cfg.logging
        self.run_id = self.run_id or new_run_id()
        # resume="allow" + a fixed id: a requeued job appends to the same run (online; offline
        # runs write a new folder with the same id, which `wandb sync` merges).
        kwargs: dict[str, Any] = dict(
            project=lg.project, id=self.run_id, resume="allow", name=self.cfg.train.name, dir=str(self.run_dir),
            entity=lg.entity or None, group=lg.group or None, tags=list(lg.tags) or None,
            config=self.cfg.to_dict(), mode=self.mode,
            # No stdout/stderr capture: tqdm and the rank logs stay untouched.
            settings=wandb.Settings(console="off"),
        )
        # A W&B failure must not kill a training job, nor raise on the main process alone (the
        # other ranks would wait in their next collective): online falls back to offline, and
        # offline to metrics.jsonl only. The other ranks do wait (in the first step's collective)
        # while this runs: each attempt is bounded by W&B's init_timeout (90 s by default), well
        # inside dist.timeout_s (default 1800 s).
        run = None
        for mode in (["online", "offline"] if self.mode == "online" else ["offline"]):
            try:
                kwargs["mode"] = self.mode = mode
                run = wandb.init(**kwargs)
                break
            except Exception as e:  # noqa: BLE001
                log.warning("W&B %s init failed (%s: %s).", mode, type(e).__name__, e)
        if run is None:
            self.mode = "off"
            log.warning("W&B is off for this run; metrics.jsonl still has every scalar.")
            return
        # Our step axis, so a requeued run continues on an increasing x axis (see module doc).
        run.define_metric(STEP_KEY)
        run.define_metric("*", step_metric=STEP_KEY)
        self._wandb = run
        if hint:
            (log.warning if self.cfg.logging.wandb == "online" else log.info)(hint.format(dir=self.run_dir))
        log.info("W&B run %s (%s) in %s", self.run_id, self.mode, self.run_dir / "wandb")

    # ------------------------------------------------------------------ logging
    def log(self, step: int, scalars: dict[str, Any]) -> None:
        """One row: numbers (NaN/inf kept as strings in the JSON mirror) and a few settings strings."""
        if not self.is_main:
            return
        row = {"step": step, **{k: _clean(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            values = {k: (float(v) if not isinstance(v, str) else v) for k, v in scalars.items()}
            self._wandb.log({**values, STEP_KEY: step})

    def log_image(self, step: int, name: str, path: Path, caption: str = "") -> None:
        """Images are already saved as PNGs in the run folder; W&B gets a copy of the file."""
        if self._wandb is None:
            return
        import wandb

        self._wandb.log({name: wandb.Image(str(path), caption=caption or Path(path).stem), STEP_KEY: step})

    def summary(self, values: dict[str, Any]) -> None:
        """Facts that are not curves (e.g. the best FID and where it was)."""
        if self._wandb is not None:
            self._wandb.summary.update(values)

    def alert(self, title: str, text: str) -> None:
        """A W&B alert (mail/Slack from the W&B app; an offline run keeps it for `wandb sync`).
        metrics.jsonl and the log carry the same text already, so this is W&B only."""
        if self._wandb is None:
            return
        import wandb

        try:
            # W&B rejects titles of 64 characters or more.
            self._wandb.alert(title=f"distgan {self.cfg.train.name}: {title}"[:63], text=text, level=wandb.AlertLevel.WARN)
        except Exception as e:  # noqa: BLE001 - an alert that cannot be sent must not stop training
            log.warning("W&B alert failed (%s: %s); the warning is in the log and metrics.jsonl.", type(e).__name__, e)

    def finish(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return value
    value = float(value)
    return value if math.isfinite(value) else str(value)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of `metrics.jsonl` as written (a resumed run may repeat steps; see `report.clean_rows`)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # A writer killed mid-line leaves a torn line (the resumed run appends to it): skip it.
            warnings.warn(f"skipping unreadable line {i} of {path}", stacklevel=2)
    return rows
