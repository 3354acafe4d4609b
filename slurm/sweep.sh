#!/usr/bin/env bash
# One trial of a distgan sweep per SLURM array task. Each task is a full slurm/train.sh run in its
# own run folder (<sweep folder>/trial-<iii>), with train.sh's preemption contract: on USR1 it
# checkpoints, requeues this array task alone (scontrol requeue of its own job id) and resumes.
#
#   distgan sweep configs/sweeps/lr-grid.yaml --submit        # writes the sweep folder, then sbatch below
#   sbatch --array=0-3 slurm/sweep.sh runs/sweep-lr-grid      # by hand, after `distgan sweep FILE --write`
#   sbatch --array=0-3%2 --nodes 2 slurm/sweep.sh runs/sweep-lr-grid data.workers=2   # 2 at a time, 2 nodes each
#
# Arguments: the sweep folder (holding trial-<iii>/trial.yaml, written by `distgan sweep`), then
# optional section.key=value overrides applied to every trial. Environment: everything train.sh
# reads (DISTGAN_ENV, GPUS_PER_NODE, NPROC_PER_NODE, PREEMPT_GRACE, ...), plus
#   DISTGAN_TRAIN_SH  the train.sh to run (default: slurm/train.sh of the submit directory;
#                     `distgan sweep --submit` sets it to the one beside this script)
# The #SBATCH values are train.sh's, with one log file pair per array task (%A_%a).
#
#SBATCH --job-name=distgan-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
#SBATCH --error=%x-%A_%a.err

set -euo pipefail

die() { echo "[sweep.sh $(date '+%F %T')] ERROR: $*" >&2; exit 2; }

SWEEP_DIR=${1:-}
[ -n "$SWEEP_DIR" ] || die "usage: sbatch --array=0-N slurm/sweep.sh SWEEP_FOLDER [section.key=value ...]"
shift
TASK=${SLURM_ARRAY_TASK_ID:-}
[ -n "$TASK" ] || die "not an array task: submit with sbatch --array=0-N (or distgan sweep FILE --submit)"
case $SWEEP_DIR in /*) ;; *) SWEEP_DIR=${SLURM_SUBMIT_DIR:-$PWD}/$SWEEP_DIR ;; esac
TRIAL=$(printf '%s/trial-%03d' "$SWEEP_DIR" "$TASK")
[ -f "$TRIAL/trial.yaml" ] || die "$TRIAL/trial.yaml not found: array index $TASK is not a trial of $SWEEP_DIR"
TRAIN_SH=${DISTGAN_TRAIN_SH:-${SLURM_SUBMIT_DIR:-$PWD}/slurm/train.sh}
[ -f "$TRAIN_SH" ] || die "$TRAIN_SH not found (set DISTGAN_TRAIN_SH or submit from the repository root)"

echo "[sweep.sh $(date '+%F %T')] array task $TASK of job ${SLURM_ARRAY_JOB_ID:-?}: trial $TRIAL"
# exec: train.sh becomes the batch shell, so USR1 from --signal=B: or `scancel --batch` reaches its traps.
export CONFIG=$TRIAL/trial.yaml RUN_DIR=$TRIAL
exec bash "$TRAIN_SH" "$@"
