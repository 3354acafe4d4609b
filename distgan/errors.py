"""Every error distgan raises for a user to fix, under one base class.

The CLI catches `DistganError`, prints its message as one line and exits with the class's
`exit_code`; the traceback is shown only with `--debug` or `DISTGAN_DEBUG=1`. Anything else
(a bug, an interrupted process) still shows its traceback: it is not the user's to fix.

The kinds also derive from the builtin a caller would have caught before this module existed
(`ConfigError` is a `ValueError`, `DataError` a `RuntimeError`, ...), so `except ValueError`
around a config load keeps working.
"""

from __future__ import annotations


class DistganError(Exception):
    """A problem the user can fix; the message says what and how."""

    exit_code = 1
    label = "error"
    """Shown after `distgan: ` in the CLI's one-line report."""
    same_on_every_rank = False
    """True for errors every rank of a launch meets alike (a package or file missing on the
    machine): the CLI reports them from the main process only, not once per rank."""


class ConfigError(DistganError, ValueError):
    """A configuration problem: unknown key, wrong type, value out of range, bad combination."""

    exit_code = 2
    label = "config error"


class DataError(DistganError, RuntimeError):
    """Training or evaluation data that cannot be found, read or used."""

    exit_code = 3


class CheckpointError(DistganError, RuntimeError):
    """A checkpoint that cannot be written, found or read; the message says which and why."""

    exit_code = 4


class EvalError(DistganError, RuntimeError):
    """An evaluation that cannot run as asked (missing weights, too few real images, ...)."""

    exit_code = 5


class DistributedError(DistganError, RuntimeError):
    """The process group is not what was asked for, or another rank failed."""

    exit_code = 6


class WorldSizeError(DistributedError):
    """The launcher started a different number of processes than was asked for."""


class PeerFailureError(DistributedError):
    """A collective failed because another rank died, raised or hung."""


class TrainingError(DistganError, RuntimeError):
    """Training stopped on a condition the user chose to stop on (e.g. a non-finite loss)."""

    exit_code = 7


class NonFiniteLossError(TrainingError):
    """A loss became NaN or inf and `train.on_nonfinite=stop`."""


class MissingDependencyError(DistganError, ImportError):
    """An optional package a feature needs is not installed; the message names the
    `pip install 'distgan[extra]'` that installs it (see `distgan.optional`)."""

    exit_code = 8
    label = "missing dependency"
    same_on_every_rank = True


__all__ = ["DistganError", "ConfigError", "DataError", "CheckpointError", "EvalError", "DistributedError",
           "WorldSizeError", "PeerFailureError", "TrainingError", "NonFiniteLossError",
           "MissingDependencyError"]
