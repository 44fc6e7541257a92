#!/bin/sh
# The benchmarks, from anywhere: bench/run.sh [--quick] [--real] [...] (see bench/README.md).
cd "$(dirname "$0")/.." || exit 1
exec .venv/bin/python -m bench.run "$@"
