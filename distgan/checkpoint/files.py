"""File-level pieces of the checkpoint format: checksums, fsync, hard links, JSON-safe tensors and
turning an I/O failure (which safetensors and torch.save report without an errno) into a message
that says what happened and what is still safe."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

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


