"""Typed configuration: dataclass sections, YAML recipes and ``section.key=value`` overrides.

Precedence is command line > YAML file > dataclass defaults. Every field carries a docstring
(the string literal right under it) that ``distgan train --help-config`` prints. Unknown keys and
values of the wrong type are errors that name the key and suggest the closest valid one; they
are raised before any work starts.
"""

from __future__ import annotations

import ast
import re
import dataclasses
import difflib
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distgan.errors import ConfigError
from distgan.gan.augment import POLICIES
from distgan.gan.losses import OBJECTIVES
from distgan.models import check_arch


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true/false. (YAML 1.1 reads `off`, `no`, `on` as booleans,
    which would turn `logging.wandb: off` into False.)"""


_Yaml12Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _load_yaml(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)


@dataclass(frozen=True)
class Rule:
    """The values a config field accepts, declared next to the field (see `setting`)."""

    choices: tuple = ()
    at_least: float | None = None
    greater_than: float | None = None
    less_than: float | None = None
    at_most: float | None = None

    def describe(self) -> str:
        """`must be ...` text (also shown by --help-config)."""
        if self.choices:
            return "must be " + _either([repr(c) if isinstance(c, str) else str(c) for c in self.choices if c != ""])
        bounds = [f"at least {self.at_least:g}" if self.at_least is not None else "",
                  f"greater than {self.greater_than:g}" if self.greater_than is not None else "",
                  f"less than {self.less_than:g}" if self.less_than is not None else "",
                  f"at most {self.at_most:g}" if self.at_most is not None else ""]
        return "must be " + " and ".join(b for b in bounds if b)

    def accepts(self, value: Any) -> bool:
        if isinstance(value, (tuple, list)):  # e.g. Adam betas: the rule holds for each value
            return all(self.accepts(v) for v in value)
        if self.choices:
            return value in self.choices
        return ((self.at_least is None or value >= self.at_least)
                and (self.greater_than is None or value > self.greater_than)
                and (self.less_than is None or value < self.less_than)
                and (self.at_most is None or value <= self.at_most))


def setting(default: Any, **rule: Any) -> Any:
    """A field with a default and the Rule its values must follow (checked by `validate`)."""
    return field(default=default, metadata={"rule": Rule(**rule)})


def _either(options: list[str]) -> str:
    return options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"


def rule_of(key: str) -> Rule | None:
    """The Rule declared for `section.key`, if any."""
    section, name = key.split(".", 1)
    section_cls = next(f.default_factory for f in dataclasses.fields(Config) if f.name == section)
    return next((f.metadata.get("rule") for f in dataclasses.fields(section_cls) if f.name == name), None)


@dataclass
class DataConfig:
    source: str = "builtin:twemoji"
    """Training images: `builtin:twemoji`, `builtin:fashion-mnist`, a shard folder with
    dataset.json, a brace pattern `dir/train-{000000..000009}.tar`, a comma-separated list of
    shards, or any URL webdataset opens (`pipe:...`, `http(s)://`)."""
    resolution: int = 32
    """Image side in pixels; `model.arch` says which it supports (dcgan and resnet: powers of two
    from 16 to 256)."""
    channels: int = setting(3, choices=(1, 3))
    """1 (grayscale) or 3 (RGB). Images are converted on decode."""
    batch_size: int = setting(32, at_least=1)
    """Images per process per step (the global batch is batch_size x world size)."""
    workers: int = setting(1, at_least=0)
    """DataLoader worker processes per rank (0 decodes in the training process)."""
    hflip: bool = True
    """Randomly mirror training images horizontally."""
    shuffle_buffer: int = setting(1000, at_least=0)
    """Samples held in the shuffle buffer of each worker."""
    resampled: bool = False
    """Draw shards with replacement (infinite stream, best for many nodes); otherwise every
    sample is read once per epoch."""
    cache_dir: str = "~/.cache/distgan"
    """Where built-in datasets are materialized into shards once."""
    max_skip_fraction: float = setting(0.05, at_least=0, at_most=1)
    """Stop the run when more than this fraction of samples could not be decoded."""


@dataclass
class ModelConfig:
    arch: str = "dcgan"
    """Architecture from the model registry: `dcgan` or `resnet`."""
    z_dim: int = setting(128, at_least=1)
    """Latent dimension of the generator input."""
    g_width: int = setting(64, at_least=1)
    """Generator base width (channels at the highest resolution)."""
    d_width: int = setting(64, at_least=1)
    """Discriminator base width (channels at the highest resolution)."""
    conditional: bool = False
    """Class-conditional G (conditional batch norm) and projection D; needs labelled data."""
    g_norm: str = setting("batch", choices=("batch", "none"))
    """Generator normalization: `batch` (classic) or `none` (batch-size independent, for exact
    gradient-averaging checks across process counts)."""


@dataclass
class LossConfig:
    objective: str = setting("logistic", choices=OBJECTIVES)
    """`logistic` (non-saturating), `hinge`, `wgan-gp` or `lsgan`."""
    r1_gamma: float = setting(0.0, at_least=0)
    """Weight of the R1 penalty on real images (0 disables it)."""
    r1_interval: int = setting(16, at_least=1)
    """Lazy regularization: apply R1 every this many D steps (learning rate corrected)."""
    gp_weight: float = setting(10.0, at_least=0)
    """Gradient-penalty weight for `wgan-gp`."""
    diffaugment: str = ""
    """DiffAugment policy applied to real and fake images before D, e.g.
    `color,translation,cutout`; empty disables it."""


@dataclass
class OptimConfig:
    d_steps: int = setting(2, at_least=1)
    """Discriminator steps per generator step."""
    g_lr: float = setting(2e-4, greater_than=0)
    """Generator Adam learning rate."""
    d_lr: float = setting(2e-4, greater_than=0)
    """Discriminator Adam learning rate."""
    g_betas: tuple[float, float] = setting((0.5, 0.999), at_least=0, less_than=1)
    """Generator Adam betas."""
    d_betas: tuple[float, float] = setting((0.5, 0.999), at_least=0, less_than=1)
    """Discriminator Adam betas."""
    grad_clip: float = setting(0.0, at_least=0)
    """Clip each network's gradient norm to this value (0 disables clipping)."""
    ema_halflife_kimg: float = setting(2.0, at_least=0)
    """Half-life of the EMA generator, in thousands of images (0 disables EMA updates)."""
    ema_rampup: float = setting(0.05, at_least=0)
    """EMA ramp-up: the half-life is capped at this fraction of the images seen so far."""
    accumulate: int = setting(1, at_least=1)
    """Gradient-accumulation steps per optimizer step (each of batch_size images)."""


@dataclass
class TrainConfig:
    steps: int = setting(3000, at_least=1)
    """Run length in generator steps."""
    seed: int = 0
    """Seed for weights, latents, augmentation and data order."""
    run_dir: str = ""
    """Run folder; empty means runs/<name>."""
    name: str = "default"
    """Run name, used for the run folder and the W&B run."""
    resume: str = "auto"
    """`auto` (latest valid checkpoint in the run folder), `none`, or a checkpoint path."""
    log_every: int = setting(50, at_least=1)
    """Write a metrics row (and a W&B step) every this many generator steps."""
    sample_every: int = setting(500, at_least=1)
    """Write a sample grid every this many generator steps."""
    ckpt_every: int = setting(1000, at_least=1)
    """Save a checkpoint every this many generator steps (and at the end)."""
    keep_ckpts: int = setting(3, at_least=1)
    """How many recent checkpoints to keep."""
    on_nonfinite: str = setting("stop", choices=("stop", "skip"))
    """On a NaN or inf loss: `stop` (keep the last checkpoint) or `skip` the update."""
    progress: bool = True
    """Show a progress bar on the main process."""
    signal_check_every: int = setting(5, at_least=1)
    """Poll for preemption (SIGUSR1/SIGTERM or a PREEMPT file) every this many steps; all
    ranks agree through one small collective."""


@dataclass
class DistConfig:
    backend: str = setting("accelerate", choices=("accelerate", "deepspeed"))
    """`accelerate` (single device, DDP, FSDP) or `deepspeed` (ZeRO)."""
    mixed_precision: str = setting("", choices=("", "no", "bf16", "fp16"))
    """`no`, `bf16` or `fp16`; empty takes what `accelerate launch` was given."""
    fsdp: bool = False
    """Shard G and D with FSDP2 (accelerate backend; CPU or GPU; not with R1 / WGAN-GP)."""
    zero_stage: int = setting(1, choices=(0, 1, 2, 3))
    """DeepSpeed ZeRO stage (0, 1, 2) for the deepspeed backend."""
    deepspeed_config: str = ""
    """DeepSpeed JSON (e.g. launch/ds_zero2.json) for the deepspeed backend, merged under the keys
    distgan sets itself (batch sizes, precision, ZeRO stage, clipping); empty: the file given to
    `accelerate launch`, if any."""
    compile: bool = False
    """Wrap G and D with torch.compile (accelerate backend; slower than eager on CPU)."""
    timeout_s: int = setting(120, at_least=1)
    """Collective timeout: a dead or hung rank stops the others within about this many seconds."""
    expect_world_size: int = setting(0, at_least=0)
    """Fail fast unless the launcher started this many processes (0: only the launcher's own
    request is checked)."""


@dataclass
class LoggingConfig:
    wandb: str = setting("auto", choices=("auto", "online", "offline", "off"))
    """`auto` (online with credentials, else offline), `online`, `offline` or `off`."""
    project: str = "distgan"
    """W&B project."""
    entity: str = ""
    """W&B entity (team or user); empty uses the default."""
    group: str = ""
    """W&B run group."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""


@dataclass
class EvalConfig:
    every_kimg: float = setting(0.0, at_least=0)
    """Evaluate FID/KID of the EMA generator every this many kimg (0 disables)."""
    n_samples: int = 5000
    """Generated and real images per evaluation."""
    extractor: str = setting("inception", choices=("inception", "tiny"))
    """Feature extractor for FID/KID: `inception` or `tiny` (a fixed random conv net, for tests)."""
    inception_weights: str = ""
    """Path to the Inception FID network weights (TorchScript or state dict)."""
    batch_size: int = setting(64, at_least=1)
    """Images per forward pass during evaluation."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {s.name: _plain(dataclasses.asdict(getattr(self, s.name))) for s in dataclasses.fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run_dir or f"runs/{self.train.name}")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------- docs and types


def field_docs(section_cls: type) -> dict[str, str]:
    """The docstring under each field, read from the class source."""
    try:
        tree = ast.parse(inspect.getsource(section_cls))
    except (OSError, TypeError):
        return {}
    docs, body = {}, tree.body[0].body
    for stmt, nxt in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[stmt.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def describe() -> str:
    """Every key with its default and docstring (for --help-config)."""
    lines = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        docs, default = field_docs(cls), cls()
        lines.append(f"[{section.name}]")
        for f in dataclasses.fields(cls):
            rule = f" ({f.metadata['rule'].describe()})" if "rule" in f.metadata else ""
            lines.append(f"  {section.name}.{f.name} = {getattr(default, f.name)!r}{rule}\n      {docs.get(f.name, '')}")
    return "\n".join(lines)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check/convert a YAML or command-line value to the field's declared type."""
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.strip("[]()").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(typ)
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {list(value)!r}")
            return tuple(_coerce(v, t, key) for v, t in zip(value, args))
        return [_coerce(v.strip() if isinstance(v, str) else v, args[0], key) for v in value]
    raise ConfigError(f"{key}: unsupported field type {typ!r}")  # pragma: no cover


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(options))}."


# ---------------------------------------------------------------------------- building


def _apply(cfg: Config, key: str, value: Any) -> None:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if "." not in key:
        raise ConfigError(f"'{key}': keys have the form section.key (e.g. train.steps).{_suggest(key, _all_keys())}")
    section_name, name = key.split(".", 1)
    if section_name not in sections:
        raise ConfigError(f"Unknown config section '{section_name}' in '{key}'.{_suggest(section_name, list(sections))}")
    section = getattr(cfg, section_name)
    hints = typing.get_type_hints(type(section))
    if name not in hints:
        options = [f"{section_name}.{n}" for n in hints]
        raise ConfigError(f"Unknown config key '{key}'.{_suggest(key, options)}")
    setattr(section, name, _coerce(value, hints[name], key))


def _all_keys() -> list[str]:
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(Config) for f in dataclasses.fields(s.default_factory)]


def _flatten(tree: dict[str, Any], source: str) -> dict[str, Any]:
    flat = {}
    for section, values in tree.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: '{section}' must be a section mapping of keys, got {values!r}")
        for k, v in values.items():
            flat[f"{section}.{k}"] = v
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value` -> (key, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"Override '{text}' must look like section.key=value (e.g. train.steps=100).")
    key, raw = text.split("=", 1)
    try:
        value = _load_yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file, then overrides (strings `a.b=c` or a dict {"a.b": c})."""
    cfg = Config()
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file not found: {path}")
        try:
            tree = _load_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        for key, value in _flatten(tree, str(path)).items():
            try:
                _apply(cfg, key, value)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = [parse_override(o) for o in overrides or []]
    for key, value in items:
        _apply(cfg, key, value)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Value checks that do not need data: every field's Rule, the architecture's own limits
    (asked from the model registry) and the DiffAugment policy names (asked from `augment`)."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            rule, value = f.metadata.get("rule"), getattr(values, f.name)
            if rule is not None and not rule.accepts(value):
                key = f"{section.name}.{f.name}"
                close = difflib.get_close_matches(value, rule.choices, n=1, cutoff=0.5) if isinstance(value, str) else []
                hint = f" Did you mean '{close[0]}'?" if close else ""
                each = "each value " if isinstance(value, (tuple, list)) else ""
                raise ConfigError(f"{key}={_plain(value)!r}: {each}{rule.describe()}.{hint}")
    check_arch(cfg.model.arch, cfg.data.resolution, cfg.data.channels)
    if cfg.loss.diffaugment:
        for p in cfg.loss.diffaugment.split(","):
            if p.strip() not in POLICIES:
                raise ConfigError(f"loss.diffaugment: unknown policy '{p}'.{_suggest(p.strip(), list(POLICIES))}")


def frozen_keys() -> tuple[str, ...]:
    """Keys that define networks or optimizers: they may not change when a run resumes."""
    return ("data.resolution", "data.channels", "model.arch", "model.z_dim", "model.g_width", "model.d_width",
            "model.conditional", "loss.objective", "optim.g_lr", "optim.d_lr", "optim.g_betas", "optim.d_betas",
            "loss.r1_interval", "dist.backend", "dist.zero_stage", "optim.d_steps")


__all__ = ["Config", "ConfigError", "Rule", "load_config", "describe", "parse_override", "frozen_keys", "field_docs",
           "rule_of", "setting", "validate"]
