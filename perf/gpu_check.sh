#!/usr/bin/env bash
# The one prepared script for a lent GPU: 15 minutes of machine time in all, every call starting cold
# (no Triton cache survives), at most 8 files and the last 12,000 characters of output back.
#
#   OUT=dir bash perf/gpu_check.sh --quick     # first call: correctness of every kernel path, then the
#                                              # main case (N = 2^20, 3 -> 4x64 -> 3, Softplus(100)) in
#                                              # TF32 against every peer and the roofline, and in bf16
#   OUT=dir bash perf/gpu_check.sh --tune      # second call: the config sweep (main case TF32 and bf16,
#                                              # widths 32/128/256/512, depths 2/8), tuned table written
#   OUT=dir bash perf/gpu_check.sh --tests     # the GPU-only pytest tests (inductor, opcheck, TF32, ...)
#   OUT=dir bash perf/gpu_check.sh --dry-run   # the --quick steps on CPU under the Triton interpreter at
#                                              # tiny sizes: same files, same summary (add --tune too)
#
# What comes back in $OUT (rewritten after every step, so a kill keeps what finished): summary.json
# (every number; card, driver, torch, triton, date), summary.txt (printed at the end, the main TF32
# table and the targets last), results.tgz (per-step logs and JSONL, tuned config tables), <= 5 PNGs.
#
# Budget (--quick; step limits in perf/gpu_check.py add up to 280 s after a ~15 s install):
#   step                 limit  kernel variants compiled (counted by a dry run)
#   environment            30   0
#   correctness            75   ~60 variants over 23 cases, in 14 processes at once: ~5 per process
#   main-tf32              60   forward candidates + fused backward, compiled by 12 processes first
#   main-tf32-compiled     75   inductor's own (parallel) compiles of the two torch.compile peers
#   main-bf16              35   as main-tf32
# Cold Triton compiles cost 2-6 s per variant (ahead-of-time compiles here); run in parallel, the
# correctness step should take 30-45 s on a 16-core GPU machine. A dry run here (2-core CPU,
# interpreter) takes about DRY_RUN_SECONDS s. --tune: 8 cases, each precompiled in parallel then
# autotuned, limit 200 s.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export GPU_CHECK_STARTED=$(date +%s)  # the call's budget counts the install too
case " $* " in
*" --dry-run "*) ;;
*)  # the GPU machine has torch and triton but no network: install the checkout alone
    pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { echo "install failed"; tail -20 "$OUT/install.log"; }
    rm -f "$OUT/install.log" ;;
esac
exec python perf/gpu_check.py --out "$OUT" "$@"
