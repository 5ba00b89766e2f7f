#!/usr/bin/env bash
# The one prepared script for a lent GPU (DESIGN.md section 5). Runs from the repository root:
#   OUT=/some/dir bash perf/gpu_check.sh
# 1. installs the checkout without network (torch and triton are already there),
# 2. benchmarks the main case in TF32 (self-checks first, every peer), then bf16 and 3xTF32,
# 3. runs the GPU tests (compiled kernels; a subset of the shape grid, every kernel path),
# 4. benchmarks widths 32-256 and depths 2 and 8,
# 5. writes JSON, CSV, plots, logs and the autotuned config table under $OUT and prints a summary.
# Each step has its own time limit (515 s at most in all, most steps end well before theirs) and a failed step does not stop the
# others: what matters most runs first.
set -u
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export TRITON_DEFAULT_FP_FUSION=1
export PYTHONUNBUFFERED=1
START=$(date +%s)
step() { echo "[$(( $(date +%s) - START ))s] $*"; }

step "install"
pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { echo "install failed"; tail -20 "$OUT/install.log"; }
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python - > "$OUT/versions.txt" 2>&1 <<'PY'
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())
PY
cat "$OUT/versions.txt"

step "main case, TF32: self-checks + every peer (N = 2^20, 3 -> 4x64 -> 3, softplus(100))"
timeout 150 python -m tritonjac --precision high --rounds 9 --tuned-configs "$OUT/configs" \
    --json "$OUT/main-tf32.json" --plot "$OUT/main-tf32.png" > "$OUT/main-tf32.log" 2>&1
echo "exit code $?"

step "main case, bf16 (no torch.compile peers)"
timeout 60 python -m tritonjac --dtype bfloat16 --skip-check --no-compile --rounds 9 --tuned-configs "$OUT/configs" \
    --json "$OUT/main-bf16.json" --plot "$OUT/main-bf16.png" > "$OUT/main-bf16.log" 2>&1
echo "exit code $?"

step "main case, 3xTF32 (PyTorch's default float32 precision; its loss on J trains per layer)"
timeout 45 python -m tritonjac --precision highest --skip-check --no-compile --rounds 5 \
    --json "$OUT/main-highest.json" > "$OUT/main-highest.log" 2>&1
echo "exit code $?"

step "tests on the GPU"
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_triton_gpu.py tests/test_compile.py \
    tests/test_triton_forward.py tests/test_triton_backward.py \
    -k "(gpu or every_activation or point_counts or half or depths or deterministic or elastic or compile or opcheck) and not sees_the_kernels and not for_sm90" > "$OUT/tests.log" 2>&1
echo "tests exit code $?: $(tail -1 "$OUT/tests.log")"

step "widths 32-256 and depths 2, 8 (TF32, no torch.compile peers)"
timeout 50 python perf/bench.py --precision high --points 1048576 --widths 32 128 256 --depths 4 \
    --no-compile --rounds 5 --max-seconds 5 --tuned-configs "$OUT/configs" --out "$OUT/widths.json" \
    > "$OUT/widths.log" 2>&1
echo "exit code $?"
timeout 30 python perf/bench.py --precision high --points 1048576 --widths 64 --depths 2 8 \
    --no-compile --rounds 5 --max-seconds 5 --tuned-configs "$OUT/configs" --out "$OUT/depths.json" \
    > "$OUT/depths.log" 2>&1
echo "exit code $?"
timeout 30 python perf/plot.py "$OUT/widths.json" "$OUT/depths.json" --out-dir "$OUT" > "$OUT/plot.log" 2>&1

step "summary"
for f in main-tf32 main-bf16 main-highest; do
    echo "== $f"
    grep -E "self-check|Triton kernels" "$OUT/$f.log"
    sed -n '/^forward_jacobian/,$p' "$OUT/$f.log" | head -50
done
grep -h "tritonjac (triton)" "$OUT/widths.log" "$OUT/depths.log" | head -20
step "done"
