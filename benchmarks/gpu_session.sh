#!/usr/bin/env bash
# The prepared commands for a lent GPU (the device tool), each stage one call of under 10 minutes:
#
#   REV=<commit> bash benchmarks/gpu_session.sh check  # ~4 min: >2^31-offset parity, wide-C parity and
#                                                      # product-path A/B (C = 128, 256), host time
#   REV=<commit> bash benchmarks/gpu_session.sh tune   # ~8 min: launch and path sweep (bfloat16, float32
#                                                      # with tf32x3; single-pass, blocked, matmul at
#                                                      # C = 64), parity with the result, module rows
#                                                      # incl. the A/B rows (f32 proj, 4-gate t0, ...)
#   REV=<commit> bash benchmarks/gpu_session.sh full   # ~8 min: gpu_check.py -- every op / module / dtype,
#                                                      # then the benchmark table (the issue-3 check)
#   REV=<commit> bash benchmarks/gpu_session.sh memory # ~4 min: the blocks alive at the training peak
#                                                      # (NCHW and the NHWC opt-in)
#
# A session has 15 minutes of device time, start-up included: check + tune fill it.
#
# Logs go to $OUT (the device tool brings that folder back) or to benchmarks/logs/; REV names the
# commit in the log names (the device machine's copy of the tree may have no .git).  Record what
# they say, with the card's name, in benchmarks/RESULTS.md.
set -uo pipefail
stage=${1:-}
case $stage in
  check | tune | full | memory) ;;
  *) echo "usage: bash benchmarks/gpu_session.sh check|tune|full|memory" >&2; exit 2 ;;
esac
out=${OUT:-benchmarks/logs}
mkdir -p "$out"
rev=${REV:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
day=$(date -u +%F)
export PYTHONPATH=.

status=0  # the script's exit status: the last non-zero one of its run commands (the device tool shows it)
run() {  # run NAME LIMIT_S COMMAND...: its output on screen and in $out/<day>-<NAME>-<rev>.log
  local name=$1 limit=$2 rc
  shift 2
  echo "== $* (limit ${limit} s)"
  timeout "$limit" "$@" 2>&1 | tee "$out/$day-$name-$rev.log"
  rc=${PIPESTATUS[0]}
  echo "== exit $rc"
  if [ "$rc" -ne 0 ]; then status=$rc; fi
}

nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv 2>&1 \
  | tee "$out/$day-nvidia-smi-$stage-$rev.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
case $stage in
  check)
    run only64 60 python benchmarks/gpu_check.py --skip-bench --only-64bit
    run wide 240 python benchmarks/gpu_check.py --wide-only
    run host 90 python benchmarks/host_overhead.py --min-run-time 0.5 ;;
  memory)
    run memory 240 python benchmarks/gpu_memory.py --nhwc ;;
  tune)
    run tune 560 python benchmarks/gpu_tune.py --sweep-dtypes bfloat16,float32 --sweep-budget-s 300 --no-compile ;;
  full)
    run check 560 python benchmarks/gpu_check.py ;;
esac
exit $status
