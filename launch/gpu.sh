#!/usr/bin/env bash
# Train on NVIDIA GPUs: one host with all its GPUs, or several hosts (one process per host).
#
#   launch/gpu.sh configs/phi3_mini_moiie.py:stage=2 /data/runs/run1 [extra absl flags...]
#
# Multi-host: run this on every host with COORDINATOR=host0:1234 NUM_PROCESSES=N PROCESS_ID=i set
# (under SLURM these are derived from SLURM_* variables by jax.distributed.initialize() when left unset).
# First-time setup: python3 -m venv .venv && .venv/bin/pip install -r requirements.txt "jax[cuda12]==0.10.2"
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,8p' "$0"; exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# Latency-hiding scheduler overlaps the expert all-to-alls with compute.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
if [ -n "${COORDINATOR:-}${SLURM_JOB_ID:-}" ]; then
  export MOIIE_DISTRIBUTED=1  # COORDINATOR / NUM_PROCESSES / PROCESS_ID are read by moiie_jax.train
fi
exec .venv/bin/python -m moiie_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"
