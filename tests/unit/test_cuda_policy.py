"""GPU-path decisions found in the CUDA review (issue 19) that the CPU can check: which Adam runs
under fp16 loss scaling, and when the loader pins its batches."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer

from distgan.backends.base import AdamSpec
from distgan.device import adam_kwargs, pins_host_memory
from distgan.errors import ConfigError


def _overflowing_step(opt: torch.optim.Optimizer, p: torch.nn.Parameter) -> tuple[bool, float]:
    """One fp16-style step through Accelerate's optimizer wrapper and a real GradScaler with an
    inf gradient: (what Accelerate reports as skipped, the scale after the step)."""
    Accelerator(cpu=True)  # the state AcceleratedOptimizer reads
    scaler = torch.amp.GradScaler("cpu")
    wrapped = AcceleratedOptimizer(opt, device_placement=False, scaler=scaler)
    scaler.scale((p * torch.tensor([float("inf"), 1.0])).sum()).backward()
    scaler.unscale_(opt)  # as _AccelerateHandle does, before clipping
    wrapped.step()
    return wrapped.step_was_skipped, scaler.get_scale()


def test_fused_adam_hides_fp16_overflows_from_accelerate_so_auto_takes_foreach_under_a_scaler(fresh_accelerator):
    # The mechanism: fused Adam skips inside its kernel, so Accelerate (which detects a skip by
    # the step call not happening) reports an overflowed step as applied.
    p = torch.nn.Parameter(torch.ones(2))
    skipped, scale = _overflowing_step(torch.optim.Adam([p], lr=0.1, fused=True), p)
    assert scale < 65536.0 and torch.equal(p.detach(), torch.ones(2))  # the scaler did skip it...
    assert skipped is False  # ...and Accelerate did not notice: the bug the policy avoids
    # What the backend builds under fp16 on CUDA with optim.adam_impl=auto: foreach, which reports it.
    assert adam_kwargs("auto", cuda=True, grad_scaler=True) == {"foreach": True, "fused": False}
    assert adam_kwargs("auto", cuda=True, grad_scaler=False) == {"fused": True}
    q = torch.nn.Parameter(torch.ones(2))
    opt = AdamSpec(0.1, (0.5, 0.99), "auto").build([q], grad_scaler=True)
    skipped, _ = _overflowing_step(opt, q)
    assert skipped is True
    with pytest.raises(ConfigError, match="optim.adam_impl=fused"):
        adam_kwargs("fused", cuda=True, grad_scaler=True)


@pytest.mark.parametrize("cuda, env, pinned", [
    (True, {}, True),
    (True, {"ACCELERATE_USE_CPU": "1"}, False),  # a CPU run on a GPU machine: no CUDA context for pinning
    (True, {"ACCELERATE_USE_CPU": "true"}, False),
    (True, {"ACCELERATE_USE_CPU": "0"}, True),
    (False, {}, False),
])
def test_batches_are_pinned_only_when_this_process_trains_on_cuda(cuda, env, pinned):
    assert pins_host_memory(cuda, env) is pinned


_TF32_STATES = '''
import torch
from distgan.device import exact_fp32

cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
GETTERS = {"matmul.allow_tf32": lambda: cuda.allow_tf32, "cudnn.allow_tf32": lambda: cudnn.allow_tf32,
           "float32_matmul_precision": torch.get_float32_matmul_precision,
           "matmul.fp32_precision": lambda: cuda.fp32_precision, "conv.fp32_precision": lambda: cudnn.conv.fp32_precision,
           "rnn.fp32_precision": lambda: cudnn.rnn.fp32_precision}
EXACT = {"matmul.allow_tf32": False, "cudnn.allow_tf32": False, "float32_matmul_precision": "highest",
         "matmul.fp32_precision": "ieee", "conv.fp32_precision": "ieee", "rnn.fp32_precision": "ieee"}

def read():
    out = {}
    for name, get in GETTERS.items():
        try:
            out[name] = get()
        except RuntimeError:
            out[name] = "raises"  # torch refuses to read a legacy flag the new API contradicts
    return out

def reset():
    torch.set_float32_matmul_precision("highest")
    cudnn.allow_tf32 = True
    cuda.fp32_precision, cudnn.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = BASE

BASE = (cuda.fp32_precision, cudnn.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision)
baseline = read()
STATES = {
    "default": lambda: None,
    "set_float32_matmul_precision(high)": lambda: torch.set_float32_matmul_precision("high"),
    "legacy matmul.allow_tf32=True": lambda: setattr(cuda, "allow_tf32", True),
    "legacy cudnn.allow_tf32=False": lambda: setattr(cudnn, "allow_tf32", False),
    "new matmul.fp32_precision=tf32": lambda: setattr(cuda, "fp32_precision", "tf32"),
    "new conv.fp32_precision=ieee": lambda: setattr(cudnn.conv, "fp32_precision", "ieee"),
    "new backends.fp32_precision=tf32": lambda: setattr(torch.backends, "fp32_precision", "tf32"),
}
for name, set_up in STATES.items():
    reset()
    assert read() == baseline, (name, "reset", read())
    set_up()
    before = read()
    with exact_fp32():
        inside = read()
    after = read()
    assert inside == EXACT, (name, "inside", inside)
    assert after == before, (name, "after", before, after)
    torch.backends.fp32_precision = "none"
print("ok", len(STATES))
'''


def test_exact_fp32_works_from_every_tf32_setting_and_restores_it():
    """A user who set TF32 through torch's new `fp32_precision` API made the legacy getters raise
    (the old exact_fp32 read `matmul.allow_tf32` first: every evaluation crashed). In a fresh
    process, since the flags are process-wide: from each starting state, inside every flag reads
    exact fp32 and none raises, and after, the state is what it was."""
    import subprocess
    import sys

    from tests.helpers import REPO

    proc = subprocess.run([sys.executable, "-c", _TF32_STATES], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("ok 7"), proc.stderr[-3000:]


def test_a_bare_cuda_device_gets_the_current_index_before_a_thread_takes_it():
    """Accelerate's single-process device is `cuda` without an index, and
    `torch.cuda.set_device(torch.device("cuda"))` raises: the prefetch thread gets the index the
    training thread has current (read there, where it was set)."""
    from distgan.device import indexed, use_in_this_thread

    assert indexed(torch.device("cuda"), current_index=lambda: 3) == torch.device("cuda", 3)
    assert indexed(torch.device("cuda", 1), current_index=lambda: 3) == torch.device("cuda", 1)
    assert indexed(torch.device("cpu")) == torch.device("cpu")
    use_in_this_thread(torch.device("cpu"))  # nothing to do, and no CUDA call on the CPU
    use_in_this_thread(None)


COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "reduce",
               "all_reduce_mean", "all_reduce_max", "all_reduce_min"}
"""torch.distributed's tensor collectives and the backends' wrappers of them."""
FACTORIES = {"tensor", "zeros", "ones", "full", "empty", "as_tensor", "arange", "rand", "randn"}


def _cpu_factory(node) -> bool:
    """`torch.tensor(...)` & co. without `device=`: a CPU tensor, which NCCL refuses."""
    import ast

    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
            and not any(k.arg == "device" for k in node.keywords))


def test_no_collective_takes_a_tensor_made_without_a_device():
    """Under NCCL every tensor of a collective must live on the rank's GPU; on gloo (every CPU
    test) a CPU tensor works, so a `torch.tensor(flag)` without `device=` passes every CPU run
    and fails the first GPU one. Static: each collective's tensor argument, and the assignments
    in the same function to a name passed as one, must not be a torch factory call without
    `device=`."""
    import ast

    from tests.helpers import REPO

    found, checked = [], 0
    for path in sorted((REPO / "distgan").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            assigned: dict[str, list] = {}
            for node in ast.walk(func):
                if isinstance(node, ast.Assign):
                    for target in node.targets:
                        if isinstance(target, ast.Name):
                            assigned.setdefault(target.id, []).append(node.value)
            for node in ast.walk(func):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in COLLECTIVES and node.args):
                    continue
                checked += 1
                arg = node.args[0]
                sources = assigned.get(arg.id, []) if isinstance(arg, ast.Name) else [arg]
                if any(_cpu_factory(s) for s in sources):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {ast.unparse(node)[:80]}")
    assert checked >= 15, checked  # the scan sees the collectives (a refactor must not make it vacuous)
    assert not found, "collectives on tensors made without device= (CPU tensors; NCCL refuses them):\n" + "\n".join(found)
