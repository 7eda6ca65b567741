#!/usr/bin/env bash
# Train on a Cloud TPU pod slice (v4/v5e/v5p): installs the requirements on every worker, then starts the same
# command on all of them; jax.distributed.initialize() finds the pod's coordinator by itself.
#
#   launch/tpu.sh TPU_NAME ZONE configs/phi3_mini_moiie.py:stage=2 gs://bucket/run1 [extra absl flags...]
#
# Env: PROJECT (gcloud project, optional), REPO (git URL of this repository; default: this checkout's origin),
#      BRANCH (default main), JAX_TPU (default "jax[tpu]==0.10.2").
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,9p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
REPO=${REPO:-$(git config --get remote.origin.url)}
BRANCH=${BRANCH:-main}
JAX_TPU=${JAX_TPU:-"jax[tpu]==0.10.2"}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}

remote() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$1"
}

remote "set -e; [ -d moiie_jax ] || git clone -q -b $BRANCH $REPO moiie_jax; cd moiie_jax; git pull -q;
  python3 -m venv .venv; .venv/bin/pip install -q -r requirements.txt '$JAX_TPU'"
# Every worker runs the same program; only process 0 writes logs and the final export (see train/loop.py).
remote "cd moiie_jax && MOIIE_DISTRIBUTED=1 .venv/bin/python -m moiie_jax.train --config '$CONFIG' \
  --workdir '$WORKDIR' $*"
