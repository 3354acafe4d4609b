"""The checkpoint format: the one module that reads and writes its files.

Layout of one checkpoint (`<run>/checkpoints/step-000001000/`):

    G.safetensors  D.safetensors  G_ema.safetensors   network weights (Scope.WEIGHTS)
    optim_G.pt  optim_D.pt                           full optimizer state keyed by parameter name,
                                                     the same for every backend and world size
                                                     (torch.load(weights_only=True) reads it back)
    rank-00000.json  rank-00000.safetensors           per-rank state: RNG, data position
    state.json                                        shared state (counters, run facts, best
                                                     record, backend), world size and config
    manifest.json                                     sha256 of every file above, written last

Nothing here unpickles code: weights are safetensors, JSON is JSON, and optimizer files are
read with `torch.load(weights_only=True)`. `sampling`, evaluation and resume all read through
`resolve_checkpoint` / `read_checkpoint` / `load_weights`.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from distgan.checkpoint.files import json_to_tensor, sha256, tensor_to_json
from distgan.errors import CheckpointError

FORMAT = 2
MANIFEST = "manifest.json"
STATE = "state.json"
LATEST = "latest"
BEST = "best"
BEST_INFO = "best.json"
WEIGHTS = ("G", "D", "G_ema")
_STEP_DIR = re.compile(r"step-(\d{9})$")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:09d}"


def step_of(path: Path) -> int | None:
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------- writing


def write_weights(folder: Path, name: str, module: torch.nn.Module) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(folder / f"{name}.safetensors"))


def write_shared(folder: Path, shared: dict[str, dict], world_size: int, config: dict) -> None:
    meta = {"format": FORMAT, "time": time.time(), "world_size": world_size, "config": config, "state": shared}
    (folder / STATE).write_text(json.dumps(meta, indent=1, default=tensor_to_json))


def write_rank(folder: Path, rank: int, state: dict[str, dict]) -> None:
    """One rank's state: tensors into safetensors (keyed `object/key`), the rest into JSON."""
    tensors, plain = {}, {}
    for name, part in state.items():
        plain[name] = {}
        for key, value in part.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.contiguous()
            else:
                plain[name][key] = value
    save_file(tensors, str(folder / f"rank-{rank:05d}.safetensors"))
    (folder / f"rank-{rank:05d}.json").write_text(json.dumps(plain))


def write_optimizer(folder: Path, net: str, state: dict[str, Any]) -> None:
    """One network's full optimizer state, in the layout of torch.distributed.checkpoint's *full*
    optimizer state dict: `{"state": {param name: {"step", "exp_avg", "exp_avg_sq"}},
    "param_groups": [{..., "params": [param names]}]}`, plus `"fp32_params": {name: tensor}` when the
    backend trains fp32 master copies of low-precision weights (DeepSpeed bf16). Keyed by names, not
    by positions or shards, so that every backend at every world size reads it."""
    torch.save(state, Path(folder) / f"optim_{net}.pt")


def read_optimizer(folder: Path, net: str) -> dict[str, Any]:
    """`write_optimizer`'s state; `weights_only`: a checkpoint never executes pickled code."""
    file = Path(folder) / f"optim_{net}.pt"
    if not file.is_file():
        native = " (it holds DeepSpeed's native ds_G/ds_D folders: resume it with the distgan version that wrote " \
                 "it, same world size and ZeRO stage)" if (Path(folder) / f"ds_{net}").is_dir() else ""
        raise CheckpointError(f"{folder} has no optimizer state for {net} ({file.name}){native}")
    # "cpu", not the device: torch cannot map to "cpu:0"; loading moves state to the parameters.
    return torch.load(file, map_location="cpu", weights_only=True)


def write_manifest(folder: Path) -> None:
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    (folder / MANIFEST).write_text(json.dumps({name: sha256(folder / name) for name in files}, indent=1))


# ---------------------------------------------------------------------------- reading


@dataclass
class CheckpointInfo:
    """What state.json says about a checkpoint (no tensors loaded)."""

    path: Path
    step: int
    d_step: int
    nimg: int
    world_size: int
    config: dict
    class_names: list[str]
    tracker_id: str
    state: dict[str, Any] = field(repr=False)
    """Every shared object's state, by name (tensors decoded)."""


def read_checkpoint(path: str | Path) -> CheckpointInfo:
    """The facts of a checkpoint folder or of a run folder's latest checkpoint."""
    path = resolve_checkpoint(path)
    try:
        meta = json.loads((path / STATE).read_text())
        state = json_to_tensor(meta["state"])
        train, run = state["train"], state.get("run", {})
        return CheckpointInfo(path, int(train["step"]), int(train["d_step"]), int(train["nimg"]), int(meta["world_size"]),
                              meta["config"], list(run.get("class_names", [])), run.get("tracker_id", ""), state)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / STATE} is unreadable ({type(e).__name__}: {e}): not a usable checkpoint of this "
                              "distgan version") from None


def read_rank(folder: Path, rank: int) -> dict[str, dict] | None:
    """One rank's state as written by `write_rank`; None when the checkpoint has no such rank."""
    file = folder / f"rank-{rank:05d}.json"
    if not file.is_file():
        return None
    state = json.loads(file.read_text())
    for key, value in load_file(str(folder / f"rank-{rank:05d}.safetensors")).items():
        name, _, sub = key.partition("/")
        state.setdefault(name, {})[sub] = value
    return state


def read_weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of `<name>.safetensors` as saved (in the dtype the run held them)."""
    return load_file(str(Path(folder) / f"{name}.safetensors"))


def load_weights(module: torch.nn.Module, file: Path, skip: frozenset[str] = frozenset()) -> None:
    """Load a safetensors state dict, naming missing, unexpected or misshapen keys clearly. Keys in
    `skip` keep the module's own values (fine-tuning's fresh class embeddings)."""
    state = {k: v for k, v in load_file(str(file)).items() if k not in skip}
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape mismatch: torch lists every key, one per line
        raise CheckpointError(f"{file} does not fit this model (was it trained with another model config?): "
                              f"{' '.join(str(e).split())[:600]}") from None
    missing = [k for k in result.missing_keys if k not in skip]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{file} does not fit this model: missing {missing[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]} (was it trained with another model config?)")


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
    for name in (*(f"{w}.safetensors" for w in WEIGHTS), STATE):
        if name not in listed:
            return f"manifest does not list {name}"
    for name, digest in listed.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if sha256(f) != digest:
            return f"{name} does not match its checksum (corrupt or truncated)"
    return None


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
    if not (path / STATE).is_file():
        raise CheckpointError(f"{given} is not a distgan checkpoint (no {STATE}): give a checkpoint folder like "
                              "runs/NAME/checkpoints/step-000001000 or a run folder.")
    return path


def read_config(path: str | Path) -> dict:
    """The resolved config stored with a checkpoint (or a run folder's latest checkpoint)."""
    return read_checkpoint(path).config
