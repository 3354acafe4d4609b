#!/usr/bin/env bash
# Install the packages the loopback SLURM test cluster needs (Debian/Ubuntu, run as root):
# slurmctld, slurmd, slurm-client and munge. Idempotent: returns at once when all binaries are present.
#
#   sudo .ci/install-slurm.sh        # then: pytest -m slurm tests/slurm
set -euo pipefail

need=(slurmctld slurmd sbatch srun scontrol squeue sinfo scancel munged munge unmunge)
missing=()
for b in "${need[@]}"; do
  command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing+=("$b")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-slurm: already installed ($(slurmd -V 2>/dev/null || echo slurmd))"
  exit 0
fi
echo "install-slurm: missing ${missing[*]}; installing"

if [ "$(id -u)" -ne 0 ]; then
  echo "install-slurm: must run as root (apt-get)" >&2; exit 1
fi
command -v apt-get >/dev/null 2>&1 || { echo "install-slurm: apt-get not available" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists only if they are absent (a fresh container) or the first try fails.
if ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; then
  apt-get update -qq
fi
pkgs=(slurmctld slurmd slurm-client munge)
if ! apt-get install -y -qq --no-install-recommends "${pkgs[@]}"; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
fi
echo "install-slurm: installed $(slurmd -V)"
