"""Complete, crash-safe checkpoints that load without unpickling code.

Layout of one checkpoint (`<run>/checkpoints/step-000001000/`):

    G.safetensors  D.safetensors  G_ema.safetensors   weights (safetensors)
    optim_G.pt  optim_D.pt                           optimizer state (tensors + numbers only,
                                                     read back with torch.load(weights_only=True))
    rank-00000.json  rank-00000.safetensors           per-rank RNG states and data position
    state.json                                        counters, backend state, W&B id, config
    manifest.json                                     sha256 of every file above, written last

It is written into `step-...tmp`, renamed into place when complete, and only then is the
`latest` pointer replaced. A checkpoint whose manifest is missing or does not match is skipped
(with a warning) in favour of the previous one. Every rank calls `save`/`load`: saving is a
collective for backends that shard state, so it never sits inside a main-process-only branch.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from distgan.backends.base import Backend

MANIFEST = "manifest.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which and why."""


@dataclass
class TrainState:
    """Counters of a run: everything besides tensors that resume needs."""

    step: int = 0
    """Generator steps done."""
    d_step: int = 0
    """Discriminator main steps done (drives the lazy-regularization interval)."""
    nimg: int = 0
    """Real images shown to D, summed over ranks."""
    wandb_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    np_state = np.random.get_state()
    info = {"python": _jsonable(random.getstate()), "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return info, tensors


def _set_rng_state(info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = info["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


class Checkpointer:
    """Saves and restores the full training state under `<run_dir>/checkpoints`."""

    def __init__(self, run_dir: Path, backend: Backend, keep: int = 3):
        self.root = Path(run_dir) / "checkpoints"
        self.backend = backend
        self.keep = keep

    # ------------------------------------------------------------------ saving
    def save(self, state: TrainState, G_ema: torch.nn.Module, config: dict, data_state: dict) -> Path:
        """Write a checkpoint for `state.step` (all ranks call this)."""
        b = self.backend
        final = self.root / f"step-{state.step:09d}"
        tmp = self.root / f"step-{state.step:09d}.tmp"
        error = torch.zeros((), device=b.device)
        message = ""
        try:
            if b.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
        except OSError as e:
            error += 1
            message = self._describe(e, tmp)
        self._raise_if_any(error, message)  # every rank learns that the folder could not be made
        try:
            info, tensors = _rng_state()
            info["data"] = data_state
            save_file(tensors, tmp / f"rank-{b.rank:05d}.safetensors")
            (tmp / f"rank-{b.rank:05d}.json").write_text(json.dumps(info))
            b.save_optimizers(tmp)  # a collective for sharded optimizers
            if b.is_main:
                for name, module in (("G", b.module("G")), ("D", b.module("D")), ("G_ema", G_ema)):
                    save_file(_state_tensors(module), tmp / f"{name}.safetensors")
                meta = {"step": state.step, "d_step": state.d_step, "nimg": state.nimg, "wandb_id": state.wandb_id,
                        "extra": state.extra, "world_size": b.world_size, "backend": b.state_dict_extra(), "config": config}
                (tmp / "state.json").write_text(json.dumps(meta, indent=1, default=_tensor_to_json))
        except OSError as e:
            error += 1
            message = self._describe(e, tmp)
        self._raise_if_any(error, message)
        if b.is_main:
            try:
                files = sorted(p.name for p in tmp.iterdir() if p.is_file())
                manifest = {name: _sha256(tmp / name) for name in files}
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                pointer = self.root / (LATEST + ".tmp")
                pointer.write_text(final.name)
                os.replace(pointer, self.root / LATEST)
                self._prune()
            except OSError as e:
                error += 1
                message = self._describe(e, tmp)
        self._raise_if_any(error, message)
        return final

    def _raise_if_any(self, error: torch.Tensor, message: str) -> None:
        # A collective: all ranks stop together when any rank failed to write.
        if self.backend.all_reduce_max(error).item() > 0:
            raise CheckpointError(message or "another rank failed to write its part of the checkpoint")

    def _describe(self, e: OSError, tmp: Path) -> str:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = self.latest_name()
        kept = f"the previous checkpoint {self.root / previous} is intact" if previous else "no earlier checkpoint exists"
        reason = "the disk is full" if e.errno == errno.ENOSPC else f"{e.strerror or e}"
        return f"Could not write checkpoint {tmp.name.removesuffix('.tmp')} under {self.root}: {reason}; {kept}."

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ finding
    def latest_name(self) -> str | None:
        pointer = self.root / LATEST
        return pointer.read_text().strip() if pointer.is_file() else None

    def candidates(self) -> list[Path]:
        """Completed checkpoints, newest first (the `latest` pointer first if present)."""
        found = sorted((p for p in self.root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")), reverse=True)
        latest = self.latest_name()
        if latest and (self.root / latest) in found:
            found.remove(self.root / latest)
            found.insert(0, self.root / latest)
        return found

    def find_valid(self) -> Path | None:
        """Newest checkpoint whose manifest verifies; corrupt ones are skipped with a warning."""
        for path in self.candidates():
            problem = verify(path)
            if problem is None:
                return path
            warnings.warn(f"Skipping checkpoint {path}: {problem}; trying the previous one.", stacklevel=2)
        return None

    # ------------------------------------------------------------------ loading
    def load(self, path: Path, G_ema: torch.nn.Module) -> tuple[TrainState, dict, dict]:
        """Restore weights, optimizers, RNG of this rank; returns (state, config dict, data state)."""
        problem = verify(path)
        if problem is not None:
            raise CheckpointError(f"{path} is not a usable checkpoint: {problem}")
        b = self.backend
        for name, module in (("G", b.module("G")), ("D", b.module("D")), ("G_ema", G_ema)):
            load_weights(module, path / f"{name}.safetensors")
        b.load_optimizers(path)
        meta = json.loads((path / "state.json").read_text())
        b.load_state_dict_extra(_json_to_tensor(meta.get("backend", {})))
        rank_file = path / f"rank-{b.rank:05d}.json"
        data_state: dict = {}
        if rank_file.is_file() and meta.get("world_size") == b.world_size:
            info = json.loads(rank_file.read_text())
            _set_rng_state(info, load_file(path / f"rank-{b.rank:05d}.safetensors"))
            data_state = info.get("data", {})
        else:
            warnings.warn(f"{path} was written by {meta.get('world_size')} processes, this run has {b.world_size}: "
                          "RNG and data position start fresh (weights and optimizers are restored).", stacklevel=2)
        state = TrainState(step=meta["step"], d_step=meta["d_step"], nimg=meta["nimg"], wandb_id=meta.get("wandb_id", ""),
                           extra=meta.get("extra", {}))
        return state, meta["config"], data_state


def verify(path: Path) -> str | None:
    """None when every file listed in the manifest exists with its checksum, else the problem."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (not a distgan checkpoint, or an interrupted save)"
    try:
        listed = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return "manifest.json is corrupt"
    for name in ("G.safetensors", "D.safetensors", "G_ema.safetensors", "state.json"):
        if name not in listed:
            return f"manifest does not list {name}"
    for name, digest in listed.items():
        f = Path(path) / name
        if not f.is_file():
            return f"{name} is missing"
        if _sha256(f) != digest:
            return f"{name} does not match its checksum"
    return None


def load_weights(module: torch.nn.Module, file: Path) -> None:
    """Load a safetensors state dict, naming missing or unexpected keys clearly."""
    state = load_file(str(file))
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{file} does not fit this model: missing {result.missing_keys[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]} (was it trained with another model config?)")


def read_config(path: Path) -> dict:
    """The resolved config stored with a checkpoint (or a run folder's latest checkpoint)."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        latest = (path / "checkpoints" / LATEST)
        if not latest.is_file():
            raise CheckpointError(f"{path} has no checkpoint yet")
        path = path / "checkpoints" / latest.read_text().strip()
    state = path / "state.json"
    if not state.is_file():
        raise CheckpointError(f"{path} is not a distgan checkpoint (no state.json)")
    return json.loads(state.read_text())["config"]


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder or a run folder (its latest checkpoint)."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{path} is not a distgan checkpoint (no state.json): give a checkpoint folder "
                              "like runs/NAME/checkpoints/step-000001000 or a run folder.")
    return path


def _tensor_to_json(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"__tensor__": value.tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    raise TypeError(f"not JSON serialisable: {type(value)}")


def _json_to_tensor(value: Any) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return torch.tensor(value["__tensor__"], dtype=getattr(torch, value["dtype"]))
        return {k: _json_to_tensor(v) for k, v in value.items()}
    return value
