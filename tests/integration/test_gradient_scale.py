"""Gradient scale is the same however a global batch is split: 1 process x 8 images, 1 x 4 with
accumulation 2, 2 processes x 4 (DDP, FSDP, DeepSpeed ZeRO 0/1/2) and 2 x 2 x accumulation 2,
for every objective in `losses.OBJECTIVES` and every regularizer (R1 in the D step and lazy,
R2 when the config has it, WGAN-GP's penalty, StyleGAN2's path length).

Why not weights after Adam steps: Adam divides each update by the gradient's running RMS, so a
uniform gradient scale (a missing 1/accumulate, a sum where a mean belongs, an all-reduce that
sums) leaves its updates almost unchanged. Here every run trains with plain SGD (the one swap,
tests/helpers/linear_steps.py: the backends' distributed machinery is the real one), whose
update is lr x gradient, and two things are compared at every step:

* the gradient norms each backend reports (`StepReport.grad_norm`, logged as `G/grad_norm` and
  `D/grad_norm` in metrics.jsonl), a direct reading of the gradient's scale;
* the whole update, final minus initial weights of G and D, relative to its size.

Data, latents and WGAN-GP mixing weights are keyed by the global sample index (rank_harness
DISTGAN_TEST_INDEXED) and G has no batch norm, so only float summation order differs between
splits. Negative control: the same accumulation run with a planted missing 1/accumulate must fail
both comparisons.

All runs share three launches (one per launcher/backend family) to keep start-up costs down.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distgan.backends import check_combination
from distgan.config import ConfigError, LossConfig, load_config
from distgan.gan.losses import OBJECTIVES
from tests.helpers.launch import HARNESS, launch, read_dumps, tail, tiny_args, torchrun_cmd
from tests.integration.test_distributed import assert_ranks_identical

pytestmark = pytest.mark.slow

LR = 0.02
"""SGD step size: large enough that two steps move the weights far above float rounding."""
TOLERANCE = 1e-4
"""Relative difference allowed between splits (float summation order; measured ~1e-6)."""
STEPS = 2

BASE = [a for a in tiny_args(Path("unused"), "model.g_norm=none", "loss.diffaugment=", "data.hflip=false",
                             f"train.steps={STEPS}", "train.log_every=1", "optim.ema_halflife_kimg=0.01",
                             "train.resume=none", f"optim.g_lr={LR}", f"optim.d_lr={LR}")
        if not a.startswith(("data.batch_size", "train.run_dir"))]


def _cases() -> dict[str, list[str]]:
    """Every objective, then the regularizers on the logistic objective (GP comes with wgan-gp)."""
    cases = {o: [f"loss.objective={o}"] for o in OBJECTIVES}
    cases["r1"] = ["loss.objective=logistic", "loss.r1_gamma=1.0", "loss.r1_interval=1"]
    cases["r1-lazy"] = ["loss.objective=logistic", "loss.r1_gamma=1.0", "loss.r1_interval=2"]  # Dreg phase, gain 2
    if "r2_gamma" in LossConfig.__dataclass_fields__:
        cases["r2"] = ["loss.objective=logistic", "loss.r2_gamma=1.0", "loss.r1_interval=1"]
    # StyleGAN2's path-length phase (Greg, a double backward through G), every step and on the whole
    # batch so that every split draws the same latents; const noise keeps each sample's gradient
    # independent of the split. Minibatch-std groups of 1: with groups of 2 some features of this
    # tiny D have a group variance of ~4e-9 at initialization, next to the 1e-8 under its sqrt, whose
    # slope (~4e3) turns the float summation order of one split into a 1% difference of D's biases
    # at the second step (seen with 2 processes x 2 x accumulation 2, with the flat and the
    # bucketed all-reduce alike); that is arithmetic, not a gradient-scale error.
    # (With groups of 1 the layout is moot; consecutive is the one that splits across processes exactly.)
    # The penalty's target is the phase's starting running mean: NVlabs' (`loss.pl_target=updated`,
    # the default) moves it by each micro-batch's mean first, which depends on the split by design.
    cases["pl"] = ["loss.objective=logistic", "model.arch=stylegan2", "model.mapping_layers=2", "model.mbstd_group=1",
                   "model.mbstd_layout=consecutive", "loss.pl_target=phase_start",
                   "model.noise_mode=const", "loss.pl_weight=2", "loss.pl_interval=1", "loss.pl_batch_shrink=1"]
    # The projected discriminator (frozen EfficientNet-Lite0 features, fixed random projections,
    # spectral-normalised heads) on its recipe's hinge loss, upsampling the 16 px images to 32.
    cases["projected"] = ["loss.objective=hinge", "model.d_arch=projected", "model.projected_scales=2"]
    return cases


CASES = _cases()
WHOLE_BATCH_ONLY = {"projected"}
"""Cases compared only across process counts, not accumulation: spectral norm's power iteration
steps once per forward, so two micro-batches refine sigma twice where one batch does it once."""
ONE_X8, ONE_X4_ACC2 = ["data.batch_size=8"], ["data.batch_size=4", "optim.accumulate=2"]
TWO_X4, TWO_X2_ACC2 = ["data.batch_size=4"], ["data.batch_size=2", "optim.accumulate=2"]
FSDP, ZERO_STAGES = ["dist.fsdp=true"], (0, 1, 2)


@dataclass(frozen=True)
class Run:
    """One training run of a launch: what it is compared as, and how it is configured."""

    case: str
    split: str
    overrides: tuple[str, ...]
    mutant: str = ""

    def entry(self) -> dict:
        """Its rank_harness MULTI entry (tests/helpers/linear_steps.py): SGD, plus the planted bug."""
        entry = {"overrides": list(self.overrides), "optimizer": "sgd"}
        return {**entry, "mutant": self.mutant} if self.mutant else entry


def _supported(overrides: list[str]) -> bool:
    """What the backends accept (FSDP refuses double backward: R1, R2, WGAN-GP)."""
    try:
        check_combination(load_config(None, BASE + overrides), cuda=False)
    except ConfigError:
        return False
    return True


def _one_process_runs() -> list[Run]:
    runs = []
    for case, extra in CASES.items():
        runs.append(Run(case, "1x8", (*extra, *ONE_X8)))
        if case not in WHOLE_BATCH_ONLY:
            runs.append(Run(case, "1x4 acc2", (*extra, *ONE_X4_ACC2)))
    logistic = CASES["logistic"]
    runs.append(Run("logistic", "1x4 acc2 summed", (*logistic, *ONE_X4_ACC2), mutant="summed-micro-batches"))
    return runs


def _ddp_fsdp_runs() -> list[Run]:
    runs = []
    for case, extra in CASES.items():
        runs.append(Run(case, "2x4 ddp", (*extra, *TWO_X4)))
        if case not in WHOLE_BATCH_ONLY:
            runs.append(Run(case, "2x2 acc2 ddp", (*extra, *TWO_X2_ACC2)))
        if _supported([*extra, *FSDP]):
            runs.append(Run(case, "2x4 fsdp", (*extra, *TWO_X4, *FSDP)))
    runs.append(Run("logistic", "2x2 acc2 fsdp", (*CASES["logistic"], *TWO_X2_ACC2, *FSDP)))
    return runs


def _zero_runs(ds_config: Path) -> list[Run]:
    runs = []
    for stage in ZERO_STAGES:
        zero = ("dist.backend=deepspeed", f"dist.zero_stage={stage}", f"dist.deepspeed_config={ds_config}")
        runs += [Run(case, f"2x4 zero{stage}", (*extra, *TWO_X4, *zero)) for case, extra in CASES.items()]
        runs.append(Run("logistic", f"2x2 acc2 zero{stage}", (*CASES["logistic"], *TWO_X2_ACC2, *zero)))
    return runs


@dataclass
class Outcome:
    """What one run left behind: final and initial weights, and the grad norms per step."""

    run: Run
    final: dict[str, torch.Tensor]
    initial: dict[str, torch.Tensor]
    norms: dict[str, list[float]]

    def update(self) -> dict[str, torch.Tensor]:
        # StyleGAN2's `w_avg` is a running statistic, not a trained weight: each rank moves it by
        # its own batch and rank 0's wins (as a BatchNorm mean would), so it depends on the split.
        # Spectral norm's power-iteration vectors (`_u`, `_v`) are not trained weights either: under
        # FSDP they take extra iterations outside the steps (measured: only they differed, by up to
        # 8e-3, while every trained weight agreed within 1e-7 and so did both steps' grad norms).
        return {k: self.final[k] - self.initial[k] for k in self.initial
                if not k.endswith(("w_avg", "._u", "._v"))}


def _launch(tmp: Path, name: str, runs: list[Run], processes: int, timeout: float) -> list[Outcome]:
    (tmp / f"{name}.json").write_text(json.dumps([r.entry() for r in runs]))
    args = BASE + [f"train.run_dir={tmp / name}"]
    cmd = torchrun_cmd(2, HARNESS, args) if processes == 2 else [sys.executable, str(HARNESS), *args]
    result = launch(cmd, {"DISTGAN_TEST_INDEXED": "1", "DISTGAN_TEST_MULTI": str(tmp / f"{name}.json"),
                          "DISTGAN_TEST_DUMP": str(tmp / f"{name}-dump")}, timeout=timeout)
    assert result.returncode == 0, tail(result)
    outcomes = []
    for i, run in enumerate(runs):
        dump = tmp / f"{name}-dump" / str(i)
        dumps = read_dumps(dump)
        assert [info["world_size"] for _, info in dumps] == [processes] * processes, run
        assert_ranks_identical(dumps)
        initial = load_file(str(dump / "init-rank-0.safetensors"))
        rows = [json.loads(line) for line in (tmp / name / str(i) / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "D/grad_norm" in r]
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), (run, rows)
        norms = {net: [r[f"{net}/grad_norm"] for r in rows] for net in ("G", "D")}
        outcomes.append(Outcome(run, dumps[0][0], initial, norms))
    return outcomes


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[tuple[str, str], Outcome]:
    """Every run of the three launches, by (case, split)."""
    pytest.importorskip("deepspeed")
    tmp = tmp_path_factory.mktemp("scale")
    # DeepSpeed's ZeRO refuses optimizers it has not tested (SGD among them) unless told so.
    ds_config = tmp / "ds_allow_sgd.json"
    ds_config.write_text(json.dumps({"zero_allow_untested_optimizer": True}))
    found = _launch(tmp, "one", _one_process_runs(), 1, timeout=900)
    found += _launch(tmp, "ddp", _ddp_fsdp_runs(), 2, timeout=900)
    found += _launch(tmp, "zero", _zero_runs(ds_config), 2, timeout=900)
    return {(o.run.case, o.run.split): o for o in found}


def relative_update_difference(a: Outcome, b: Outcome) -> float:
    """max |update_a - update_b| / max |update_a| over every G and D tensor."""
    ua, ub = a.update(), b.update()
    size = max(u.abs().max().item() for u in ua.values())
    assert size > 1e-3, f"{a.run}: the weights barely moved (max update {size:g}); nothing was compared"
    return max((ua[k] - ub[k]).abs().max().item() for k in ua) / size


def relative_norm_difference(a: Outcome, b: Outcome) -> float:
    """Largest relative difference of the reported G and D gradient norms over all steps."""
    worst = 0.0
    for net in ("G", "D"):
        for x, y in zip(a.norms[net], b.norms[net], strict=True):
            assert x > 0, f"{a.run}: {net} grad norm {x} (no gradient measured)"
            worst = max(worst, abs(x - y) / x)
    return worst


def _splits(outcomes, case: str) -> list[str]:
    return [split for (c, split), o in outcomes.items() if c == case and split != "1x8" and not o.run.mutant]


@pytest.mark.parametrize("case", list(CASES))
def test_every_split_has_the_gradient_of_one_process_with_the_whole_batch(outcomes, case):
    reference = outcomes[(case, "1x8")]
    splits = _splits(outcomes, case)
    assert "2x4 ddp" in splits and "2x4 zero2" in splits and ("1x4 acc2" in splits or case in WHOLE_BATCH_ONLY)
    if case == "projected":
        assert {"2x4 fsdp", "2x4 zero0", "2x4 zero1"} <= set(splits), splits
    failures = []
    for split in splits:
        other = outcomes[(case, split)]
        norms, update = relative_norm_difference(reference, other), relative_update_difference(reference, other)
        if norms > TOLERANCE or update > TOLERANCE:
            failures.append(f"{split}: grad norms differ by {norms:.2e}, updates by {update:.2e} (relative)")
    assert not failures, f"{case}: not the gradient of 1 process x 8 images:\n" + "\n".join(failures)


def test_accumulation_is_covered_on_every_backend(outcomes):
    assert {split for c, split in outcomes if c == "logistic" and "acc2" in split} >= {
        "1x4 acc2", "2x2 acc2 ddp", "2x2 acc2 fsdp", "2x2 acc2 zero0", "2x2 acc2 zero1", "2x2 acc2 zero2"}


def test_a_missing_one_over_accumulate_is_caught(outcomes):
    """Negative control: with the bug planted (micro-batch losses summed, not averaged) the
    accumulation run's gradient is twice the true one, and both comparisons fail by far."""
    reference, buggy = outcomes[("logistic", "1x8")], outcomes[("logistic", "1x4 acc2 summed")]
    ratio = buggy.norms["D"][0] / reference.norms["D"][0]
    assert 1.9 < ratio < 2.1, f"D's first grad norm is {ratio:.3f}x the reference's, not 2x"
    assert relative_norm_difference(reference, buggy) > 100 * TOLERANCE
    assert relative_update_difference(reference, buggy) > 100 * TOLERANCE
