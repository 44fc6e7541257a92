#!/usr/bin/env bash
# The test command: sets everything up on a fresh machine, then lint, type-check and
# every test, including the end-to-end tests with real vLLM (marker `vllm`).
#   scripts/test.sh                 everything
#   scripts/test.sh -m "not vllm"   pytest arguments are passed through
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
VENV=${VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"
echo "== ruff"
ruff check disaggd tests bench devtools
echo "== mypy"
mypy
echo "== pytest"
set +e
python -m pytest -ra "$@"
rc=$?
set -e
# pytest exits 5 when no test was collected: that is a failure here.
exit $rc
