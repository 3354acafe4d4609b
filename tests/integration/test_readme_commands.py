"""The READMEs are executed: every command shown in README.md, launch/README.md and slurm/README.md
is listed in HOW below, and each one either runs here as printed or names why not and which test
covers it instead.

- Extraction: every line of a ```bash block (minus its `# comment`), each ```python block, and
  every inline `code` span that starts with a program (`distgan ...`, `accelerate ...`, env
  assignments first) or calls `distgan.train(`. A command added to a README without an entry here
  fails `test_every_readme_command_is_accounted_for`, and so does an entry whose command is gone.
- Running: in document order, in one scratch folder that looks like the repository root (distgan/,
  configs/, launch/ and slurm/ linked in; runs/ lands there) with HOME in the scratch folder (the
  built-in emoji are materialized there, ~/photos is a folder of test images). Training commands get
  TINY appended (a later `key=value` wins), nothing else is changed. The whole command is run by bash;
  it must exit 0 without a traceback.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from distgan.data.shards import write_shards
from tests.helpers import REPO, make_image_folder

pytestmark = pytest.mark.slow

DOCS = ("README.md", "launch/README.md", "slurm/README.md")
PROGRAMS = {"distgan", "make", "accelerate", "torchrun", "python", "sbatch", "srun", "deepspeed", "pip", "pytest",
            "scancel", "scontrol", "touch", "wandb"}
_ENV_PREFIX = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*")

TINY = ("train.steps=2 data.resolution=16 model.g_width=8 model.d_width=8 model.z_dim=16 train.log_every=1 "
        "logging.wandb=off eval.extractor=tiny")
"""Appended to every training command. eval.extractor=tiny is the only non-size change: resnet-64.yaml
evaluates FID at its last step, Inception on 4,000 images would take minutes on a CPU, and the
checkpoint keeps it, so the README's bare `distgan eval --ckpt runs/default` runs tiny too. eval.n_samples
keeps its default (5000 > the 3,968 usable emoji): the adaptation to the available images is exercised."""
TINY_KEEP_RES = TINY.replace(" data.resolution=16", "")
TWO = f"{TINY} dist.expect_world_size=2"  # a launch that silently started one process must fail
BENCH = ("--steps 2 --rounds 1 --warmup 1 --batch 4 --width 4 data.resolution=16 data.batch_size=4 "
         "model.g_width=4 model.d_width=4 model.z_dim=8")

RUN, PY, MAKE, MAPPED, SKIP, MENTION = "run", "python", "make", "mapped", "skip", "mention"
SLURM_2NODES = "tests/slurm/test_train_slurm.py::test_sbatch_two_nodes_real_trainer"
SLURM_USR1 = "tests/slurm/test_train_slurm.py::test_sbatch_preempted_by_usr1_requeues_and_resumes"
SLURM_STANDIN = "tests/slurm/test_cluster_smoke.py::test_train_sh_cpu_two_nodes_standin_world_size_2"
DS_ZERO = "tests/integration/test_deepspeed.py::test_zero_matches_one_process_with_the_whole_batch"
DS_ZERO2 = "tests/integration/test_deepspeed.py::test_zero2_bf16_ranks_stay_identical"
DDP_2 = "tests/integration/test_distributed.py::test_ddp_ranks_stay_identical_and_see_different_data"
FSDP_2 = "tests/integration/test_distributed.py::test_fsdp_bf16_ranks_stay_identical_and_resume_exactly"
NOT_A_COMMAND = "a program named in a sentence, not a command to run"

HOW: dict[str, tuple[str, str]] = {
    # README.md
    "make train": (MAKE, TINY),
    "make test": (SKIP, "the suite that contains this test (make test runs pytest); .ci/run runs it in CI"),
    'make train ARGS="train.steps=500"': (MAKE, TINY),
    "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128":
        (SKIP, "downloads a CUDA build of torch; tests download nothing (tests/integration/test_packaging.py installs from local wheels)"),
    "distgan train": (RUN, TINY),
    # README.md, GPU
    "python3 -m venv .venv && . .venv/bin/activate": (SKIP, "makes a virtual environment; the tests run inside one already"),
    'pip install -e ".[test]"': (MAPPED, "the Makefile's setup (which `make test` and CI run) does this install; "
                                 "tests/integration/test_packaging.py::test_test_extra_installs_everything_the_tests_import "
                                 "checks the extra holds what the tests import"),
    "make test-gpu": (MAPPED, "needs a CUDA GPU; make test collects tests/gpu "
                       "(tests/unit/test_gpu_suite_cpu.py::test_gpu_suite_imports_and_every_test_is_marked_gpu) and "
                       "runs the checks' CPU half (tests/unit/test_gpu_suite_cpu.py::test_arch_step_check_runs_on_cpu_in_bf16)"),
    "pytest -m gpu tests/gpu": (SKIP, "the GPU suite: without CUDA every test in it is skipped (make test collects it)"),
    "distgan train --config configs/resnet-64.yaml train.steps=20000": (RUN, TINY),
    "distgan train --dry-run": (RUN, TINY),
    "distgan train --help-config": (RUN, ""),
    "accelerate launch distgan/train.py --config configs/default.yaml data.batch_size=64": (RUN, TINY),
    "torchrun --standalone --nproc_per_node 2 -m distgan.train": (RUN, TWO),
    "distgan --debug train ...": (MAPPED, "a placeholder (...); tests/integration/test_cli_errors.py::test_debug_shows_the_traceback"),
    'python:\nimport distgan\nrun_dir = distgan.train(overrides={"train.steps": 500})': (PY, TINY),
    "distgan shards ~/photos data/photos --resolution 64 --shard-size 2000": (RUN, ""),
    "distgan train data.source=data/photos data.resolution=64 train.name=photos": (RUN, TINY_KEEP_RES),
    "distgan train data.source='s3-or-local/train-{000000..000127}.tar'": (RUN, TINY),
    "sbatch slurm/train.sh": (MAPPED, f"needs SLURM: {SLURM_2NODES} submits slurm/train.sh to the loopback cluster"),
    "distgan sample --ckpt runs/default --n 64 --out grid.png": (RUN, ""),
    "wandb sync": (SKIP, "needs a W&B account and network; tests/integration/test_wandb.py reads the offline files back"),
    "distgan eval --ckpt runs/default": (RUN, ""),
    "distgan report runs/default": (RUN, ""),
    # README.md, Quality: the r3gan recipe's widths are per stage, so a 16 px run gets three.
    "distgan train --config configs/r3gan-twemoji-32.yaml": (RUN, f"{TINY} model.widths=[8,8,8]"),
    "distgan eval --ckpt runs/r3gan-twemoji-32 --n 2000 --log": (RUN, ""),
    "distgan report runs/default runs/r3gan-twemoji-32 --x minutes": (RUN, ""),
    # README.md, Quality: StyleGAN2-ADA (4 widths at 32 px, so three at 16) and the small-data pair.
    "distgan train --config configs/stylegan2-ada-twemoji-32.yaml": (RUN, f"{TINY} model.widths=[8,8,8]"),
    "distgan sample --ckpt runs/stylegan2-ada-twemoji-32 --truncation 0.7 --out trunc.png": (RUN, ""),
    "distgan shards builtin:twemoji data/twemoji-500 --resolution 32 --limit 500": (RUN, ""),
    "distgan train --config configs/stylegan2-ada-twemoji-32.yaml data.source=data/twemoji-500 train.name=ada-on":
        (RUN, f"{TINY_KEEP_RES} model.widths=[8,8,8,8]"),
    "distgan train --config configs/stylegan2-ada-twemoji-32.yaml data.source=data/twemoji-500 train.name=ada-off "
    "loss.ada_target=0 loss.augment=": (RUN, f"{TINY_KEEP_RES} model.widths=[8,8,8,8]"),
    "distgan eval --ckpt runs/ada-on --n 2000 --data builtin:twemoji --log": (RUN, ""),
    "distgan report runs/ada-on runs/ada-off --x minutes": (RUN, ""),
    "distgan sample --truncation 0.7": (MENTION, "a flag named in the Models paragraph; the Quality section runs it"),
    "distgan eval": (MENTION, NOT_A_COMMAND),
    "distgan eval --n 2000": (MENTION, NOT_A_COMMAND),
    "distgan report": (MENTION, NOT_A_COMMAND),
    "distgan bench loop": (RUN, BENCH),
    "distgan bench loop --steps 100 --rounds 7": (MAPPED, "the measurement's own form; `distgan bench loop` runs above "
                                                 "and tests/integration/test_bench.py::test_bench_loop_reports_median_ratio_difference_and_every_round "
                                                 "checks its report"),
    "distgan bench data": (RUN, BENCH),
    "distgan bench throughput": (RUN, BENCH),
    # 1- and 2-process runs + the ZeRO/FSDP probe, ~1 min at this size: run once, as the docs/scaling.md form
    # (with BENCH's --rounds 1 the two commands do the same work).
    "distgan bench scaling": (MAPPED, "run as `OMP_NUM_THREADS=1 distgan bench scaling --rounds 3` by "
                                      "tests/integration/test_readme_commands.py::test_readme_command_runs"),
    # launch/README.md
    "python distgan/train.py": (RUN, TINY),
    "accelerate launch --config_file launch/1gpu.yaml distgan/train.py dist.mixed_precision=auto": (RUN, TINY),
    "ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --config_file launch/cpu-2proc.yaml distgan/train.py": (RUN, TWO),
    "ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 "
    "--mixed_precision no --dynamo_backend no distgan/train.py": (MAPPED, f"{DDP_2} launches exactly this command (tests/helpers/launch.py)"),
    "ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 distgan/train.py":
        (MAPPED, "tests/integration/test_distributed.py::test_gradient_averaging_matches_one_process_with_the_doubled_batch (torchrun_cmd)"),
    "ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m distgan.train": (RUN, TWO),
    "accelerate launch -m distgan.train": (RUN, TINY),
    "python -m distgan.train": (RUN, TINY),
    "accelerate launch --config_file launch/8gpu.yaml distgan/train.py dist.mixed_precision=auto": (MAPPED, f"needs 8 GPUs; DDP on 2 CPU processes: {DDP_2}"),
    "accelerate launch --config_file launch/fsdp-8gpu.yaml distgan/train.py dist.fsdp=true dist.mixed_precision=auto": (MAPPED, f"needs 8 GPUs; FSDP on 2 CPU processes: {FSDP_2}"),
    "accelerate launch --config_file launch/deepspeed-zero1.yaml distgan/train.py dist.backend=deepspeed dist.zero_stage=1":
        (MAPPED, f"the config starts 8 processes (8 GPUs); ZeRO-1 on 2 CPU processes: {DS_ZERO}"),
    "accelerate launch --config_file launch/deepspeed-zero2.yaml distgan/train.py dist.backend=deepspeed dist.zero_stage=2 "
    "dist.mixed_precision=bf16": (MAPPED, f"8 processes; {DS_ZERO2} launches this config with --num_processes 2"),
    "torchrun --nproc_per_node 8 distgan/train.py dist.backend=deepspeed dist.zero_stage=2 dist.deepspeed_config=launch/ds_zero2.json":
        (MAPPED, f"8 processes; the same torchrun launch at 2: {DS_ZERO}"),
    "deepspeed --num_gpus 8 distgan/train.py dist.backend=deepspeed dist.zero_stage=2": (SKIP, "needs 8 GPUs; the README says it is not tested here"),
    "accelerate launch --config_file launch/multinode.yaml --machine_rank $NODE_RANK --main_process_ip $HEAD "
    "--main_process_port 29500 distgan/train.py dist.mixed_precision=auto": (MAPPED, f"needs several machines; slurm/train.sh runs this launch per node: {SLURM_2NODES}"),
    "sbatch --nodes 4 --gpus-per-node 8 slurm/train.sh": (MAPPED, f"needs 4 GPU nodes; 2 CPU nodes: {SLURM_2NODES}"),
    "srun --ntasks-per-node 8 python distgan/train.py":
        (MAPPED, "needs a SLURM allocation of 8 tasks; rank discovery from SLURM's variables: tests/integration/test_distributed.py::test_world_size_checks"),
    "accelerate.debug_launcher(lambda: distgan.train(overrides={...}), num_processes=2)":
        (MAPPED, "a placeholder ({...}); tests/integration/test_distributed.py::test_python_api_under_debug_launcher runs it"),
    "accelerate.notebook_launcher(lambda: distgan.train(overrides={...}), num_processes=8)": (SKIP, "needs 8 GPUs (on CPU it starts one process, as the README says)"),
    "accelerate launch --cpu --num_processes 2":
        (MAPPED, "a trap the README warns about; tests/integration/test_distributed.py::test_accelerate_cpu_flag_starting_one_process_is_an_error"),
    "accelerate launch": (MENTION, NOT_A_COMMAND),
    "OMP_NUM_THREADS=1 distgan bench scaling --rounds 3": (RUN, BENCH),  # BENCH's later --rounds 1 wins
    # slurm/README.md
    "sbatch --nodes 4 --gpus-per-node 8 --cpus-per-task 64 slurm/train.sh train.steps=100000": (MAPPED, f"needs 4 GPU nodes; {SLURM_2NODES}"),
    "CONFIG=configs/x.yaml RUN_DIR=runs/x sbatch --nodes 2 slurm/train.sh data.batch_size=64":
        (MAPPED, f"configs/x.yaml is a placeholder; CONFIG/RUN_DIR/--nodes 2: {SLURM_2NODES}"),
    "GPUS_PER_NODE=0 NPROC_PER_NODE=2 sbatch --nodes 2 slurm/train.sh": (MAPPED, f"needs SLURM: {SLURM_STANDIN}"),
    "scontrol show node": (MENTION, NOT_A_COMMAND),
    "scancel --signal=USR1 --batch JOBID": (MAPPED, f"JOBID is a placeholder; {SLURM_USR1}"),
    "srun --kill-on-bad-exit": (MENTION, NOT_A_COMMAND),
    "scontrol requeue": (MENTION, NOT_A_COMMAND),
    "touch $RUN_DIR/PREEMPT": (MAPPED, "tests/slurm/test_cluster_smoke.py::test_train_sh_preemption_requeues_and_resumes_standin"),
    "pytest -m slurm tests/slurm": (SKIP, "runs tests/slurm, which this suite runs itself"),
    "distgan train train.init_from=runs/default data.source=data/faces model.freeze_d=2":
        (MAPPED, "data/faces is a placeholder; tests/integration/test_finetune.py::"
                 "test_finetune_starts_from_the_source_fresh_and_keeps_frozen_blocks"),
    "distgan export --ckpt runs/default --out exports/emoji": (RUN, ""),
    "distgan sample --ckpt exports/emoji --n 64 --out grid.png": (RUN, ""),
    "distgan import network-snapshot.pkl --out exports/ffhq":
        (MAPPED, "official pickles are not downloaded in tests; tests/unit/test_import.py::test_cli_import_then_sample"),
    "distgan sweep configs/sweeps/lr-grid.yaml --dry-run": (RUN, ""),
    "distgan report runs/sweep-lr-grid/trial-000 runs/sweep-lr-grid/trial-001 --json":
        (MAPPED, "needs a finished sweep; tests/unit/test_compare.py::test_report_command_compares_a_sweep_folder_glob"),
}


def _is_command(span: str) -> bool:
    rest = _ENV_PREFIX.sub("", span.strip())
    return (rest.split(" ", 1)[0] in PROGRAMS and " " in rest) or "distgan.train(" in span


def readme_commands(doc: str) -> list[str]:
    """The commands `doc` shows, in order (see the module docstring)."""
    commands: list = []
    fence, prose = None, []

    def inline() -> None:  # spans may wrap across lines of a paragraph
        commands.extend(span for span in re.findall(r"`([^`]+)`", " ".join(prose)) if _is_command(span))
        prose.clear()

    for line in (REPO / doc).read_text().splitlines():
        if line.startswith("```"):
            inline()
            fence = line[3:].strip() if fence is None else None
            if fence == "python":
                commands.append(["python:"])
        elif fence == "bash":
            command = re.split(r"\s{2,}#", line)[0].strip()
            if command:
                commands.append(command)
        elif fence == "python":
            commands[-1].append(line)
        elif fence is None:
            prose.append(line)
    inline()
    return ["\n".join(c).strip() if isinstance(c, list) else c for c in commands]


def all_commands() -> list[str]:
    seen: dict[str, None] = {}
    for doc in DOCS:
        seen.update(dict.fromkeys(readme_commands(doc)))
    return list(seen)


def test_every_readme_command_is_accounted_for():
    shown = set(all_commands())
    assert not shown - set(HOW), f"README commands with no entry in HOW (run it, or say why not): {sorted(shown - set(HOW))}"
    assert not set(HOW) - shown, f"entries in HOW that no README shows any more: {sorted(set(HOW) - shown)}"


def test_mapped_commands_name_tests_that_exist():
    for command, (kind, detail) in HOW.items():
        for node in re.findall(r"(tests/\S+\.py)::(\w+)", detail):
            path, name = node
            assert f"def {name}(" in (REPO / path).read_text(), f"{command!r} is mapped to a missing test {path}::{name}"
        if kind == MAPPED:
            assert "::" in detail, f"{command!r}: name the test that covers it"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder that looks like the repository root, with its own HOME, ~/photos and the
    `s3-or-local/train-{000000..000127}.tar` shards the Data section names."""
    root = tmp_path_factory.mktemp("readme")
    for name in ("distgan", "configs", "launch", "slurm"):
        (root / name).symlink_to(REPO / name)
    home = root / "home"
    make_image_folder(home / "photos", n_per_class=20, size=32)  # 40 images: more than one default batch (32)
    images = make_image_folder(root / "images", n_per_class=64, size=16)
    write_shards(str(images), root / "s3-or-local", resolution=16, channels=3, crop="none", shard_size=1, workers=1,
                 progress=False)
    assert len(list((root / "s3-or-local").glob("train-*.tar"))) == 128
    return root


def _env(root: Path) -> dict[str, str]:
    bin_dir = Path(sys.executable).parent
    return {**os.environ, "HOME": str(root / "home"), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "OMP_NUM_THREADS": "1", "DISTGAN_NO_PROGRESS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "DISTGAN_NO_DOWNLOAD": "1", "PYTHONPATH": str(REPO)}


def shell_line(command: str, kind: str, extra: str) -> str:
    """What bash runs for `command`: the command, then `extra`, nothing else changed."""
    if kind == MAKE:  # the repository's Makefile with this suite's venv (already set up: -o skips the install)
        venv = Path(sys.prefix)
        make = f"make -f {REPO / 'Makefile'} VENV={venv} -o {venv / 'bin' / 'distgan'}"
        args = re.fullmatch(r'make train(?: ARGS="(.*)")?', command)
        return f"{make} train ARGS={shlex.quote(' '.join(a for a in (args.group(1), extra) if a))}"
    if kind == PY:  # distgan.train gets `extra` the way the CLI gets appended overrides
        code = command.removeprefix("python:\n")
        extras = dict(o.split("=", 1) for o in extra.split())
        wrapper = ("import distgan, json\n_train = distgan.train\n"
                   f"distgan.train = lambda config=None, overrides=None: _train(config, {{**(overrides or {{}}), **json.loads({json.dumps(json.dumps(extras))})}})\n")
        return f"python -c {shlex.quote(wrapper + code)}"
    return f"{command} {extra}".strip()


RUNNABLE = [c for c in all_commands() if HOW.get(c, (SKIP,))[0] in (RUN, PY, MAKE)]


@pytest.mark.parametrize("command", RUNNABLE)
def test_readme_command_runs(command, workspace):
    kind, extra = HOW[command]
    line = shell_line(command, kind, extra)
    proc = subprocess.run(["bash", "-c", line], cwd=workspace, env=_env(workspace), capture_output=True, text=True,
                          timeout=300)
    out = f"$ {line}\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, out
    assert "Traceback" not in proc.stderr, out
    if command == "distgan train":
        assert list((workspace / "runs" / "default" / "samples").glob("*.png")), out  # "grids land in runs/default/samples/"
    if "bench scaling" in command:  # a rate from the tiny run, never a division by zero
        rows = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
        scaling = next(r for r in rows if r["benchmark"] == "scaling")
        assert scaling["timed_steps"] == 2 and scaling["img_per_s_1proc"] > 0 and scaling["efficiency"] > 0, out
        assert "noisy" in scaling["notice"], out
    if command == "distgan eval --ckpt runs/default":  # eval.n_samples=5000 > the 3,968 usable emoji: evaluated on what there is
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["n_requested"] == 5000 and result["n"] < 5000 and "notice" in result, out
