"""Fine-tuning: a new run that starts from trained weights.

- `train.init_from=PATH` (a checkpoint, run folder or `distgan export` folder) loads G, D and the
  EMA generator into a fresh run: new counters, new optimizers, new data. The source must have
  the same network shape (`NETWORK_KEYS`); a mismatch is a ConfigError naming the key.
- `model.freeze_d=K` freezes D's first K blocks (FreezeD, Mo et al. 2020). What a block is, each
  architecture declares in the model registry (`register_arch(d_blocks=...)`).
- `model.reinit_class_embedding=true` leaves the class embeddings (`class_embedding_keys`) of G
  and D at their fresh initialisation; required when the new data has another class count.

`prepare_finetune` runs in `run.run` after the networks are built and before the backend wraps
them (freezing must happen before the optimizers are built); the EMA generator, which the
trainer copies from G, is loaded afterwards with `Finetune.load_ema`. A run that will resume
from its own checkpoint (a requeued job) does not read the source again: its checkpoint wins.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from distgan.checkpoint import step_of
from distgan.checkpoint.format import load_weights
from distgan.config import Config
from distgan.errors import ConfigError
from distgan.models import discriminator_blocks
from distgan.weights import WeightsSource, open_weights

log = logging.getLogger("distgan")

NETWORK_KEYS = ("model.arch", "data.resolution", "data.channels", "model.z_dim", "model.g_width", "model.d_width",
                "model.g_norm", "model.conditional", "model.widths", "model.w_dim", "model.mapping_layers",
                "model.d_mapping_layers")
"""Config keys that shape the networks: a fine-tuning source must agree on each (a source whose
config predates a key is not checked on it). Keys that change no weight's shape (e.g.
`model.mbstd_layout`, `model.mbstd_group`) may differ."""


@dataclass
class Finetune:
    """What `prepare_finetune` loaded; `load_ema` finishes the job once the trainer exists."""

    source: WeightsSource
    fresh_keys: dict[str, frozenset[str]]
    """Per network, the state-dict keys left at their fresh init (class embeddings)."""

    def load_ema(self, ema: nn.Module) -> None:
        load_weights(ema, self.source.file("G_ema"), skip=self.fresh_keys["G"])


def prepare_finetune(cfg: Config, G: nn.Module, D: nn.Module, num_classes: int) -> Finetune | None:
    """Apply `model.freeze_d` and, for a run that starts fresh, load `train.init_from` into G and D
    (checked first). None when there is nothing left to load (no source, or a resuming run)."""
    if cfg.model.freeze_d and not cfg.train.init_from:
        raise ConfigError(f"model.freeze_d={cfg.model.freeze_d} freezes blocks of a trained discriminator: set "
                          "train.init_from=CHECKPOINT_OR_RUN as well (frozen random blocks would never learn).")
    source = open_weights(cfg.train.init_from) if cfg.train.init_from and not will_resume(cfg) else None
    if source is not None:
        check_compatible(source, cfg, num_classes)
        if cfg.model.freeze_d and "D" not in source.files:
            raise ConfigError(f"model.freeze_d={cfg.model.freeze_d}: train.init_from={cfg.train.init_from} is an export "
                              "without D weights; fine-tune from the run folder or a checkpoint to freeze D's blocks.")
    frozen = freeze_d_blocks(D, cfg.model.d_arch or cfg.model.arch, cfg.model.freeze_d)  # also on resume: it shapes D's optimizer
    if source is None:
        return None
    fresh = {"G": class_embedding_keys(G), "D": class_embedding_keys(D)} if cfg.model.reinit_class_embedding \
        else {"G": frozenset(), "D": frozenset()}
    # A checkpoint's raw G continues as G; an export has only its EMA generator, which then seeds both.
    load_weights(G, source.file("G" if "G" in source.files else "G_ema"), skip=fresh["G"])
    if "D" in source.files:
        load_weights(D, source.file("D"), skip=fresh["D"])
    else:
        log.warning("Fine-tuning from the export %s: it has no discriminator, so D starts from random weights.",
                    source.info.path)
    log.info("Fine-tuning from %s (step %d, %.1f kimg)%s%s", source.info.path, source.info.step,
             source.info.nimg / 1000, f"; D blocks 0..{frozen - 1} frozen" if frozen else "",
             "; class embeddings start fresh" if cfg.model.reinit_class_embedding else "")
    return Finetune(source, fresh)


def will_resume(cfg: Config) -> bool:
    """True when the trainer will restore a checkpoint of this run (then `init_from` is moot)."""
    if cfg.train.resume == "none":
        return False
    if cfg.train.resume != "auto":
        return True
    root = cfg.run_dir / "checkpoints"
    return root.is_dir() and any(step_of(p) is not None for p in root.iterdir())


def check_compatible(source: WeightsSource, cfg: Config, num_classes: int) -> None:
    """ConfigError naming each key on which the source's networks differ from this config's, or
    the class count when the data differs and the class embeddings are not reinitialised."""
    saved, current, where = source.info.config, cfg.to_dict(), f"train.init_from={cfg.train.init_from}"
    changed = []
    for key in NETWORK_KEYS:
        section, name = key.split(".")
        old, new = saved.get(section, {}).get(name), current[section][name]
        if old is not None and old != new:
            changed.append(f"{key}: the source has {old!r}, this config has {new!r}")
    if changed:
        raise ConfigError(f"{where} does not fit this config (fine-tuning keeps the networks' shape):\n  "
                          + "\n  ".join(changed))
    if cfg.model.conditional and source.num_classes != num_classes and not cfg.model.reinit_class_embedding:
        names = ", ".join(source.info.class_names[:8]) + (", ..." if len(source.info.class_names) > 8 else "")
        raise ConfigError(f"{where} was trained on {source.num_classes} classes ({names}) but {cfg.data.source} has "
                          f"{num_classes}: set model.reinit_class_embedding=true to start the class embeddings fresh.")


def freeze_d_blocks(D: nn.Module, arch: str, k: int) -> int:
    """Freeze D's first `k` blocks (see `_freeze`); returns `k`."""
    if k == 0:
        return 0
    blocks = discriminator_blocks(arch, D)
    if k > len(blocks):
        raise ConfigError(f"model.freeze_d={k}: the {arch} discriminator at this resolution has {len(blocks)} blocks; "
                          f"freeze at most {len(blocks)}.")
    for block in blocks[:k]:
        _freeze(block)
    return k


def _freeze(block: nn.Module) -> None:
    """Turn the block's parameters into buffers of the same names.

    In the state dict nothing changes (checkpoints, exports and resume read and write the same
    keys), but the tensors leave `D.parameters()`, so no optimizer, gradient sync, clipping or
    requires_grad switch of any backend ever touches them. The block also always runs in eval
    mode: spectral norm's power iteration and running statistics stay fixed with the weights.
    """
    for module in block.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                del module._parameters[name]
                module.register_buffer(name, param.detach())
    block.register_forward_pre_hook(_stay_in_eval)


def _stay_in_eval(module: nn.Module, args) -> None:
    if module.training:  # set again after any D.train() call
        module.eval()


def class_embedding_keys(module: nn.Module) -> frozenset[str]:
    """State-dict keys of every class embedding: each `nn.Embedding` (conditional norms, projection
    D) and each layer marked `is_class_embedding` (StyleGAN2's linear map of one-hot labels)."""
    return frozenset(f"{name}.{key}" for name, m in module.named_modules()
                     if isinstance(m, nn.Embedding) or getattr(m, "is_class_embedding", False)
                     for key in m.state_dict())


__all__ = ["Finetune", "NETWORK_KEYS", "prepare_finetune", "check_compatible", "freeze_d_blocks", "class_embedding_keys",
           "will_resume"]
