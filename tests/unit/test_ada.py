"""ADA's controller: the direction and exact size of each step of p, its bounds and cadence, and
what a checkpoint keeps. (That p is the same on every rank and survives a resume is checked by
the 2-process runs in tests/integration/test_stylegan2_runs.py.)"""

import pytest
import torch

from distgan.config import load_config
from distgan.errors import ConfigError
from distgan.gan.ada import AdaptiveAugment
from distgan.gan.objective import GANObjective


class OneProcess:
    """What the controller asks of a backend, for one process: its all-reduce is the identity."""

    device, world_size = torch.device("cpu"), 1

    def all_reduce_mean(self, tensor):
        return tensor


def controller(p=0.0, target=0.6, kimg=500.0, interval=4, p_max=0.0, batch=64, backend=None):
    return AdaptiveAugment(backend or OneProcess(), p, target, kimg, interval, p_max, batch)


def signs(positive: int, negative: int) -> torch.Tensor:
    return torch.tensor([1.5] * positive + [-0.5] * negative)


def test_p_rises_by_the_exact_step_when_rt_is_above_target():
    ada = controller()
    ada.observe(signs(7, 1))  # r_t = (7 - 1) / 8 = 0.75 > 0.6
    ada.adjust()
    assert ada.rt.item() == pytest.approx(0.75)
    assert ada.p.item() == pytest.approx(64 * 4 / 500_000)  # batch * interval / (ada_kimg * 1000)
    ada.observe(signs(2, 2))  # r_t = 0 < 0.6: back down by the same step
    ada.adjust()
    assert ada.rt.item() == 0.0 and ada.p.item() == pytest.approx(0.0, abs=1e-9)


def test_p_is_clamped_at_zero_and_at_its_maximum():
    ada = controller(p=0.0)
    ada.observe(signs(0, 4))
    ada.adjust()
    assert ada.p.item() == 0.0
    ada = controller(p=0.3, p_max=0.3, kimg=0.001)  # huge steps
    ada.observe(signs(4, 0))
    ada.adjust()
    assert ada.p.item() == pytest.approx(0.3)


def test_by_default_p_climbs_past_one_as_nvlabs_and_augment_p_max_bounds_it():
    """NVlabs clamps p at 0 only; `loss.augment_p_max` (default 0: none) is distgan's option."""
    cfg = load_config(None, ["loss.augment=bgc", "loss.ada_target=0.6"])
    assert cfg.loss.augment_p_max == 0.0
    free = controller(p=0.95, kimg=0.064, batch=8, p_max=cfg.loss.augment_p_max)  # steps of 0.5
    bounded = controller(p=0.95, kimg=0.064, batch=8, p_max=1.0)
    for ada in (free, bounded):
        ada.observe(signs(4, 0))
        ada.adjust()
    assert free.p.item() == pytest.approx(1.45) and bounded.p.item() == 1.0
    for ada in (free, bounded):
        ada.observe(signs(0, 4))
        ada.adjust()
    assert free.p.item() == pytest.approx(0.95) and bounded.p.item() == pytest.approx(0.5)


def test_adjustments_due_in_one_generator_step_share_their_signs():
    """interval 1 with 2 D steps per G step: both adjustments come after the G step; they move p
    twice towards the same r_t (adjusting twice in a row would read the second from no signs and
    pull p the other way)."""
    ada = controller(interval=1)
    ada.observe(signs(4, 0))
    ada.observe(signs(4, 0))
    ada.d_steps_done(0, 2)
    assert ada.rt.item() == 1.0 and ada.p.item() == pytest.approx(2 * ada.step_size)


def test_adjusts_every_interval_d_steps_from_the_signs_since_the_last_adjustment():
    ada = controller(interval=4)
    for d_step in range(1, 4):
        ada.observe(signs(4, 0))
        ada.d_steps_done(d_step - 1, d_step)
        assert ada.p.item() == 0.0  # not yet due
    ada.observe(signs(0, 4))  # 12 positive, 4 negative since the start: r_t = 0.5 < 0.6
    ada.d_steps_done(3, 4)
    assert ada.rt.item() == pytest.approx(0.5) and ada.p.item() == 0.0
    for d_step in range(5, 9):
        ada.observe(signs(4, 0))  # only these count now: r_t = 1
        ada.d_steps_done(d_step - 1, d_step)
    assert ada.rt.item() == 1.0 and ada.p.item() > 0


def test_checkpoint_state_round_trips_and_a_new_world_size_drops_only_the_partial_sums():
    ada = controller()
    ada.observe(signs(4, 0))
    ada.adjust()
    ada.observe(signs(3, 1))  # a partial interval
    state = ada.state_dict()
    saved_p = ada.p.clone()
    again = controller()
    again.load_state_dict(state)
    assert torch.equal(again.p, ada.p) and torch.equal(again.rt, ada.rt)
    again.adjust(), ada.adjust()
    assert torch.equal(again.p, ada.p)  # the partial sums came back too

    class TwoProcesses(OneProcess):
        world_size = 2

    moved = controller(backend=TwoProcesses())
    moved.load_state_dict(state)
    assert torch.equal(moved.p, saved_p)
    assert torch.equal(moved._sums, torch.zeros(2))


def test_the_augmentation_pipeline_reads_the_controllers_p():
    cfg = load_config(None, ["loss.augment=bgc", "loss.ada_target=0.6", "loss.augment_p=0.1"])
    ada = controller(p=0.1)
    objective = GANObjective(cfg.loss, 8, 0, 4, torch.device("cpu"), ada=ada)
    assert objective.pipe.p is ada.p
    objective.set_hyperparameters(0.0, 0.0, 0.9)  # the scheduled value must not override ADA's p
    assert objective.pipe.p is ada.p and ada.p.item() == pytest.approx(0.1)


@pytest.mark.parametrize("overrides, message", [
    (["loss.ada_target=0.6"], "set loss.augment=bgc"),
    (["loss.ada_target=0.6", "loss.augment=bgc", "loss.augment_p={start: 0, end: 0.5, kimg: 10}"], "ADA's starting p"),
    (["loss.ada_target=0.6", "loss.augment=bgc", "loss.augment_p=0.5", "loss.augment_p_max=0.2"], "above loss.augment_p_max"),
    (["loss.ada_target=1.5"], "loss.ada_target"),
])
def test_bad_ada_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_lazy_r1_phase_counts_towards_the_adjustment_of_its_own_step(tiny_shards, tmp_path):
    """NVlabs adjusts p after all the phases of a batch, so the lazy R1 phase's real logits of
    that batch count towards that adjustment: after a step with an adjustment nothing is left
    waiting in the running sums (the R1 phase observed its reals, then the adjustment used them)."""
    from tests.helpers import tiny_overrides
    from tests.helpers.inprocess import build_trainer

    overrides = ["model.arch=dcgan", "optim.d_steps=1", "loss.r1_gamma=1", "loss.r1_interval=2", "loss.augment=bgc",
                 "loss.augment_p=0.3", "loss.ada_target=0.6", "loss.ada_interval=1", "train.log_every=1000",
                 "train.sample_every=1000", "train.ckpt_every=1000"]
    trainer = build_trainer(load_config(None, tiny_overrides(tiny_shards, tmp_path / "run", *overrides)))
    trainer.start()
    try:
        assert [p.name for p in trainer.schedule.due(0)][:2] == ["Dmain", "Dreg"]
        trainer.advance()
    finally:
        trainer.finish("failed")
        trainer.backend.close()
    assert trainer.state.d_step == 1 and trainer.ada._sums.tolist() == [0.0, 0.0]
    assert trainer.ada.p.item() != pytest.approx(0.3)  # an adjustment ran
