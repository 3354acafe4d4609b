"""Typed configuration: dataclass sections, YAML recipes and ``section.key=value`` overrides.

Precedence is command line > YAML file > dataclass defaults. Every field carries a docstring
(the string literal right under it) that ``distgan train --help-config`` prints. Unknown keys and
values of the wrong type are errors that name the key and suggest the closest valid one; they
are raised before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distgan.config_model import ModelConfig
from distgan.config_values import Rule, _coerce, _load_yaml, _plain, _suggest, field_docs, setting
from distgan.errors import ConfigError
from distgan.gan.augment import POLICIES
from distgan.gan.augment_presets import PRESETS as AUGMENT_PRESETS
from distgan.gan.augment_presets import parse_overrides
from distgan.gan.losses import OBJECTIVES
from distgan.models import check_arch, check_discriminator
from distgan.schedules import Scheduled


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
class LossConfig:
    objective: str = setting("logistic", choices=OBJECTIVES)
    """`logistic` (non-saturating), `hinge`, `wgan-gp`, `lsgan` or `rpgan` (relativistic pairing,
    R3GAN: D and G compare each fake with a real)."""
    r1_gamma: Scheduled = setting(Scheduled(0.0), at_least=0)
    """Weight gamma of the R1 penalty gamma/2 E||grad D(real)||^2 (0 disables it); a number or a
    schedule."""
    r2_gamma: Scheduled | None = setting(None, at_least=0)
    """Weight of the R2 penalty, the same on fake images; unset: equal to `r1_gamma` under `rpgan`
    (R3GAN's R1 + R2) and 0 for the other objectives."""
    r1_interval: int = setting(16, at_least=1)
    """Lazy regularization: apply R1/R2 every this many D steps (learning rate corrected); 1 runs
    them in the D step itself, sharing its forward pass (R3GAN)."""
    gp_weight: float = setting(10.0, at_least=0)
    """Gradient-penalty weight for `wgan-gp`."""
    diffaugment: str = ""
    """DiffAugment policy applied to real and fake images before D, e.g.
    `color,translation,cutout`; empty disables it."""
    augment: str = setting("", choices=("", *AUGMENT_PRESETS))
    """Augmentation pipeline before D (StyleGAN2-ADA's), by preset: `bgc` (NVlabs' preset: blit +
    geometric + color ops, each applied with probability `augment_p`), `bgc-r3gan` (R3GAN's: the
    same with the color ops at 0.5 x `augment_p`, plus cutout at `augment_p`) or empty for none.
    Can be combined with DiffAugment."""
    augment_ops: str = ""
    """Per-op probability multipliers over the `augment` preset, `op=multiplier` comma-separated
    (op runs with probability multiplier x `augment_p`; 0 turns it off), e.g. `hue=0,cutout=1`.
    Ops: xflip, rotate90, xint, scale, rotate, aniso, xfrac, brightness, contrast, lumaflip, hue,
    saturation, cutout (a square of half the image side, zeroed)."""
    augment_p: Scheduled = setting(Scheduled(0.0), at_least=0, at_most=1)
    """Probability of each `bgc` op (a number or a schedule; R3GAN ramps it up). Under ADA, the
    starting value of the adaptive p (then a number)."""
    ada_target: float = setting(0.0, at_least=0, less_than=1)
    """ADA (StyleGAN2-ADA): adapt the `bgc` probability so that r_t = E[sign D(real)] stays at this
    target (the paper: 0.6); 0 turns ADA off. Needs `augment: bgc`."""
    ada_kimg: float = setting(500.0, greater_than=0)
    """ADA speed: p can move from 0 to 1 in this many thousand images."""
    ada_interval: int = setting(4, at_least=1)
    """ADA adjusts p every this many D steps, from the signs of D(real) since the last adjustment."""
    augment_p_max: float = setting(0.0, at_least=0)
    """Upper bound of ADA's p; 0: none, as NVlabs (p may pass 1, and must then come back down
    through the excess before augmentation lessens; a probability above 1 acts as 1). E.g. 1 makes
    p respond at the next adjustment once it falls. It is always clamped at 0 below."""
    augment_supersample: bool = True
    """Warp the `augment` pipeline's geometric ops at 2x between sym6 wavelet filters, with
    reflect-padded borders (NVlabs': no aliasing leaks at high p). false: sample once at the
    image's resolution (~10x cheaper on small CPU images; aliases at high p)."""
    pl_weight: float = setting(0.0, at_least=0)
    """Path-length regularization weight (StyleGAN2: 2); 0 turns it off. Needs a generator with a
    mapping network (`model.arch: stylegan2`); runs as a lazy G phase `Greg`."""
    pl_interval: int = setting(4, at_least=1)
    """Run the path-length phase every this many G steps (weighted by it; G's Adam corrected)."""
    pl_batch_shrink: int = setting(2, at_least=1)
    """The path-length phase uses batch_size / this latents (StyleGAN2: 2)."""
    pl_decay: float = setting(0.01, greater_than=0, at_most=1)
    """Update rate of the running mean `a` of path lengths that the penalty pulls towards."""
    pl_target: str = setting("updated", choices=("updated", "phase_start"))
    """What the path-length penalty pulls towards. `updated` (NVlabs): `a` moved by this
    micro-batch's mean length, with the gradient flowing through that mean (its `pl_decay` share).
    `phase_start`: `a` as the phase began, a constant. Either way `a` itself then moves by the mean
    over every micro-batch and rank, so it stays the same on every rank."""
    g_reals: str = setting("fresh", choices=("fresh", "reuse"))
    """Real images of a relativistic objective's (`rpgan`) G step: `fresh` draws its own batch
    (R3GAN's training loop; not counted as images shown to D), `reuse` takes those of the step's
    last D phase (one batch fewer to load per step)."""
    fake_labels: str = setting("data", choices=("data", "uniform"))
    """Class labels of the fakes G makes for a conditional model (when they are not paired with
    reals): `data` draws them from the training set's class frequencies (NVlabs draws dataset
    labels), `uniform` from all classes alike."""

    def r2(self) -> Scheduled:
        """`r2_gamma`, or its default when unset: `r1_gamma` under rpgan, else 0."""
        if self.r2_gamma is not None:
            return self.r2_gamma
        return self.r1_gamma if self.objective == "rpgan" else Scheduled(0.0)

    def penalties(self) -> tuple[str, ...]:
        """The zero-centered gradient penalties that are on: "r1" (reals), "r2" (fakes)."""
        return tuple(name for name, gamma in (("r1", self.r1_gamma), ("r2", self.r2())) if gamma.nonzero())

    @property
    def ada(self) -> bool:
        """Adaptive augmentation is on."""
        return self.ada_target > 0


@dataclass
class OptimConfig:
    d_steps: int = setting(2, at_least=1)
    """Discriminator steps per generator step."""
    g_lr: Scheduled = setting(Scheduled(2e-4), greater_than=0)
    """Generator Adam learning rate (a number, or a schedule {start, end, kimg, shape})."""
    d_lr: Scheduled = setting(Scheduled(2e-4), greater_than=0)
    """Discriminator Adam learning rate (a number or a schedule)."""
    g_betas: tuple[Scheduled, Scheduled] = setting((Scheduled(0.5), Scheduled(0.999)), at_least=0, less_than=1)
    """Generator Adam betas; each a number or a schedule (R3GAN anneals beta2)."""
    d_betas: tuple[Scheduled, Scheduled] = setting((Scheduled(0.5), Scheduled(0.999)), at_least=0, less_than=1)
    """Discriminator Adam betas; each a number or a schedule."""
    grad_clip: float = setting(0.0, at_least=0)
    """Clip each network's gradient norm to this value (0 disables clipping)."""
    ema_halflife_kimg: Scheduled = setting(Scheduled(2.0), at_least=0)
    """Half-life of the EMA generator, in thousands of images (0: the EMA copies G); a number or
    a schedule."""
    ema_rampup: float = setting(0.05, at_least=0)
    """EMA ramp-up: the half-life is capped at this fraction of the images seen so far (0: no
    cap, e.g. when `ema_halflife_kimg` is a schedule that starts at 0, as in R3GAN)."""
    accumulate: int = setting(1, at_least=1)
    """Gradient-accumulation steps per optimizer step (each of batch_size images)."""
    adam_impl: str = setting("auto", choices=("auto", "fused", "foreach", "loop"))
    """torch Adam implementation: `fused` (one kernel for all tensors), `foreach` (batched ops),
    `loop` (per tensor); `auto`: fused on GPUs, foreach on the CPU and under fp16 loss scaling with
    Accelerate (where `fused` is refused: Accelerate cannot see its skipped steps). Same update, last bits may differ."""


@dataclass
class TrainConfig:
    steps: int = setting(3000, at_least=1)
    """Run length in generator steps."""
    max_minutes: float = setting(0.0, at_least=0)
    """Also stop (as a finished run: final checkpoint, samples and evaluation) once this launch
    has trained this many minutes, evaluations excluded; checked at log steps (0: no limit)."""
    seed: int = 0
    """Seed for weights, latents, augmentation and data order."""
    run_dir: str = ""
    """Run folder; empty means runs/<name>."""
    name: str = "default"
    """Run name, used for the run folder and the W&B run."""
    resume: str = "auto"
    """`auto` (latest valid checkpoint in the run folder), `none`, or a checkpoint path."""
    init_from: str = ""
    """Fine-tune: a new run starts from the G, D and EMA weights of this checkpoint, run folder or
    `distgan export` folder (fresh counters and optimizers); a run that resumes ignores it."""
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
    """Poll for preemption (SIGUSR1/SIGTERM or a PREEMPT file) every this many steps, and every
    this many batches of an evaluation (which is then given up: the resumed run redoes it); all
    ranks agree through one small collective."""
    health_checks: bool = True
    """Watch the log rows for a dead D, a D that wins outright and sample collapse; each warns
    once (log, `warning/...` in metrics.jsonl, W&B alert). Costs one G forward on the fixed
    sample latents per log row (main process)."""
    health_window: int = setting(5, at_least=1)
    """Consecutive log rows a health condition must hold before it warns."""
    global_batch: int | None = setting(None, at_least=1)
    """Images per optimizer step over all processes, kept constant when the world size changes:
    per-process batch and `optim.accumulate` are derived from it (`data.batch_size` is then
    the largest micro-batch a process runs). Unset: data.batch_size x accumulate x world size."""
    deterministic: bool = False
    """Bitwise-repeatable GPU runs and resumes: deterministic algorithms only (an op without one
    raises and is named; bgc's warp and r3gan's upsampling switch to deterministic equivalents),
    CUBLAS_WORKSPACE_CONFIG=:4096:8, cuDNN deterministic and its autotuner off. Slower; for
    debugging and reproducibility checks (what is exact without it: launch/README.md)."""


@dataclass
class DistConfig:
    backend: str = setting("accelerate", choices=("accelerate", "deepspeed"))
    """`accelerate` (single device, DDP, FSDP) or `deepspeed` (ZeRO)."""
    mixed_precision: str = setting("", choices=("", "no", "bf16", "fp16", "auto"))
    """`no`, `bf16`, `fp16` or `auto`: bf16 on GPUs with compute capability >= 8.0 (A100, H100),
    fp16 with loss scaling on older GPUs (V100, T4), `no` on the CPU (logged at start, with the
    reason). Empty takes what `accelerate launch` was given. Wins over the launcher's value."""
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
    timeout_s: int = setting(1800, at_least=1)
    """Collective timeout in seconds: how long a rank waits in a collective for the others. It
    must cover work one rank does alone while the others wait (rank 0 writing and hashing a
    checkpoint of several GB on a shared filesystem, `wandb.init` retrying online, ranks compiling).
    Under gloo (CPU) a timeout raises, and `fail_fast` names the rank that failed or hung; under
    NCCL the watchdog (TORCH_NCCL_ASYNC_ERROR_HANDLING, on by default) aborts the process with
    SIGABRT instead, so nothing is named and the launcher only reports the abort. A killed rank
    is seen at once on either backend (its sockets close); a hung one after this long."""
    expect_world_size: int = setting(0, at_least=0)
    """Fail fast unless the launcher started this many processes (0: only the launcher's own
    request is checked)."""
    cudnn_benchmark: bool = True
    """Let cuDNN time its convolution algorithms for each new input shape and keep the fastest
    (GAN shapes are fixed, so it pays after the first steps); off under train.deterministic."""
    channels_last: bool = False
    """Store G's and D's weights in channels_last (NHWC) memory format: faster convolutions with
    Tensor Cores under bf16/fp16 on GPUs. Checkpoints are unaffected (saved contiguous)."""


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


# ---------------------------------------------------------------------------- docs and types


def describe(cfg: Config | None = None) -> str:
    """Every key with its value in `cfg` (default: the dataclass defaults) and docstring, for
    --help-config; a value that differs from the dataclass default names that default too."""
    cfg = cfg or Config()
    lines = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        docs, default, values = field_docs(cls), cls(), getattr(cfg, section.name)
        lines.append(f"[{section.name}]")
        for f in dataclasses.fields(cls):
            rule = f" ({f.metadata['rule'].describe()})" if "rule" in f.metadata else ""
            value, base = getattr(values, f.name), getattr(default, f.name)
            changed = f"  [default {base!r}]" if value != base else ""
            lines.append(f"  {section.name}.{f.name} = {value!r}{rule}{changed}\n      {docs.get(f.name, '')}")
    return "\n".join(lines)


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
    if cfg.model.d_arch:
        check_discriminator(cfg.model.d_arch, cfg.data.resolution, cfg.data.channels)
    stages = cfg.data.resolution.bit_length() - 2  # 4x4 up to the resolution
    if cfg.model.widths and len(cfg.model.widths) != stages:
        raise ConfigError(f"model.widths={cfg.model.widths}: resolution {cfg.data.resolution} has {stages} stages "
                          f"(4x4 up to {cfg.data.resolution}x{cfg.data.resolution}), so it needs {stages} widths.")
    if any(w < 1 for w in cfg.model.widths):
        raise ConfigError(f"model.widths={cfg.model.widths}: every width must be at least 1.")
    loss = cfg.loss
    if loss.ada and not loss.augment:
        raise ConfigError(f"loss.ada_target={loss.ada_target}: ADA adapts the probability of the `bgc` augmentations; "
                          "set loss.augment=bgc (or loss.ada_target=0 to turn ADA off).")
    if loss.augment_ops and not loss.augment:
        raise ConfigError(f"loss.augment_ops={loss.augment_ops!r} adjusts a pipeline that is off: set loss.augment "
                          f"to a preset ({', '.join(AUGMENT_PRESETS)}) or leave augment_ops empty.")
    try:
        parse_overrides(loss.augment_ops)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if loss.ada and not loss.augment_p.constant:
        raise ConfigError("loss.augment_p is a schedule, but ADA (loss.ada_target > 0) sets p itself: give augment_p "
                          "as one number (ADA's starting p) or set loss.ada_target=0.")
    if loss.ada and loss.augment_p_max and loss.augment_p.at(0) > loss.augment_p_max:
        raise ConfigError(f"loss.augment_p={loss.augment_p.at(0)} is above loss.augment_p_max={loss.augment_p_max}.")
    if cfg.loss.diffaugment:
        for p in cfg.loss.diffaugment.split(","):
            if p.strip() not in POLICIES:
                raise ConfigError(f"loss.diffaugment: unknown policy '{p}'.{_suggest(p.strip(), list(POLICIES))}")


def frozen_keys() -> tuple[str, ...]:
    """Keys that define networks or optimizers: they may not change when a run resumes."""
    return ("data.resolution", "data.channels", "model.arch", "model.z_dim", "model.g_width", "model.d_width",
            "model.conditional", "model.widths", "model.blocks_per_stage", "model.expansion", "model.group_size", "loss.objective", "optim.g_lr", "optim.d_lr", "optim.g_betas", "optim.d_betas",
            "loss.r1_interval", "loss.pl_interval", "optim.d_steps", "model.freeze_d", "model.w_dim", "model.mapping_layers",
            "model.d_mapping_layers",
            "model.d_arch", "model.projected_resolution", "model.projected_scales")


__all__ = ["Config", "ConfigError", "Rule", "load_config", "describe", "parse_override", "frozen_keys", "field_docs",
           "rule_of", "setting", "validate"]
