"""Checkpoints: `format` reads and writes the files, `manager.Checkpointer` saves and restores a
run's registered objects crash-safe, `state` holds the small objects that save themselves."""

from distgan.checkpoint.format import (CheckpointInfo, load_weights, read_checkpoint, read_config, resolve_checkpoint,
                                       step_of, verify)
from distgan.checkpoint.manager import Checkpointer
from distgan.checkpoint.state import (BestRecord, RngStreams, RunFacts, Scope, Stateful, TrainState,
                                      check_resume_compatible, isolated_rng)
from distgan.errors import CheckpointError

__all__ = ["BestRecord", "CheckpointError", "CheckpointInfo", "Checkpointer", "RngStreams", "RunFacts", "Scope",
           "Stateful", "TrainState", "check_resume_compatible", "isolated_rng", "load_weights", "read_checkpoint",
           "read_config", "resolve_checkpoint", "step_of", "verify"]
