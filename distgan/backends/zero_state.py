"""DeepSpeed optimizer state in distgan's checkpoint format (`checkpoint.format.write_optimizer`):
whole, keyed by parameter name, read back with `torch.load(weights_only=True)`.

Why not DeepSpeed's own checkpoints: `engine.save_checkpoint` writes pickles (`torch.load` of
them needs `weights_only=False`, i.e. may execute code) that only load at the same world size
and ZeRO stage; its universal checkpoint converts offline, per parameter, with the same pickles
inside. Here the state is gathered while saving instead, through DeepSpeed's own parameter ->
partition map (`param._hp_mapping`, the map behind `deepspeed.utils.safe_get_full_optimizer_state`):

* ZeRO-1/2 and the bf16 optimizer keep each parameter group's fp32 master weights and Adam moments
  as one flat tensor per rank, a disjoint slice of the group (`lp_fragment_address`: where the
  slice sits in the parameter, `hp_fragment_address`: where in this rank's flat tensor);
* saving fills full-size buffers with this rank's slices and sums them over ranks (one
  all-reduce per state key for all parameters together, not one per parameter);
* loading copies the slice this rank owns out of the full tensors, for any world size.

`safe_get/set_full_optimizer_state` itself is not used: it only works once the optimizer has
stepped (its links to the state are made lazily at the first step), and a resume sets the
state before that. Fp32 ZeRO-0 has no partitions: the torch optimizer holds the module's own
parameters, and the generic `FullOptimizerState` serves it.

ZeRO-0 in bf16/fp16 is the third layout: DeepSpeed wraps the torch optimizer in its unfused
low-precision optimizer (`FP16_UnfusedOptimizer`), which hands the torch optimizer fp32 *copies*
of the parameters (`fp32_groups`, in the order of the module's `fp16_groups`) and sets no
`_hp_mapping`. Neither of the two maps above knows those copies (torch's state-dict helpers
raised `KeyError: 0` on them), so `master_copies` pairs them with the module's names. They are
whole and identical on every rank (ZeRO-0 replicates), so nothing is gathered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from distgan.backends.base import NETS, FullOptimizerState, load_fp32_params
from distgan.checkpoint.format import read_optimizer, read_weights, write_optimizer

MOMENTS = ("exp_avg", "exp_avg_sq")


def partitioned(module: nn.Module) -> bool:
    """Whether DeepSpeed holds this module's master weights and optimizer state in partitions."""
    return any(hasattr(p, "_hp_mapping") for p in module.parameters())


def master_copies(module: nn.Module, zero_opt: Any) -> dict[str, torch.Tensor] | None:
    """{parameter name: the fp32 copy the torch optimizer steps} of DeepSpeed's unfused bf16/fp16
    optimizer (ZeRO-0 in low precision); None for any other wrapper."""
    low, high = getattr(zero_opt, "fp16_groups", None), getattr(zero_opt, "fp32_groups", None)
    if low is None or high is None or partitioned(module):
        return None
    names = {id(p): n for n, p in module.named_parameters()}
    return {names[id(lp)]: hp for lows, highs in zip(low, high) for lp, hp in zip(lows, highs)}


def gather_copies(module: nn.Module, opt: torch.optim.Optimizer, masters: dict[str, torch.Tensor]) -> dict[str, Any]:
    """`gather`'s layout from fp32 copies (`master_copies`): no collective, every rank holds all."""
    state, fp32 = {}, {}
    for name, _ in module.named_parameters():
        if name not in masters:
            continue  # frozen for good (no optimizer state, e.g. FreezeD)
        hp = masters[name]
        fp32[name] = hp.detach().cpu().clone()
        if opt.state.get(hp):
            state[name] = {k: (v.cpu().clone() if torch.is_tensor(v) else v) for k, v in opt.state[hp].items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(fp32)} for g in opt.param_groups[:1]]
    return {"state": state, "param_groups": groups, "fp32_params": fp32}


def scatter_copies(opt: torch.optim.Optimizer, masters: dict[str, torch.Tensor], saved: dict[str, Any]) -> None:
    """Set the fp32 copies and their Adam state from a full state (`gather_copies`', or any backend's)."""
    fp32, state = saved.get("fp32_params") or {}, saved.get("state", {})
    with torch.no_grad():
        for name, hp in masters.items():
            if name in fp32:
                hp.copy_(fp32[name].reshape(hp.shape))
            if name in state:
                opt.state[hp] = {k: (v.to(hp.device).clone() if k != "step" else _step(opt, v, hp.device))
                                 for k, v in state[name].items()}
    for saved_group, group in zip(saved.get("param_groups", []), opt.param_groups):
        group.update({k: v for k, v in saved_group.items() if k != "params"})


def _step(opt: torch.optim.Optimizer, value: Any, device: torch.device) -> torch.Tensor:
    """Adam's step count where torch's Adam keeps it: on the parameters' device for the fused and
    capturable implementations (they read it in the kernel), on the CPU otherwise."""
    on_device = opt.defaults.get("fused") or opt.defaults.get("capturable")
    return torch.as_tensor(value, dtype=torch.float32).to(device if on_device else "cpu").clone()


def _flat(opt: torch.optim.Optimizer, p: nn.Parameter) -> torch.Tensor:
    """This rank's flat fp32 partition of the group `p` belongs to (the torch optimizer's parameter)."""
    return opt.param_groups[p._hp_mapping.param_group_index]["params"][0]


def gather(module: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state and fp32 masters of a partitioned module (a collective)."""
    named = [(n, p) for n, p in module.named_parameters()]
    sizes = [p.numel() for _, p in named]
    device = next(module.parameters()).device
    stepped = any(opt.state.get(g["params"][0]) for g in opt.param_groups)
    keys = ("param", *MOMENTS) if stepped else ("param",)
    full = {k: torch.zeros(sum(sizes), dtype=torch.float32, device=device) for k in keys}
    offset, step = 0, None
    for (_, p), size in zip(named, sizes):
        m = getattr(p, "_hp_mapping", None)
        if m is not None:  # this rank owns a slice of p
            flat = _flat(opt, p)
            sources = {"param": flat, **{k: opt.state[flat][k] for k in MOMENTS if stepped}}
            lp, hp = m.lp_fragment_address, m.hp_fragment_address
            for k, src in sources.items():
                full[k].narrow(0, offset + lp.start, lp.numel).copy_(src.narrow(0, hp.start, hp.numel))
            if stepped:
                step = opt.state[flat]["step"]
        offset += size
    for buffer in full.values():
        torch.distributed.all_reduce(buffer)  # slices are disjoint: the sum is the whole tensor
    step = _same_step(step, device) if stepped else None
    state, fp32, offset = {}, {}, 0
    for (name, p), size in zip(named, sizes):
        part = {k: full[k].narrow(0, offset, size).view_as(p).cpu().clone() for k in keys}
        fp32[name] = part.pop("param")
        if stepped:
            state[name] = {"step": step.clone(), **part}
        offset += size
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [n for n, _ in named]} for g in opt.param_groups[:1]]
    return {"state": state, "param_groups": groups, "fp32_params": fp32}


def _same_step(step: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Adam's step count, the same on every rank (a rank that owns no slice learns it from the others)."""
    value = torch.tensor([float(step) if step is not None else -1.0], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return torch.tensor(value.item(), dtype=torch.float32)


def scatter(module: nn.Module, opt: torch.optim.Optimizer, zero_opt: Any, saved: dict[str, Any]) -> None:
    """Set this rank's partitions from a full state (`gather`'s, or any backend's `optim_<net>.pt`)."""
    fp32 = saved.get("fp32_params") or {}
    state = saved.get("state", {})
    with torch.no_grad():
        for name, p in module.named_parameters():
            m = getattr(p, "_hp_mapping", None)
            if m is None:
                continue
            flat, lp, hp = _flat(opt, p), m.lp_fragment_address, m.hp_fragment_address
            # The masters: saved ones (a DeepSpeed bf16 run), else the weights the checkpointer loaded.
            master = fp32[name] if name in fp32 else p.detach().float()
            flat.narrow(0, hp.start, hp.numel).copy_(master.reshape(-1).narrow(0, lp.start, lp.numel))
            if name not in state:
                continue
            slot = opt.state[flat]
            for k in MOMENTS:
                if k not in slot:
                    slot[k] = torch.zeros_like(flat)
                slot[k].narrow(0, hp.start, hp.numel).copy_(state[name][k].reshape(-1).narrow(0, lp.start, lp.numel))
            slot["step"] = _step(opt, state[name]["step"], flat.device)
    for saved_group, group in zip(saved.get("param_groups", []), opt.param_groups):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    # DeepSpeed links each parameter to its slice of the state after the first step; the state
    # tensors are new, so let it link again.
    if hasattr(zero_opt, "_hp_optimizer_states_linked"):
        zero_opt._hp_optimizer_states_linked = False


class EngineOptimizerState(FullOptimizerState):
    """`optim_<net>.pt` for DeepSpeed engines: gathered from ZeRO partitions (or bf16 masters) with
    `gather`, re-partitioned for this world size with `scatter`."""

    def _copies(self, net: str) -> dict[str, torch.Tensor] | None:
        return master_copies(self.backend.module(net), self.backend._engines[net].optimizer)

    def _plain(self) -> bool:
        """fp32 ZeRO-0: the torch optimizer holds the module's own parameters."""
        return not partitioned(self.backend.module("G")) and self._copies("G") is None

    def save(self, folder: Path) -> None:
        b = self.backend
        if self._plain():
            return super().save(folder)
        for net in NETS:
            copies = self._copies(net)
            state = gather(b.module(net), b.optimizer(net)) if copies is None else \
                gather_copies(b.module(net), b.optimizer(net), copies)  # gather: a collective
            if b.is_main:
                write_optimizer(folder, net, state)

    def load(self, folder: Path) -> None:
        b = self.backend
        if self._plain():
            return super().load(folder)
        for net in NETS:
            saved = read_optimizer(folder, net)
            if saved["state"] and all(isinstance(k, int) for k in saved["state"]):
                raise ValueError(f"{folder}/optim_{net}.pt has positional keys (an old distgan checkpoint): resume it "
                                 "with the backend that wrote it")
            if not saved.get("fp32_params"):
                # A run without masters (fp32, any backend) saved its weights whole: they are the
                # masters. Not the module's weights, which a bf16 engine holds rounded to bf16.
                saved["fp32_params"] = {k: v.float() for k, v in read_weights(folder, net).items()}
            # Weights in the module itself too (in its dtype), so that they match the masters.
            load_fp32_params(b.module(net), saved["fp32_params"])
            copies = self._copies(net)
            if copies is None:
                scatter(b.module(net), b.optimizer(net), b._engines[net].optimizer, saved)
            else:
                scatter_copies(b.optimizer(net), copies, saved)
