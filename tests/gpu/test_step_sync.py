"""The training step never waits for the device outside log steps: every other step runs under
`torch.cuda.set_sync_debug_mode("error")`, which raises at the first synchronizing call."""

from __future__ import annotations

import pytest

from tests.helpers.gpu_suite import SyncGuard, arch_config, assert_finite_losses
from tests.helpers.inprocess import train_in_process

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch, extra", [("dcgan", ()), ("r3gan", ()), ("stylegan2", ("model.conditional=true",))],
                         ids=["dcgan", "r3gan", "stylegan2-conditional"])
def test_steps_between_log_steps_never_synchronize(arch, extra, tiny_shards, tmp_path):
    # R1+R2 every D step (r3gan's recipe) and ADA's p update exercise the regularizer and
    # augmentation paths (NVlabs' supersampled warp included); the conditional stylegan2 case its
    # class map and fake labels drawn from the data's class counts; preemption polling is moved
    # out of the window (it is a collective).
    cfg = arch_config(arch, tiny_shards, tmp_path / "run", "bf16", 12, "train.log_every=4", "loss.r1_interval=1",
                      "loss.r1_gamma=0.1", "loss.augment=bgc", "loss.ada_target=0.6", "train.signal_check_every=1000",
                      *extra)
    guard = SyncGuard(log_every=4)
    rows = train_in_process(cfg, hooks=[guard])
    assert guard.guarded == 8, guard.guarded  # 12 steps: 3 log steps and the first run unguarded
    assert_finite_losses([r for r in rows if "Dmain/loss" in r], 3, f"{arch} under sync debug mode")
