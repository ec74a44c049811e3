#!/usr/bin/env bash
# The model-2.0 recipe on one GPU, stopping itself before a time budget (see bench/gpu_train.py).
#
#   bench/gpu_train.sh OUT_DIR [BUDGET_SECONDS] [--tiny] [--data DIR] [--device auto|cpu|cuda]
#
# OUT_DIR gets one run folder per stage (teachers, then the distilled student) and
# gpu_train.json with every stage's figures. BUDGET_SECONDS (default 840) covers everything;
# the stages are planned to end by 95% of it, and `timeout` ends the run at the budget itself
# if an evaluation overruns its estimate. --tiny: the tiny network (the CPU smoke test).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-$here/../.venv/bin/python}
[ -x "$python" ] || python=python3
if [ $# -lt 1 ] || [[ $1 == -* ]]; then
  sed -n '4p' "$0" | sed 's/^#   /usage: /' >&2
  exit 2
fi
out=$1
shift
budget=840
if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then
  budget=$1
  shift
fi
# glibc would hand the backbone's big freed blocks back to the kernel every batch (README, bench/tune)
export MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824
exec timeout --kill-after=10 "$budget" "$python" "$here/gpu_train.py" "$out" --budget "$budget" "$@"
