"""Complete, crash-safe checkpoints that load without unpickling code.

Layout of one checkpoint (`<run>/checkpoints/step-000001000/`):

    G.safetensors  D.safetensors  G_ema.safetensors   weights (safetensors)
    optim_G.pt  optim_D.pt  (or the backend's own)    optimizer state, written by the backend
                                                     (torch.load(weights_only=True) reads it back)
    rank-00000.json  rank-00000.safetensors           per-rank RNG states and data position
    state.json                                        counters, backend extras, schedulers, W&B id, config
    manifest.json                                     sha256 of every file above, written last

It is written into `step-...tmp`, fsynced, renamed into place when complete, and only then is the
`latest` pointer replaced, so a crash at any moment leaves the previous checkpoint untouched. A
checkpoint whose manifest is missing or does not match is skipped (with a warning) in favour of
the previous one. Every rank calls `save`/`load`: saving is a collective for backends that shard
state, so it never sits inside a main-process-only branch. `checkpoints/best` holds a copy
(hard links) of the checkpoint with the best evaluation metric, described by `best.json`.

Resume (`train.resume`): `auto` takes the newest valid checkpoint of the run folder (a fresh start
when there is none); `PATH` a given checkpoint or run folder, which must be valid (no fallback),
and this run's checkpoints at or after its step are renamed `*.superseded-<time>` (a rollback
never mixes two timelines, and nothing is deleted); `none` refuses a run folder that already has
checkpoints, since training from scratch there would interleave two runs and let pruning delete
the old run's checkpoints: pick a new run folder or delete the old one.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from distgan.backends.base import Backend
from distgan.checkpoint_io import (CheckpointError, RngState, check_resume_compatible, describe_write_error, fingerprint,
                                   fsync_dir, fsync_tree, json_to_tensor, link_or_copy, pause_for_tests, rng_state,
                                   set_rng_state, sha256, tensor_to_json)

MANIFEST = "manifest.json"
LATEST = "latest"
BEST = "best"
BEST_INFO = "best.json"
_STEP_DIR = re.compile(r"step-(\d{9})$")

__all__ = ["Checkpointer", "CheckpointError", "TrainState", "Restored", "verify", "load_weights", "read_config",
           "resolve_checkpoint", "set_rng_state", "check_resume_compatible"]


@dataclass
class TrainState:
    """Counters of a run: everything besides tensors that resume needs."""

    step: int = 0
    """Generator steps done."""
    d_step: int = 0
    """Discriminator main steps done (drives the lazy-regularization interval)."""
    nimg: int = 0
    """Real images shown to D, summed over ranks (kimg = nimg / 1000)."""
    wandb_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Restored:
    """What `Checkpointer.load` found. `rng` is applied by the trainer right before its next step
    (not at load time), so whatever consumes random numbers while the loop is being set up
    (tracker, data iterator) cannot shift the resumed run away from the uninterrupted one."""

    path: Path
    state: TrainState
    config: dict
    data_state: dict
    rng: RngState | None


def step_of(path: Path) -> int | None:
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


class Checkpointer:
    """Saves and restores the full training state under `<run_dir>/checkpoints`."""

    def __init__(self, run_dir: Path, backend: Backend, keep: int = 3):
        self.root = Path(run_dir) / "checkpoints"
        self.backend = backend
        self.keep = keep
        self.stateful: dict[str, Any] = {}
        """Extra objects with state_dict()/load_state_dict() (e.g. LR schedulers) saved in state.json."""
        self._verified: set[Path] = set()  # by find_valid: load need not read every file again

    # ------------------------------------------------------------------ saving
    def save(self, state: TrainState, G_ema: torch.nn.Module, config: dict, data_state: dict) -> Path:
        """Write a checkpoint for `state.step` (all ranks call this; a collective)."""
        final = self.root / f"step-{state.step:09d}"
        tmp = self.root / f"{final.name}.tmp"
        # Each stage ends in one collective, so a failure on any rank stops all ranks together.
        self._all_ok(lambda: self._start(tmp), tmp)  # other ranks write only once the folder exists
        self._all_ok(lambda: self._write_parts(tmp, state, G_ema, config, data_state), tmp)
        pause_for_tests(tmp)  # test hook: a window in which a SIGKILL hits a half-written checkpoint
        self._all_ok(lambda: self._publish(tmp, final), tmp)
        return final

    def _start(self, tmp: Path) -> None:
        if self.backend.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*.tmp"):  # left by a process killed while saving
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
            tmp.mkdir()

    def _write_parts(self, tmp: Path, state: TrainState, G_ema: torch.nn.Module, config: dict, data_state: dict) -> None:
        b = self.backend
        info, tensors = rng_state()
        info["data"] = data_state
        # What this rank holds, so that divergence between ranks can be seen after the fact.
        info["fingerprint"] = {name: fingerprint(m) for name, m in (("G", b.module("G")), ("D", b.module("D")),
                                                                      ("G_ema", G_ema))}
        info["host"] = {"hostname": platform.node(), "slurm_node": os.environ.get("SLURMD_NODENAME", "")}
        save_file(tensors, str(tmp / f"rank-{b.rank:05d}.safetensors"))
        (tmp / f"rank-{b.rank:05d}.json").write_text(json.dumps(info))
        b.save_optimizers(tmp)  # a collective for sharded optimizers (DeepSpeed engines)
        if b.is_main:
            for name, module in (("G", b.module("G")), ("D", b.module("D")), ("G_ema", G_ema)):
                save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                          str(tmp / f"{name}.safetensors"))
            meta = {"step": state.step, "d_step": state.d_step, "nimg": state.nimg, "wandb_id": state.wandb_id,
                    "extra": state.extra, "world_size": b.world_size, "backend": b.state_dict_extra(),
                    "stateful": {k: v.state_dict() for k, v in self.stateful.items()}, "config": config,
                    "time": time.time()}
            (tmp / "state.json").write_text(json.dumps(meta, indent=1, default=tensor_to_json))

    def _publish(self, tmp: Path, final: Path) -> None:
        """Manifest, fsync, rename, then the `latest` pointer, then pruning (main process)."""
        if not self.backend.is_main:
            return
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        (tmp / MANIFEST).write_text(json.dumps({name: sha256(tmp / name) for name in files}, indent=1))
        fsync_tree(tmp)
        replaced = final.with_name(f"{final.name}.replaced.tmp")
        if final.exists():  # the same step saved again (e.g. a rollback): the new one wins
            os.replace(final, replaced)  # a rename, so no half-deleted `step-*` can be left
        os.replace(tmp, final)
        shutil.rmtree(replaced, ignore_errors=True)
        pointer = self.root / (LATEST + ".tmp")
        pointer.write_text(final.name)
        os.replace(pointer, self.root / LATEST)
        fsync_dir(self.root)
        self._prune()

    def _all_ok(self, fn, tmp: Path) -> None:
        """Run `fn`; then one collective so that all ranks stop together when any rank failed."""
        error, message = torch.zeros((), device=self.backend.device), ""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - safetensors/torch raise non-OSError types for I/O failures
            error += 1
            message = describe_write_error(e, tmp, self.root, self.latest_name())
            shutil.rmtree(tmp, ignore_errors=True)
        if self.backend.all_reduce_max(error).item() > 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(message or f"Could not write checkpoint {tmp.name.removesuffix('.tmp')}: another "
                                  f"rank failed to write its part (see its log); {self._kept()}.")

    def _kept(self) -> str:
        previous = self.latest_name()
        return f"the previous checkpoint {self.root / previous} is intact" if previous else "no earlier checkpoint exists"

    def _prune(self) -> None:
        done = self.completed()
        for old in done[: max(0, len(done) - self.keep)]:
            # Renamed first, so a crash halfway through the delete leaves no half-deleted
            # `step-*` behind (the next save clears `*.tmp`).
            doomed = old.with_name(f"{old.name}.pruned.tmp")
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    # ------------------------------------------------------------------ best slot
    def save_best(self, value: float, metric: str = "fid", step: int | None = None, lower_is_better: bool = True) -> bool:
        """Keep the checkpoint of `step` (default: the latest) as `checkpoints/best` if `value` beats
        the current best. Not a collective: call it on any or all ranks (only the main one writes).
        Files are hard-linked (checkpoint files are never modified in place), else copied.
        Returns True when it became the best."""
        current = self.best()
        better = current is None or (value < current["value"] if lower_is_better else value > current["value"])
        if not self.backend.is_main or not better:
            return better
        name = f"step-{step:09d}" if step is not None else self.latest_name()
        src = self.root / name if name else None
        if src is None or not src.is_dir():
            raise CheckpointError(f"save_best: no checkpoint {name or '(none written yet)'} under {self.root}; save one first")
        tmp, dst, old = self.root / (BEST + ".tmp"), self.root / BEST, self.root / (BEST + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, copy_function=link_or_copy)
        info = {"metric": metric, "value": float(value), "lower_is_better": lower_is_better, "checkpoint": src.name,
                "step": step_of(src)}
        (tmp / BEST_INFO).write_text(json.dumps(info, indent=1))
        fsync_tree(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if dst.exists():
            os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
        fsync_dir(self.root)
        return True

    def best(self) -> dict | None:
        """The best.json of `checkpoints/best` ({metric, value, lower_is_better, checkpoint, step}) or None."""
        path = self.root / BEST / BEST_INFO
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    # ------------------------------------------------------------------ finding
    def latest_name(self) -> str | None:
        pointer = self.root / LATEST
        try:
            return pointer.read_text().strip() or None
        except OSError:
            return None

    def completed(self) -> list[Path]:
        """Renamed-into-place `step-NNNNNNNNN` folders, oldest first (no .tmp, best, superseded)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir())

    def candidates(self) -> list[Path]:
        """Completed checkpoints, newest first (the `latest` pointer's first if present)."""
        found = self.completed()[::-1]
        latest = self.latest_name()
        if latest and (self.root / latest) in found:
            found.remove(self.root / latest)
            found.insert(0, self.root / latest)
        elif latest:
            warnings.warn(f"{self.root / LATEST} names {latest}, which does not exist; using the newest other checkpoint.",
                          stacklevel=2)
        return found

    def find_valid(self) -> Path | None:
        """Newest checkpoint whose manifest verifies; corrupt ones are skipped with a warning."""
        for path in self.candidates():
            problem = verify(path)
            if problem is None:
                self._verified.add(path)
                return path
            warnings.warn(f"Skipping checkpoint {path}: {problem}; trying the previous one.", stacklevel=2)
        return None

    def refuse_existing(self) -> None:
        """`train.resume=none` in a run folder that already has checkpoints is refused: training
        from scratch there would interleave two runs' checkpoints and let pruning delete the old
        run's ones. Not a collective (every rank sees the same folder)."""
        done = self.completed()
        if done:
            raise CheckpointError(
                f"train.resume=none but {self.root} already holds checkpoints (newest {done[-1].name}). Use "
                "train.resume=auto to continue that run, a new train.run_dir (or train.name) for a fresh run, "
                f"or delete {self.root} to start over in the same folder.")

    def supersede_after(self, step: int, keep: Path | None = None) -> None:
        """After resuming an older checkpoint (`train.resume=PATH`): set this run's checkpoints at or
        after `step` aside (renamed, not deleted), so pruning and `auto` follow the new timeline."""
        if not self.backend.is_main:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for path in self.completed():
            if step_of(path) >= step and (keep is None or path.resolve() != keep.resolve()):
                os.replace(path, path.with_name(f"{path.name}.superseded-{stamp}"))
                warnings.warn(f"{path} is newer than the resumed checkpoint: renamed to {path.name}.superseded-{stamp}",
                              stacklevel=2)
        latest = self.latest_name()
        if latest and not (self.root / latest).is_dir():
            (self.root / LATEST).unlink(missing_ok=True)

    # ------------------------------------------------------------------ loading
    def load(self, path: Path, G_ema: torch.nn.Module) -> Restored:
        """Restore weights, optimizers and backend state; return counters, config, data position and
        this rank's RNG state. A collective: all ranks must load the same verified checkpoint."""
        b = self.backend
        path = Path(path)
        problem = None if path in self._verified else verify(path)
        meta = json.loads((path / "state.json").read_text()) if problem is None else {}
        step = int(meta.get("step", -1))
        # One collective: did any rank fail to verify, and did every rank pick the same step?
        flags = b.all_reduce_max(torch.tensor([float(problem is not None), step, -step], dtype=torch.float64,
                                              device=b.device)).tolist()
        if problem is not None:
            raise CheckpointError(f"{path} is not a usable checkpoint: {problem}")
        if flags[0] > 0:
            raise CheckpointError(f"{path}: another rank could not verify this checkpoint (see its log)")
        if flags[1] != -flags[2]:
            raise CheckpointError(f"ranks chose different checkpoints to resume (steps {int(-flags[2])}..{int(flags[1])}); "
                                  "is the run folder on a file system every node sees?")
        for name, module in (("G", b.module("G")), ("D", b.module("D")), ("G_ema", G_ema)):
            load_weights(module, path / f"{name}.safetensors")
        b.load_optimizers(path)
        b.load_state_dict_extra(json_to_tensor(meta.get("backend", {})))
        for key, obj in self.stateful.items():
            if key in meta.get("stateful", {}):
                obj.load_state_dict(json_to_tensor(meta["stateful"][key]))
        rank_file = path / f"rank-{b.rank:05d}.json"
        data_state: dict = {}
        rng = None
        if rank_file.is_file() and meta.get("world_size") == b.world_size:
            info = json.loads(rank_file.read_text())
            data_state = info.pop("data", {}) or {}
            rng = (info, load_file(str(path / f"rank-{b.rank:05d}.safetensors")))
        else:
            # Every rank has consumed as many batches as rank 0: the stream maps that position
            # onto the new layout (approximately, with a warning of its own).
            first = path / "rank-00000.json"
            data_state = (json.loads(first.read_text()).get("data") or {}) if first.is_file() else {}
            warnings.warn(f"{path} was written by {meta.get('world_size')} processes, this run has {b.world_size}: "
                          "RNG states start fresh, the data position is carried over approximately "
                          "(weights and optimizers are restored).", stacklevel=2)
        state = TrainState(step=meta["step"], d_step=meta["d_step"], nimg=meta["nimg"], wandb_id=meta.get("wandb_id", ""),
                           extra=meta.get("extra", {}))
        return Restored(path, state, meta["config"], data_state, rng)


def verify(path: Path) -> str | None:
    """None when every file listed in the manifest exists with its checksum, else the problem."""
    path = Path(path)
    if not path.is_dir():
        return "it does not exist" if not path.exists() else "it is not a folder"
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (not a distgan checkpoint, or an interrupted save)"
    try:
        listed = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return "manifest.json is corrupt"
    if not isinstance(listed, dict):
        return "manifest.json is corrupt"
    for name in ("G.safetensors", "D.safetensors", "G_ema.safetensors", "state.json"):
        if name not in listed:
            return f"manifest does not list {name}"
    for name, digest in listed.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if sha256(f) != digest:
            return f"{name} does not match its checksum (corrupt or truncated)"
    return None


def load_weights(module: torch.nn.Module, file: Path) -> None:
    """Load a safetensors state dict, naming missing or unexpected keys clearly."""
    state = load_file(str(file))
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{file} does not fit this model: missing {result.missing_keys[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]} (was it trained with another model config?)")


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder or a run folder (its latest checkpoint); say clearly when neither."""
    given = path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{given} does not exist: give a checkpoint folder like "
                              "runs/NAME/checkpoints/step-000001000 or a run folder.")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{given} is not a distgan checkpoint (no state.json): give a checkpoint folder like "
                              "runs/NAME/checkpoints/step-000001000 or a run folder.")
    return path


def read_config(path: str | Path) -> dict:
    """The resolved config stored with a checkpoint (or a run folder's latest checkpoint)."""
    path = resolve_checkpoint(path)
    try:
        return json.loads((path / "state.json").read_text())["config"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}/state.json is unreadable ({e}): not a usable checkpoint") from None
