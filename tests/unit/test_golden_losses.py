"""distgan's objective against the references' losses, number for number (issue 20).

The fixtures (tests/fixtures/golden/losses_*/, made by tools/make_golden_fixtures.py from the
reference checkouts; reference and commit in their metadata) hold tiny networks' weights under
distgan's names, fixed inputs (reals, z, labels, path-length directions), and what the
reference's loss computes for each phase: the loss value and the gradient of every parameter of
the trained network after the phase's backward (times the reference's gain), and for
StyleGAN2's Greg the updated pl_mean.

Here the same weights and inputs go through distgan's own `GANObjective.accumulate_gradients`
with the phases of `build_phases`, through a real single-process backend's phase handle; the
recorded draws are fed through the objective's `noise` argument.

Tolerances, relative error measured as ||a - b|| / ||b|| (a reference tensor of exact zeros must
be matched exactly): loss values 1e-6; a network's whole gradient (every parameter's gradient as
one vector) 1e-6; each parameter's gradient tensor 3e-5. Both sides compute in fp32 (the
reference casts to fp32 inside its blocks, so it cannot run in fp64) with different but
equivalent op orders (e.g. real and fake in one D forward here, two in the reference), which
leaves single small tensors (a scalar noise strength's gradient in Greg: a sum of larger terms
that mostly cancel) at up to 1.0e-5 relative, while the whole gradient agrees to ~1e-6 and below;
a tensor that were really wrong would be off by order 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors import safe_open
from safetensors.torch import load_file

from distgan.backends import build_backend
from distgan.backends.base import AdamSpec
from distgan.config import load_config
from distgan.gan.objective import GANObjective
from distgan.gan.phases import build_phases
from distgan.models import build_models

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden"
COMMITS = {"NVlabs/stylegan2-ada-pytorch": "d72cc7d041b42ec8e806021a205ed9349f87c6a4",
           "brownvc/R3GAN": "19a7ddf463fbac2bd39b4c1c73d63f1c441c7403"}
RTOL = 1e-6  # loss values and each network's whole gradient
RTOL_TENSOR = 3e-5  # each parameter's gradient tensor (fp32 summation-order floor, see above)


def fixture(part: str, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    path = GOLDEN / part / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert COMMITS.get(meta.get("reference")) == meta.get("commit"), f"{path}: metadata {meta}"
    return load_file(str(path)), {k: (v if k in ("reference", "commit", "torch", "numpy") else json.loads(v))
                                  for k, v in meta.items()}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - b|| / ||b|| over the whole tensor; a zero reference must be matched exactly."""
    diff = (actual.detach().double() - expected.double()).norm().item()
    scale = expected.double().norm().item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


class RecordedDraws:
    """The reference's recorded random inputs, handed out in the order the objective asks."""

    def __init__(self, z: torch.Tensor, labels: torch.Tensor | None, pl_noise: torch.Tensor | None = None):
        self.z, self.labels, self.pl_noise = z, labels, pl_noise

    def latents(self, n, z_dim, num_classes, device):
        return self.z[:n], (self.labels[:n] if num_classes else None)

    def uniform(self, shape, like):
        raise AssertionError("no phase here draws uniforms")

    def normal(self, like):
        assert self.pl_noise is not None and self.pl_noise.shape == like.shape
        return self.pl_noise.to(like.dtype)


def run_phases(cfg, tensors: dict[str, torch.Tensor], num_classes: int, setup_phase) -> dict[str, dict]:
    """Every phase of `build_phases(cfg)` once, from the fixture's weights (no optimizer step in
    between, as the fixtures were made); `setup_phase(phase, backend)` gives its objective and
    real batch. Returns {phase: {"loss", "grads", "objective"}}."""
    AcceleratorState._reset_state()
    GradientState._reset_state()
    backend = build_backend(cfg)
    results = {}
    try:
        G, D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels, num_classes)
        G.load_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith("G.")})
        D.load_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith("D.")})
        backend.setup(G, D, {net: AdamSpec(1e-3, (0.0, 0.99)) for net in ("G", "D")})
        for phase in dict.fromkeys(build_phases(cfg)):
            objective, real, real_labels = setup_phase(phase, backend)
            h = backend.phase_handle(phase)
            with h:
                stats = objective.accumulate_gradients(phase, h, real, real_labels, scale=1.0)
                module = backend.module(phase.net)
                grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                         for n, p in module.named_parameters()}
                objective.end_phase(phase, h)
                h.discard()  # every phase starts from the fixture's weights
            results[phase.name] = {"loss": stats["loss"], "grads": grads, "objective": objective}
    finally:
        backend.close()
    return results


def assert_phase_matches(name: str, result: dict, tensors: dict[str, torch.Tensor]) -> None:
    loss_error = relative_error(result["loss"], tensors[f"{name}.loss"])
    assert loss_error <= RTOL, f"{name}: loss {result['loss'].item()} vs the reference's {tensors[f'{name}.loss'].item()}"
    prefix = f"{name}.grad."
    expected = {k[len(prefix):]: v.reshape(result["grads"][k[len(prefix):]].shape)
                for k, v in tensors.items() if k.startswith(prefix)}
    assert set(expected) == set(result["grads"]), f"{name}: parameters differ from the fixture's"
    assert any(v.abs().sum() > 0 for v in expected.values()), f"{name}: the reference's gradients are all zero"
    names = sorted(expected)
    whole = relative_error(torch.cat([result["grads"][k].flatten() for k in names]),
                           torch.cat([expected[k].flatten() for k in names]))
    assert whole <= RTOL, f"{name}: the whole gradient differs by {whole:.2e} relative (tolerance {RTOL})"
    errors = {k: relative_error(result["grads"][k], expected[k]) for k in names}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= RTOL_TENSOR, \
        f"{name}: {worst}'s gradient differs by {errors[worst]:.2e} relative (tolerance {RTOL_TENSOR})"


# ---------------------------------------------------------------------------------- StyleGAN2-ADA
@pytest.mark.parametrize("name", ["uncond", "cond", "uncond_mix"])
def test_stylegan2_losses_and_gradients_match_nvlabs(name, tmp_path):
    """Gmain (non-saturating), Greg (path length, pl_batch_shrink, pl_decay, pl_mean), Dmain
    (logistic on fakes and reals), Dreg (R1, lazy gain) against NVlabs' StyleGAN2Loss, and R1 in
    the D step (`loss.r1_interval=1`: distgan's Dmain, one D forward on reals and fakes) against
    its Dboth; without style mixing, and with it at 0.9 (its draws inside G's forward come from
    torch's global RNG in the reference's order, so each phase starts from the fixture's seed)."""
    tensors, meta = fixture("losses_stylegan2", name)
    loss, gains = meta["loss"], meta["gains"]
    overrides = {**meta["overrides"], "loss.objective": "logistic", "loss.r1_gamma": loss["r1_gamma"],
                 "loss.r1_interval": gains["Dreg"], "loss.pl_weight": loss["pl_weight"],
                 "loss.pl_interval": gains["Greg"], "loss.pl_batch_shrink": loss["pl_batch_shrink"],
                 "loss.pl_decay": loss["pl_decay"], "loss.diffaugment": "", "loss.augment": "",
                 "model.style_mixing_prob": meta["style_mixing_prob"], "optim.d_steps": 1, "data.batch_size": 4,
                 "train.run_dir": str(tmp_path)}
    cfg = load_config(None, overrides)
    classes = meta["num_classes"]
    assert [p.name for p in build_phases(cfg)] == ["Dmain", "Dreg", "Gmain", "Greg"]
    assert {p.name: p.gain for p in build_phases(cfg)} == {k: float(v) for k, v in gains.items() if k != "Dboth"}
    key = {"Gmain": "Gmain", "Greg": "Greg", "Dmain": "Dmain", "Dreg": "Dreg"}  # distgan's phase -> fixture's

    def setup_phase(phase, backend):
        name = key[phase.name]
        draws = RecordedDraws(tensors[f"{name}.z"], tensors[f"{name}.labels"],
                              tensors.get("Greg.pl_noise") if name == "Greg" else None)
        objective = GANObjective(cfg.loss, cfg.model.z_dim, classes, 4, backend.device, noise=draws)
        objective.set_hyperparameters(loss["r1_gamma"], 0.0, 0.0)
        objective.pl_mean.fill_(meta["pl_mean_before"])
        backend.module("G").noise_mode = meta["noise_mode"]
        torch.manual_seed(int(tensors[f"{name}.seed"]))  # style mixing draws from here
        return objective, tensors["inputs.real"], tensors["inputs.real_labels"] if classes else None

    results = run_phases(cfg, tensors, classes, setup_phase)
    for phase in ("Gmain", "Greg", "Dmain", "Dreg"):
        assert_phase_matches(phase, results[phase], tensors)
    pl_mean = results["Greg"]["objective"].pl_mean
    assert relative_error(pl_mean, tensors["Greg.pl_mean_after"]) <= RTOL

    cfg = load_config(None, {**overrides, "loss.r1_interval": 1, "loss.pl_weight": 0})  # R1 inside Dmain
    assert [(p.name, p.terms, p.gain) for p in build_phases(cfg)] == [("Dmain", ("d_adv", "r1"), 1.0),
                                                                      ("Gmain", ("g_adv",), 1.0)]
    key["Dmain"] = "Dboth"
    assert_phase_matches("Dboth", run_phases(cfg, tensors, classes, setup_phase)["Dmain"], tensors)


# ---------------------------------------------------------------------------------- R3GAN
@pytest.mark.parametrize("name", ["uncond", "cond"])
def test_r3gan_losses_and_gradients_match_brownvc(name, tmp_path):
    """D: relativistic pairing softplus(D(fake) - D(real)) + gamma/2 (R1 + R2), fakes taking the
    reals' labels, in one backward; G: softplus(D(real) - D(fake)) on its own real batch
    (`loss.g_reals=fresh`, the default), against R3GAN's AdversarialTraining."""
    tensors, meta = fixture("losses_r3gan", name)
    cfg = load_config(None, {**meta["overrides"], "loss.objective": "rpgan", "loss.r1_gamma": meta["gamma"],
                             "loss.r1_interval": 1, "loss.diffaugment": "", "loss.augment": "", "optim.d_steps": 1,
                             "data.batch_size": 4, "train.run_dir": str(tmp_path)})
    classes = meta["num_classes"]
    phases = build_phases(cfg)
    assert [(p.name, p.terms, p.real) for p in phases] == [("Dmain", ("d_adv", "r1", "r2"), "fresh"),
                                                           ("Gmain", ("g_adv",), "own")]
    def setup_phase(phase, backend):
        key = phase.name
        labels = tensors[f"{key}.labels"] if classes else None
        objective = GANObjective(cfg.loss, cfg.model.z_dim, classes, 4, backend.device,
                                 noise=RecordedDraws(tensors[f"{key}.z"], labels))
        objective.set_hyperparameters(meta["gamma"], meta["gamma"], 0.0)
        return objective, tensors[f"{key}.real"], labels

    results = run_phases(cfg, tensors, classes, setup_phase)
    for phase in ("Dmain", "Gmain"):
        assert_phase_matches(phase, results[phase], tensors)
