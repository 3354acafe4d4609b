#!/usr/bin/env bash
# distgan multi-node training under SLURM; survives preemption and time limits by requeueing.
#
#   sbatch slurm/train.sh                                    # 1 node, CPU unless GPUs are allocated
#   sbatch --nodes 4 --gpus-per-node 8 slurm/train.sh train.steps=100000
#   CONFIG=configs/x.yaml RUN_DIR=runs/x sbatch --nodes 2 slurm/train.sh data.batch_size=64
#
# Submit from the repository root: paths (distgan/train.py, CONFIG, RUN_DIR, the log files) are
# relative to the submit directory. Every #SBATCH value below can be overridden on the sbatch
# command line. Environment (exported to the job, sbatch's default --export=ALL):
#   CONFIG            YAML recipe passed as --config (optional)
#   RUN_DIR           run folder; default runs/<job name>-<job id> (stable across requeues)
#   GPUS_PER_NODE     GPUs used per node; default: what SLURM allocated (--gpus-per-node), else 0.
#                     0 = CPU training (gloo): NPROC_PER_NODE processes per node.
#   NPROC_PER_NODE    processes per node (default GPUS_PER_NODE, or 1 on CPU)
#   OMP_NUM_THREADS   threads per process; default: its share of the node's CPUs (see below)
#   MIXED_PRECISION   no | fp16 | bf16 (default no)
#   MAIN_PROCESS_PORT rendezvous port on the head node (default 20000 + job id % 20000)
#   MAIN_PROCESS_IP   head address (default: NodeAddr of the first node from scontrol)
#   DISTGAN_ENV       venv folder (sources <dir>/bin/activate) or a shell file to source first;
#                     default: ./.venv if `accelerate` is not on PATH
#   DISTGAN_TRAIN_SCRIPT  entry point (default distgan/train.py); for tests and custom trainers
#   PREEMPT_GRACE     seconds after USR1 before requeueing even if the training has not stopped (60)
# Arguments: section.key=value overrides passed to the trainer (train.run_dir=... sets RUN_DIR).
#
# CPUs: the node's allocation (SLURM_CPUS_PER_TASK, else SLURM_CPUS_ON_NODE) is split between its
# ranks (distgan/distributed.py: cpu_share): data.workers and OMP_NUM_THREADS per rank default to
# that share unless given (data.workers=N as an argument or in CONFIG, OMP_NUM_THREADS exported).
# Ask for --cpus-per-task = ranks per node x (1 + workers you want), e.g. 64 for 8 GPUs.
#
# Preemption contract (see slurm/README.md): on SIGUSR1 (120 s before the time limit, or
# `scancel --signal=USR1 --batch JOB`) this shell creates the request $RUN_DIR/PREEMPT; the
# trainer saves a checkpoint at the next step boundary (or gives up a running evaluation), writes
# the marker $RUN_DIR/PREEMPTED and exits 17; the job then requeues itself and resumes
# (train.resume=auto). The trainer writes $RUN_DIR/DONE when the run is complete.
#
#SBATCH --job-name=distgan
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err

# shellcheck disable=SC2317,SC1090  # trap handlers are called indirectly; sourced env is dynamic
set -euo pipefail

# Catch the preemption notice from the first line on (bash's default action for USR1 is to die).
PREEMPTED=0 TERMINATED=0 GRACE_EXPIRED=0
SRUN_PID='' GRACE_PID='' RUN_DIR_ABS=''
PREEMPT_GRACE=${PREEMPT_GRACE:-60}
on_usr1() {
  PREEMPTED=1
  echo "[train.sh $(date '+%F %T')] SIGUSR1 received: asking the training to checkpoint and stop" \
       "(creating ${RUN_DIR_ABS:-<run dir not set yet>}/PREEMPT)"
  if [ -n "$RUN_DIR_ABS" ]; then touch "$RUN_DIR_ABS/PREEMPT" || true; fi
  if [ -n "$SRUN_PID" ]; then
    # Also forward it to srun, which passes it on to the task on every node. The tasks ignore
    # USR1 (see TASK below) unless the trainer installs a handler: only a fast-path hint.
    kill -USR1 "$SRUN_PID" 2>/dev/null || true
    # If the training does not stop in time, requeue anyway (resumes from its last checkpoint)
    # rather than being killed at the time limit, which would end the job for good.
    if [ -z "$GRACE_PID" ] && [ "$PREEMPT_GRACE" -gt 0 ]; then
      ( sleep "$PREEMPT_GRACE"; kill -USR2 $$ 2>/dev/null ) &
      GRACE_PID=$!
    fi
  fi
}
on_usr2() { GRACE_EXPIRED=1; }
on_term() {  # scancel, or slurm's own preemption (it requeues by itself): no self-requeue
  TERMINATED=1
  echo "[train.sh $(date '+%F %T')] SIGTERM received (job cancelled or preempted by slurm)"
  if [ -n "$RUN_DIR_ABS" ]; then touch "$RUN_DIR_ABS/PREEMPT" || true; fi
}
trap on_usr1 USR1
trap on_usr2 USR2
trap on_term TERM

log() { echo "[train.sh $(date '+%F %T')] $*"; }
die() { echo "[train.sh $(date '+%F %T')] ERROR: $*" >&2; exit 2; }

[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a SLURM job: submit it with 'sbatch slurm/train.sh'"
SUBMIT_DIR=${SLURM_SUBMIT_DIR:-$PWD}
RESTARTS=${SLURM_RESTART_COUNT:-0}

# --- software environment -------------------------------------------------------------------
activate() { set +u; source "$1"; set -u; }
if [ -n "${DISTGAN_ENV:-}" ]; then
  if [ -d "$DISTGAN_ENV" ]; then activate "$DISTGAN_ENV/bin/activate"; else activate "$DISTGAN_ENV"; fi
elif ! command -v accelerate >/dev/null 2>&1 && [ -f "$SUBMIT_DIR/.venv/bin/activate" ]; then
  activate "$SUBMIT_DIR/.venv/bin/activate"
fi
command -v accelerate >/dev/null 2>&1 || die "accelerate not found on PATH (set DISTGAN_ENV=/path/to/venv)"

# --- run folder and overrides -----------------------------------------------------------------
OVERRIDES=()
for arg in "$@"; do
  case $arg in
    train.run_dir=*) RUN_DIR=${arg#train.run_dir=} ;;
    *) OVERRIDES+=("$arg") ;;
  esac
done
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME:-distgan}-${SLURM_JOB_ID}}
case $RUN_DIR in /*) ;; *) RUN_DIR=$PWD/$RUN_DIR ;; esac
mkdir -p "$RUN_DIR"
if [ "$RESTARTS" -gt 0 ] && [ -e "$RUN_DIR/DONE" ]; then
  log "restart $RESTARTS of job $SLURM_JOB_ID but $RUN_DIR/DONE exists: the run is complete"
  exit 0
fi
# Stale files of an earlier attempt: its marker, and a request of train.sh's own that the training
# did not act on (PREEMPT_GRACE ran out), which would stop this attempt at once. A request made
# from here on is honoured: the trainer never removes a request it has not acted on.
rm -f "$RUN_DIR/PREEMPT" "$RUN_DIR/PREEMPTED" "$RUN_DIR/DONE"
RUN_DIR_ABS=$RUN_DIR

TRAIN_SCRIPT=${DISTGAN_TRAIN_SCRIPT:-distgan/train.py}
case $TRAIN_SCRIPT in /*) ;; *) TRAIN_SCRIPT=$SUBMIT_DIR/$TRAIN_SCRIPT ;; esac
[ -f "$TRAIN_SCRIPT" ] || die "training script $TRAIN_SCRIPT not found (submit from the repository root)"
PROG=("$TRAIN_SCRIPT")
if [ -n "${CONFIG:-}" ]; then PROG+=(--config "$CONFIG"); fi
PROG+=("train.run_dir=$RUN_DIR" "train.resume=auto" ${OVERRIDES[@]+"${OVERRIDES[@]}"})

# --- topology -----------------------------------------------------------------------------------
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-}
  if [ -z "$GPUS_PER_NODE" ] && [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then GPUS_PER_NODE=${SLURM_GPUS_PER_NODE##*:}; fi
  GPUS_PER_NODE=${GPUS_PER_NODE:-0}
fi
if [ "$GPUS_PER_NODE" -gt 0 ]; then
  NPROC_PER_NODE=${NPROC_PER_NODE:-$GPUS_PER_NODE}
  KIND=gpu DEVICE="gpu ($GPUS_PER_NODE per node)"
else
  NPROC_PER_NODE=${NPROC_PER_NODE:-1}
  export ACCELERATE_USE_CPU=1          # with --multi_gpu: several CPU processes over gloo
  KIND=cpu DEVICE="cpu (gloo)"
fi
# Each rank's share of the node's CPUs: its loader workers and compute threads (one rule, in
# distgan/distributed.py, unit-tested with the variables SLURM sets).
NODE_CPUS='' CPUS_PER_RANK='' DATA_WORKERS='' OMP_THREADS=1
if share=$(cd "$SUBMIT_DIR" && python -m distgan.distributed cpu-share "$NPROC_PER_NODE" "$KIND"); then
  eval "$share"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$OMP_THREADS}
WORKERS_NOTE="data.workers=$DATA_WORKERS"
WORKERS_GIVEN=0
for arg in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
  case $arg in data.workers=*) WORKERS_GIVEN=1 ;; esac
done
if [ "$WORKERS_GIVEN" -eq 1 ]; then
  WORKERS_NOTE="data.workers as given"
elif [ -n "${CONFIG:-}" ] && grep -Eq '^[[:space:]]+workers:' "$CONFIG" 2>/dev/null; then
  WORKERS_NOTE="data.workers from $CONFIG"
elif [ -n "$DATA_WORKERS" ]; then
  PROG+=("data.workers=$DATA_WORKERS")
fi
if [ -n "$CPUS_PER_RANK" ] && [ "$KIND" = gpu ] && [ "$CPUS_PER_RANK" -lt 2 ]; then
  log "WARNING: $NODE_CPUS CPU(s) for $NPROC_PER_NODE GPU ranks on a node leave no loader worker per rank;" \
      "submit with --cpus-per-task=$(( NPROC_PER_NODE * 5 )) (1 + 4 workers per rank)"
fi
WORLD_SIZE=$(( NNODES * NPROC_PER_NODE ))
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')
if [ -z "${MAIN_PROCESS_IP:-}" ]; then
  # Node names need not resolve (simulated nodes, some clusters): use slurm's NodeAddr.
  MAIN_PROCESS_IP=$(scontrol show node "$HEAD_NODE" -o 2>/dev/null | tr ' ' '\n' | awk -F= '$1 == "NodeAddr" {print $2}' || true)
  MAIN_PROCESS_IP=${MAIN_PROCESS_IP:-$HEAD_NODE}
fi
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
# One process: accelerate passes no --main_process_ip on, and distgan would take the first node's
# name from SLURM (which need not resolve) for its process group: hand it the address found above.
export MASTER_ADDR=${MASTER_ADDR:-$MAIN_PROCESS_IP} MASTER_PORT=${MASTER_PORT:-$MAIN_PROCESS_PORT}
MIXED_PRECISION=${MIXED_PRECISION:-no}

LAUNCH=(accelerate launch --num_machines "$NNODES" --num_processes "$WORLD_SIZE"
        --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT"
        --mixed_precision "$MIXED_PRECISION" --dynamo_backend no)
if [ "$WORLD_SIZE" -gt 1 ]; then LAUNCH+=(--multi_gpu --rdzv_backend static); fi
# One task per node. $SLURM_NODEID is escaped so that each node expands its own (not the batch
# shell's 0). The task ignores USR1 (inherited by accelerate/torchrun, which would die of it).
TASK="trap '' USR1; exec $(printf '%q ' "${LAUNCH[@]}")--machine_rank \"\$SLURM_NODEID\" $(printf '%q ' "${PROG[@]}")"
SRUN=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
# Slurm 22.05 srun does not inherit --cpus-per-task from sbatch: pass it, or the task gets 1 CPU.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then SRUN+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi

requeue() {
  log "requeueing job $SLURM_JOB_ID (next restart $((RESTARTS + 1))): $*"
  if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
  log "ERROR: 'scontrol requeue $SLURM_JOB_ID' failed (submitted with --no-requeue?); resubmit to resume" >&2
  exit 17
}

log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) restart count $RESTARTS"
log "nodes $NNODES [$SLURM_JOB_NODELIST], head $HEAD_NODE at $MAIN_PROCESS_IP:$MAIN_PROCESS_PORT"
log "world size $WORLD_SIZE = $NNODES node(s) x $NPROC_PER_NODE process(es), $DEVICE, mixed precision $MIXED_PRECISION"
log "cpus ${NODE_CPUS:-unknown} per node, ${CPUS_PER_RANK:-?} per process: $WORKERS_NOTE, OMP_NUM_THREADS=$OMP_NUM_THREADS"
log "run dir $RUN_DIR"
if [ "$PREEMPTED" -eq 1 ]; then requeue "preemption notice arrived before the launch"; fi
log "launch: ${SRUN[*]} bash -c '$TASK'"

# --- run: srun in the background, so that the traps run while we wait -----------------------------
"${SRUN[@]}" bash -c "$TASK" &
SRUN_PID=$!
rc=0
while :; do
  rc=0
  wait "$SRUN_PID" || rc=$?
  if [ "$GRACE_EXPIRED" -eq 1 ] && kill -0 "$SRUN_PID" 2>/dev/null; then
    requeue "the training did not stop within PREEMPT_GRACE=${PREEMPT_GRACE}s of the notice" \
            "(it resumes from its last checkpoint)"
  fi
  # A trapped signal makes `wait` return early (status > 128) while srun still runs: wait again.
  if kill -0 "$SRUN_PID" 2>/dev/null; then continue; fi
  break
done
if [ -n "$GRACE_PID" ]; then kill "$GRACE_PID" 2>/dev/null || true; fi
log "training step exited with status $rc"

if [ -e "$RUN_DIR/DONE" ]; then
  rm -f "$RUN_DIR/PREEMPT" "$RUN_DIR/PREEMPTED"
  log "run complete ($RUN_DIR/DONE)"
  exit 0
fi
if [ "$TERMINATED" -eq 1 ]; then
  log "stopped by SIGTERM before the run was complete; not requeueing here"
  exit 143
fi
# accelerate and torchrun report the trainer's exit 17 as 1: the trainer's PREEMPTED marker counts
# as well, and so does a request it did not get to (anyone may ask a running job to checkpoint and
# requeue: touch \$RUN_DIR/PREEMPT).
if [ "$rc" -eq 17 ] || [ "$PREEMPTED" -eq 1 ] || [ -e "$RUN_DIR/PREEMPTED" ] || [ -e "$RUN_DIR/PREEMPT" ]; then
  requeue "the training stopped for preemption (step status $rc)"
fi
if [ "$rc" -eq 0 ]; then
  log "WARNING: training exited 0 but wrote no $RUN_DIR/DONE marker"
fi
log "training failed (status $rc): not requeueing"
exit "$rc"
