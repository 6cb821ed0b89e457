#!/usr/bin/env bash
# One-command GPU check: the GPU test suite, then the GPU loss benchmark. Installs nothing.
#
#   bash benchmarks/gpu_suite.sh                # PYTHON=/path/to/python to pick an interpreter
#
# Writes under benchmarks/results/gpu-suite-<date>-<host>/: env.txt (device, versions), pytest.log,
# pytest-junit.xml, bench.log; bench_loss.py writes its JSON/Markdown into benchmarks/results/ as usual.
# Exit status: non-zero if the tests or the benchmark failed (both always run).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3 || command -v python)"; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # real kernels, not the CPU interpreter

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite: no CUDA device visible to $PY; nothing to do" >&2
    exit 2
fi
OUT="$ROOT/benchmarks/results/gpu-suite-$(date -u +%Y%m%d-%H%M%S)-$(hostname -s 2>/dev/null || echo host)"
mkdir -p "$OUT"

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "python: $PY"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: unavailable"
    "$PY" - <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton unavailable:", exc)
from haf_kernels import backends
print("backends", backends.available(), backends.unavailable_reasons())
PYEOF
} 2>&1 | tee "$OUT/env.txt"

status=0
echo "== pytest tests/test_gpu.py"
"$PY" -m pytest tests/test_gpu.py -m gpu -v -rs --durations=15 --junitxml="$OUT/pytest-junit.xml" 2>&1 | tee "$OUT/pytest.log"
test_rc=${PIPESTATUS[0]}
[ "$test_rc" -ne 0 ] && status=$test_rc

echo "== python benchmarks/bench_loss.py --preset gpu"
"$PY" benchmarks/bench_loss.py --preset gpu 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
[ "$bench_rc" -ne 0 ] && status=$bench_rc

echo "gpu_suite: tests rc=$test_rc, bench rc=$bench_rc; logs in $OUT" | tee -a "$OUT/env.txt"
exit $status
