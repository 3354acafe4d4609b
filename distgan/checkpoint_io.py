"""Low-level pieces of `distgan.checkpoint`: RNG capture, checksums, fsync, JSON-safe tensors and
turning an I/O failure (which safetensors and torch.save report without an errno) into a message
that says what happened and what is still safe."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

RngState = tuple[dict[str, Any], dict[str, torch.Tensor]]
"""(JSON-able part, tensors for safetensors) of one process's random number generators."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which and why."""


# ---------------------------------------------------------------------------- RNG


def rng_state() -> RngState:
    """Python, NumPy (legacy global) and torch CPU (+ current CUDA device) generator states."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    info = {"python": [version, list(internal), gauss],
            "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return info, tensors


def set_rng_state(rng: RngState) -> None:
    info, tensors = rng
    version, internal, gauss = info["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block without moving the training RNG streams: whatever it draws (a DataLoader
    starting its workers seeds them from torch's global RNG; an evaluation builds its own data
    loader) is undone afterwards, so a resumed run, which starts such things at other times than
    an uninterrupted one, still draws exactly the same numbers for training."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


# ---------------------------------------------------------------------------- files


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder below `folder` to disk before it is renamed into place: a
    rename can reach the disk before the data it names, and a power loss would then leave a
    checkpoint of zero-filled files behind a valid-looking name."""
    for p in sorted(Path(folder).rglob("*")) + [Path(folder)]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:  # some file systems refuse fsync on folders
            pass
        finally:
            os.close(fd)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fingerprint(module: torch.nn.Module) -> list[float]:
    """[sum, position-weighted sum] of the per-tensor sums of a module's float state: equal
    weights give equal numbers on every rank (same kernels), different ones almost never do."""
    sums = [t.detach().float().sum() for t in module.state_dict().values() if t.is_floating_point()]
    if not sums:
        return [0.0, 0.0]
    s = torch.stack(sums).double().cpu()
    return [s.sum().item(), (s * torch.arange(1, len(s) + 1, dtype=torch.float64)).sum().item()]


def link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def pause_for_tests(tmp: Path) -> None:
    """Test hook: DISTGAN_TEST_SLOW_SAVE=SECONDS[@STEP] sleeps after every part of a checkpoint (of
    that step only, with @STEP) is written and before its manifest and rename, so that a test can
    SIGKILL the process in the middle of a save."""
    spec = os.environ.get("DISTGAN_TEST_SLOW_SAVE", "")
    if not spec:
        return
    seconds, _, step = spec.partition("@")
    if step and Path(tmp).name != f"step-{int(step):09d}.tmp":
        return
    seconds = float(seconds)
    if seconds > 0 and Path(tmp).is_dir():
        print(f"DISTGAN_TEST_SLOW_SAVE: pausing {seconds:g}s inside {tmp}", file=sys.stderr, flush=True)
        time.sleep(seconds)


_ERRNO = re.compile(r"(?:os error|code:)\s*(\d+)")


def describe_write_error(e: BaseException, tmp: Path, root: Path, previous: str | None) -> str:
    """One message: which checkpoint, why (disk full / read-only / permission / other), what is intact."""
    code = e.errno if isinstance(e, OSError) else None
    if code is None:  # safetensors: "IoError(Os { code: 28, ... })"; torch.save: "file write failed"
        m = _ERRNO.search(str(e))
        code = int(m.group(1)) if m else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        reason = "the disk is full (No space left on device)"
    elif code == errno.EROFS:
        reason = "the file system is read-only"
    elif code in (errno.EACCES, errno.EPERM):
        reason = "permission denied (the run folder is not writable)"
    else:
        reason = f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}"
        try:
            free = shutil.disk_usage(root).free
            if free < 1 << 20:  # torch.save's "file write failed" carries no errno
                reason = f"the disk is full ({free} bytes free; {type(e).__name__}: {e})"
        except OSError:
            pass
    kept = f"the previous checkpoint {root / previous} is intact" if previous else "no earlier checkpoint exists"
    return (f"Could not write checkpoint {Path(tmp).name.removesuffix('.tmp')} under {root}: {reason}; {kept}. "
            "Fix this and rerun with train.resume=auto to continue from it.")


# ---------------------------------------------------------------------------- JSON


def tensor_to_json(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"__tensor__": value.tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    raise TypeError(f"not JSON serialisable: {type(value)}")


def json_to_tensor(value: Any) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return torch.tensor(value["__tensor__"], dtype=getattr(torch, value["dtype"]))
        return {k: json_to_tensor(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_to_tensor(v) for v in value]
    return value


# ---------------------------------------------------------------------------- resume compatibility

# Keys besides config.frozen_keys() that change the networks or the optimizer state layout.
_ALSO_FROZEN = ("model.g_norm", "dist.fsdp")


def check_resume_compatible(saved: dict, current: dict) -> None:
    """Run-length, logging, data and loss-weight keys may change on resume; keys that define the
    networks or the optimizers may not (the optimizer's lr/betas come back from the checkpoint,
    so a changed value would be silently ignored)."""
    from distgan.config import ConfigError, frozen_keys

    def get(cfg: dict, key: str):
        section, name = key.split(".")
        return cfg.get(section, {}).get(name)

    changed = []
    for key in (*frozen_keys(), *_ALSO_FROZEN):
        old, new = get(saved, key), get(current, key)
        if old is not None and old != new:
            changed.append(f"{key}: checkpoint has {old!r}, config has {new!r}")
    # R1 on/off switches D's Adam to lazy-regularization lr/betas (its value alone may change).
    old_r1, new_r1 = get(saved, "loss.r1_gamma"), get(current, "loss.r1_gamma")
    if old_r1 is not None and (old_r1 > 0) != (new_r1 > 0):
        changed.append(f"loss.r1_gamma: checkpoint has {old_r1!r}, config has {new_r1!r} (turns lazy R1 on/off)")
    if changed:
        raise ConfigError("Cannot resume with a config that changes the networks or optimizers:\n  " + "\n  ".join(changed)
                          + "\nStart a new run (train.run_dir=...) or set train.resume=none.")
