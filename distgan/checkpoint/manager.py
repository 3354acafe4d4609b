"""Saving and restoring a run: named objects that save themselves, written crash-safe.

The trainer registers what a run consists of (`register(name, obj, scope)`: networks, EMA,
optimizers, counters, run facts, best record, data position, RNG) and calls `save(step)` /
`load(path)`; the file layout is `checkpoint.format`'s.

A checkpoint is written into `step-...tmp`, fsynced, renamed into place when complete, and only
then is the `latest` pointer replaced, so a crash at any moment leaves the previous checkpoint
untouched. A checkpoint whose manifest is missing or does not match is skipped (with a warning)
in favour of the previous one. Every rank calls `save`/`load`: saving is a collective for
backends that shard state, so it never sits inside a main-process-only branch.
`checkpoints/best` holds a copy (hard links) of the checkpoint that `BestRecord` chose, described
by `best.json`.

Resume (`train.resume`): `auto` takes the newest valid checkpoint of the run folder (a fresh start
when there is none); `PATH` a given checkpoint or run folder, which must be valid (no fallback),
and this run's checkpoints at or after its step are renamed `*.superseded-<time>` (a rollback
never mixes two timelines, and nothing is deleted); `none` refuses a run folder that already has
checkpoints, since training from scratch there would interleave two runs and let pruning delete
the old run's checkpoints: pick a new run folder or delete the old one.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from distgan.checkpoint.files import describe_write_error, fingerprint, fsync_dir, fsync_tree, link_or_copy
from distgan.checkpoint.format import (BEST, BEST_INFO, LATEST, load_weights, read_checkpoint, read_rank, step_dir,
                                       step_of, verify, write_manifest, write_rank, write_shared, write_weights)
from distgan.checkpoint.state import BestRecord, Scope
from distgan.errors import CheckpointError

log = logging.getLogger("distgan")


class Checkpointer:
    """Saves and restores the registered state of a run under `<run_dir>/checkpoints`."""

    def __init__(self, run_dir: Path, backend, keep: int = 3, on_parts_written: Callable[[Path], None] | None = None):
        self.root = Path(run_dir) / "checkpoints"
        self.backend = backend
        self.keep = keep
        self.on_parts_written = on_parts_written
        """Called with the temporary folder once every part is written, before the manifest and
        the rename (tests interrupt a save there)."""
        self._objects: dict[Scope, dict[str, Any]] = {scope: {} for scope in Scope}
        self._verified: set[Path] = set()  # by find_valid: load need not read every file again

    def register(self, name: str, obj: Any, scope: Scope) -> None:
        """Save and restore `obj` under `name` (see `Scope` for where and by whom)."""
        self._objects[scope][name] = obj

    # ------------------------------------------------------------------ saving
    def save(self, step: int, config: dict) -> Path:
        """Write a checkpoint for `step` (all ranks call this; a collective)."""
        final = step_dir(self.root, step)
        tmp = final.with_name(f"{final.name}.tmp")
        # Each stage ends in one collective, so a failure on any rank stops all ranks together.
        self._all_ok(lambda: self._start(tmp), tmp)  # other ranks write only once the folder exists
        self._all_ok(lambda: self._write_parts(tmp, config), tmp)
        if self.on_parts_written is not None:
            self.on_parts_written(tmp)
        # The other ranks wait in this stage's collective while the main process hashes, fsyncs
        # and renames (and, in the stage before, writes the weights): unavoidable, since no rank
        # may go on before the checkpoint is known to be whole, and bounded by the write time,
        # which dist.timeout_s (default 1800 s) must exceed. The waiting ranks do no work there.
        self._all_ok(lambda: self._publish(tmp, final), tmp)
        return final

    def _start(self, tmp: Path) -> None:
        if self.backend.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*.tmp"):  # left by a process killed while saving
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
            tmp.mkdir()

    def _write_parts(self, tmp: Path, config: dict) -> None:
        b, objects = self.backend, self._objects
        mine = {name: obj.state_dict() for name, obj in objects[Scope.PER_RANK].items()}
        # What this rank holds, so that divergence between ranks can be seen after the fact.
        mine["fingerprint"] = {name: fingerprint(m) for name, m in objects[Scope.WEIGHTS].items()}
        mine["host"] = {"hostname": platform.node(), "slurm_node": os.environ.get("SLURMD_NODENAME", "")}
        write_rank(tmp, b.rank, mine)
        for obj in objects[Scope.COLLECTIVE].values():
            obj.save(tmp)  # a collective for sharded optimizers (DeepSpeed engines, FSDP)
        if b.is_main:
            for name, module in objects[Scope.WEIGHTS].items():
                write_weights(tmp, name, module)
            shared = {name: obj.state_dict() for name, obj in objects[Scope.SHARED].items()}
            write_shared(tmp, shared, b.world_size, config)

    def _publish(self, tmp: Path, final: Path) -> None:
        """Manifest, fsync, rename, then the `latest` pointer, then pruning (main process)."""
        if not self.backend.is_main:
            return
        write_manifest(tmp)
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
    def keep_best(self, record: BestRecord) -> None:
        """Copy the checkpoint of `record.step` to `checkpoints/best` (hard links: checkpoint files are
        never modified in place), described by best.json. `record` has already decided that it is
        the best; this only files it. Not a collective: only the main process writes."""
        if not self.backend.is_main:
            return
        src = step_dir(self.root, record.step)
        if not src.is_dir():
            raise CheckpointError(f"keep_best: no checkpoint {src.name} under {self.root}; save one first")
        tmp, dst, old = self.root / (BEST + ".tmp"), self.root / BEST, self.root / (BEST + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, copy_function=link_or_copy)
        (tmp / BEST_INFO).write_text(json.dumps({**record.state_dict(), "checkpoint": src.name}, indent=1))
        fsync_tree(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if dst.exists():
            os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
        fsync_dir(self.root)

    def best(self) -> dict | None:
        """The best.json of `checkpoints/best` ({metric, value, lower_is_better, checkpoint, step}) or None."""
        try:
            return json.loads((self.root / BEST / BEST_INFO).read_text())
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
        return sorted(p for p in self.root.iterdir() if step_of(p) is not None and p.is_dir())

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
    def load(self, path: Path) -> dict:
        """Restore every registered object from `path`; return the checkpoint's config. A collective:
        all ranks must load the same verified checkpoint."""
        b = self.backend
        path = Path(path)
        problem = None if path in self._verified else verify(path)
        info = read_checkpoint(path) if problem is None else None
        step = info.step if info else -1
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
        objects = self._objects
        for name, module in objects[Scope.WEIGHTS].items():
            load_weights(module, path / f"{name}.safetensors")
        for obj in objects[Scope.COLLECTIVE].values():
            obj.load(path)
        for name, obj in objects[Scope.SHARED].items():
            if name in info.state:
                obj.load_state_dict(info.state[name])
        self._load_per_rank(path, info.world_size, info.step)
        return info.config

    def _load_per_rank(self, path: Path, saved_world: int, step: int) -> None:
        b, objects = self.backend, self._objects[Scope.PER_RANK]
        if saved_world == b.world_size:
            state = read_rank(path, b.rank) or {}
            for name, obj in objects.items():
                if name in state:
                    obj.load_state_dict(state[name])
            return
        # Another world size. Objects that map rank 0's state onto the new layout take it (the
        # data position: every rank consumed as many batches as rank 0, so rank 0's position
        # says where all of them are); the others derive this rank's state afresh (RNG streams:
        # from the per-rank seed and the step, so the resumed run is reproducible).
        first = read_rank(path, 0) or {}
        for name, obj in objects.items():
            if getattr(obj, "carries_over_world_change", False) and name in first:
                obj.load_state_dict(first[name])
            elif hasattr(obj, "rederive"):
                obj.rederive(b.rank, step)
        log.info("%s was written by %d processes, this run has %d: weights and optimizer state re-sharded, "
                 "RNG streams re-derived per rank, the data stream continues the epoch", path, saved_world, b.world_size)
