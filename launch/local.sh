#!/usr/bin/env bash
# Train on this machine's CPU (or its one accelerator): the runlocal form of a recipe by default.
#
#   launch/local.sh [configs/phi3_mini_moiie.py:stage=2,runlocal=True] [workdir] [extra absl flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/phi3_mini_moiie.py:stage=2,runlocal=True}
WORKDIR=${2:-workdir/local}
shift $(( $# > 2 ? 2 : $# ))
[ -x .venv/bin/python ] || { python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt; }
# Transparent huge pages for XLA:CPU's per-step temporaries (fewer page faults; README, bench/RESULTS.md).
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}
exec .venv/bin/python -m moiie_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"
