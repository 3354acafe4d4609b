"""Path-length regularization (the `pl` term of the lazy `Greg` phase): the penalty against a
Jacobian that autograd computes sample by sample, its running mean, its gradients and its phase,
and the phase under bf16 autocast through a real Accelerate backend."""

import contextlib
import math

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from torch import nn

from distgan.backends.accelerate import AccelerateBackend
from distgan.backends.base import NETS, AdamSpec
from distgan.config import load_config
from distgan.gan.objective import GANObjective
from distgan.gan.phases import build_phases, lazy_reg_adam_params, Schedule
from distgan.models import build_models

N, Z, NUM_WS, C, R = 4, 3, 2, 1, 4


class TinyStyleG(nn.Module):
    """z -> w by a linear map, broadcast to NUM_WS rows; a nonlinear synthesis of the rows."""

    z_dim, w_dim, num_classes = Z, Z, 0

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mapping = nn.Linear(Z, Z)
        self.A = nn.Parameter(torch.randn(C * R * R, NUM_WS * Z) / 3)

    def synthesis(self, ws):
        return torch.tanh(ws.flatten(1) @ self.A.T).view(-1, C, R, R)

    def forward(self, z, labels=None, return_ws=False):
        ws = self.mapping(z).unsqueeze(1).repeat(1, NUM_WS, 1)
        images = self.synthesis(ws)
        return (images, ws) if return_ws else images


class OneProcess:
    device, world_size = torch.device("cpu"), 1

    def all_reduce_mean(self, tensor):
        return tensor


class Handle:
    def __init__(self, G):
        self.G, self.backend = G, OneProcess()

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()


class FixedNoise:
    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.z = torch.randn(N, Z, generator=g)
        self.y = torch.randn(N, C, R, R, generator=g)

    def latents(self, n, z_dim, num_classes, device):
        return self.z[:n], None

    def normal(self, like):
        return self.y[:like.shape[0]]


def setup(*overrides):
    cfg = load_config(None, ["loss.pl_weight=2", "loss.pl_batch_shrink=1", *overrides])
    G, noise = TinyStyleG(), FixedNoise()
    objective = GANObjective(cfg.loss, Z, 0, N, torch.device("cpu"), noise)
    phase = next(p for p in build_phases(cfg) if p.name == "Greg")
    return cfg, G, noise, objective, phase


def reference_lengths(G, noise):
    """|J_w^T y| / sqrt(NUM_WS) per sample, with J from torch.autograd.functional.jacobian."""
    ws = G.mapping(noise.z).unsqueeze(1).repeat(1, NUM_WS, 1)
    y = noise.y / math.sqrt(R * R)
    lengths = []
    for i in range(N):
        jac = torch.autograd.functional.jacobian(lambda w: G.synthesis(w[None])[0], ws[i], create_graph=True)
        jty = torch.einsum("chw,chwkd->kd", y[i], jac)  # (NUM_WS, w_dim)
        lengths.append(jty.square().sum(1).mean().sqrt())
    return torch.stack(lengths)


def test_penalty_and_its_gradients_match_autograd_jacobians():
    cfg, G, noise, objective, phase = setup("loss.pl_target=phase_start")  # NVlabs' target: test_golden_losses
    objective.pl_mean.fill_(0.3)  # the target `a` as the phase begins
    handle = Handle(G)
    stats = objective.accumulate_gradients(phase, handle, None, None, scale=1.0)
    lengths = reference_lengths(G, noise)
    assert torch.allclose(stats["pl_length"], lengths.detach(), atol=1e-6)
    expected = phase.gain * cfg.loss.pl_weight * (lengths - 0.3).square().mean()
    assert stats["loss"].item() * phase.gain == pytest.approx(expected.item(), rel=1e-5)
    got = {name: p.grad.clone() for name, p in G.named_parameters()}
    G.zero_grad()
    expected.backward()
    for name, p in G.named_parameters():
        assert torch.allclose(got[name], p.grad, atol=1e-6), name
    assert got["A"].abs().sum() > 0 and got["mapping.weight"].abs().sum() > 0  # both reach through w
    objective.end_phase(phase, handle)  # then `a` moves by pl_decay = 0.01 towards the mean length
    assert objective.pl_mean.item() == pytest.approx(0.3 + 0.01 * (lengths.mean().item() - 0.3), rel=1e-6)


def test_running_mean_follows_the_lengths_and_is_checkpointed():
    _, G, _, objective, phase = setup("loss.pl_decay=0.5")
    means = []
    for _ in range(3):
        stats = objective.accumulate_gradients(phase, Handle(G), None, None, scale=1.0)
        objective.end_phase(phase, Handle(G))
        means.append(stats["pl_length"].mean().item())
    expected = 0.0
    for m in means:
        expected += 0.5 * (m - expected)
    assert objective.pl_mean.item() == pytest.approx(expected, rel=1e-5)
    saved = objective.state_dict()
    _, _, _, fresh, _ = setup()
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.pl_mean, objective.pl_mean)


def test_batch_shrink_uses_part_of_the_batch():
    _, G, _, objective, phase = setup("loss.pl_batch_shrink=2")
    stats = objective.accumulate_gradients(phase, Handle(G), None, None, scale=1.0)
    assert stats["pl_length"].shape == (N // 2,)


def test_greg_is_a_lazy_g_phase_with_corrected_adam():
    cfg, _, _, _, phase = setup("loss.pl_interval=4")
    assert (phase.net, phase.interval, phase.gain, phase.double_backward, phase.regularizer) == ("G", 4, 4.0, True, True)
    schedule = Schedule(build_phases(cfg))
    assert [step for step in range(9) if phase in schedule.due(step)] == [0, 4, 8]
    assert schedule.reg_interval("G") == 4
    assert lazy_reg_adam_params(0.0025, (0.0, 0.99), 4)[0] == pytest.approx(0.0025 * 4 / 5)
    off = load_config(None, [])
    assert all(p.name != "Greg" for p in build_phases(off))


def test_accumulated_micro_batches_move_the_mean_like_one_batch():
    """Two micro-batches of 2 leave `a` where one batch of 4 does (the mean over the phase)."""
    _, G, noise, whole, phase = setup("loss.pl_decay=0.5")
    whole.pl_mean.fill_(1.0)
    whole.accumulate_gradients(phase, Handle(G), None, None, scale=1.0)
    whole.end_phase(phase, Handle(G))
    _, _, _, split, _ = setup("loss.pl_decay=0.5")
    split.batch_size = N // 2
    split.pl_mean.fill_(1.0)
    halves = iter([noise.z[:2], noise.z[2:]])
    split.noise.latents = lambda n, *_: (next(halves), None)
    ys = iter([noise.y[:2], noise.y[2:]])
    split.noise.normal = lambda like: next(ys)
    for _ in range(2):
        split.accumulate_gradients(phase, Handle(G), None, None, scale=0.5)
    split.end_phase(phase, Handle(G))
    assert split.pl_mean.item() == pytest.approx(whole.pl_mean.item(), rel=1e-6)


def test_path_length_under_bf16_autocast_through_accelerate(tmp_path):
    """StyleGAN2 with `model.lowp_stages=0` under bf16 through a real Accelerate backend: the
    mapping network's ws come out in bf16, and Accelerate's prepared forward would hand back
    `ws.float()`, a copy outside the images' graph ("One of the differentiated Tensors appears to
    not have been used in the graph"). The phase handle serves the unwrapped forward instead, run
    under the handle's autocast, so the gradient reaches the mapping network."""
    cfg = load_config(None, ["model.arch=stylegan2", "model.widths=[16,8,8]", "model.mapping_layers=2", "model.z_dim=16",
                             "model.w_dim=16", "model.mbstd_group=2", "model.lowp_stages=0", "data.resolution=16",
                             "data.batch_size=4", "dist.mixed_precision=bf16", "loss.pl_weight=2", "loss.pl_interval=1",
                             "loss.pl_batch_shrink=1", f"train.run_dir={tmp_path}"])
    AcceleratorState._reset_state()
    GradientState._reset_state()
    backend = AccelerateBackend(cfg)
    try:
        assert backend.mixed_precision == "bf16"
        torch.manual_seed(0)
        G, D = build_models(cfg.model, 16, 3, 0)
        backend.setup(G, D, {net: AdamSpec(1e-3, (0.0, 0.99)) for net in NETS})
        phase = next(p for p in build_phases(cfg) if p.name == "Greg")
        objective = GANObjective(cfg.loss, G.z_dim, 0, 4, backend.device)
        objective.pl_mean.fill_(0.5)
        h = backend.phase_handle(phase)
        with h:
            stats = objective.accumulate_gradients(phase, h, None, None, scale=1.0)
            grads = {name: p.grad.detach().clone() for name, p in G.named_parameters() if p.grad is not None}
            objective.end_phase(phase, h)
            h.step(measure=False)
            with torch.no_grad(), h.autocast():
                images, ws = h.G(*objective.latents(4), return_ws=True)
            # Autocast on, outputs not copied to fp32 (ws stays bf16); the image path is fp32 by design.
            assert ws.dtype == torch.bfloat16 and images.dtype == torch.float32
    finally:
        backend.close()
    assert torch.isfinite(stats["pl_length"]).all() and (stats["pl_length"] > 0).all()
    mapping = [g for name, g in grads.items() if name.startswith("mapping")]
    assert mapping and all(torch.isfinite(g).all() for g in mapping)
    assert any(g.abs().sum() > 0 for g in mapping), "the path-length gradient never reached the mapping network"
    assert objective.pl_mean.item() != pytest.approx(0.5)
