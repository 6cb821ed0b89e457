#!/usr/bin/env bash
# One prepared GPU run: the GPU tests, then the loss benchmark, all output into one directory.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR [--wheels DIR] [--budget SECONDS]   # on a CUDA machine, ~8 min
#   bash benchmarks/gpu_suite.sh OUT_DIR --dry-run                           # CPU, tiny shapes: the plumbing
#
# Installs nothing into the interpreter (peer wheels from --wheels go to a temporary --target directory) and
# needs no build of this package: it runs from the repository root with PYTHONPATH. PYTHON=/path/to/python
# picks the interpreter (default: .venv/bin/python if present, else python3, else python).
# Writes gpu-<date>-<device>-{env.txt,pytest.log,pytest-junit.xml,loss.json,loss.md,loss.png,bench.log} into
# OUT_DIR; see benchmarks/gpu_suite.py and benchmarks/README.md.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
if [ $# -lt 1 ]; then
    echo "usage: bash benchmarks/gpu_suite.sh OUT_DIR [--dry-run] [--wheels DIR] [--budget SECONDS]" >&2
    exit 64
fi
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3 || command -v python)"; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" "$ROOT/benchmarks/gpu_suite.py" "$@"
