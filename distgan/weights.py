"""Where trained weights come from: a checkpoint folder, a run folder (its latest checkpoint) or a
`distgan export` folder.

`sampling.load_generator` (so `distgan sample`, `distgan eval`, `distgan.load_generator`) and
fine-tuning (`train.init_from`) read through `open_weights`, so each accepts all three. An export
holds only the EMA generator; asking it for G or D names what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distgan.checkpoint import CheckpointError, CheckpointInfo, read_checkpoint
from distgan.checkpoint.format import WEIGHTS
from distgan.config import Config, load_config
from distgan.export.folder import RAW_WEIGHT_FILES, WEIGHTS_FILE, is_export, read_export


@dataclass
class WeightsSource:
    """Trained weights and the facts they were trained with."""

    info: CheckpointInfo
    """Step, kimg, config and class names (an export carries them in its config.json)."""
    files: dict[str, Path]
    """Network name (`G`, `D`, `G_ema`) -> its safetensors file; an export has `G_ema` only (an
    imported one, `distgan import`, also `G` and `D`)."""
    kind: str
    """`checkpoint` or `export`."""

    @property
    def num_classes(self) -> int:
        """Classes the networks were built for (0: unconditional)."""
        return len(self.info.class_names) if self.info.config.get("model", {}).get("conditional") else 0

    def config(self) -> Config:
        """The training config, validated by this distgan version."""
        return load_config(None, {f"{s}.{k}": v for s, sec in self.info.config.items() for k, v in sec.items()})

    def file(self, net: str) -> Path:
        """The weights of `net`; CheckpointError naming what the source lacks."""
        if net not in self.files:
            raise CheckpointError(f"{self.info.path} is a distgan export: it holds only the EMA generator, not {net} "
                                  "(use the run folder or a checkpoint for the raw G or D).")
        return self.files[net]


def open_weights(path: str | Path) -> WeightsSource:
    """The weights of an export folder, a checkpoint folder or a run folder's latest checkpoint."""
    path = Path(path)
    if is_export(path):
        raw = {net: path / name for net, name in RAW_WEIGHT_FILES.items() if (path / name).is_file()}
        return WeightsSource(read_export(path), {"G_ema": path / WEIGHTS_FILE, **raw}, "export")
    info = read_checkpoint(path)
    return WeightsSource(info, {net: info.path / f"{net}.safetensors" for net in WEIGHTS}, "checkpoint")


__all__ = ["WeightsSource", "open_weights"]
