#!/usr/bin/env bash
# The GPU check, one command (scripts/gpu_check.py has the matrix):
#   bash scripts/gpu_check.sh [--out DIR]         on the GPU machine: installs the carried wheels (.whl/, fetched here
#                                                 by scripts/gpu_wheels.sh) into /tmp/site, leaving its torch alone
#   bash scripts/gpu_check.sh --cpu [--out DIR]   the same matrix on this machine's CPU (the test suite runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " == *" --cpu "* ]]; then
  exec "${PYTHON:-.venv/bin/python}" scripts/gpu_check.py "$@"
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec python3 scripts/gpu_check.py "$@"
