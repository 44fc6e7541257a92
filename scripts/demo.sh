#!/usr/bin/env bash
# The main job: on a fresh machine, set up the environment, build the tiny model if it
# is missing, and run disaggd in the foreground on the embedded CPU topology
# (one prefill + one decode vLLM on this machine, ExampleConnector, proxy on :8000).
# Ctrl-C drains and stops everything. From a second terminal, README.md "The two commands"
# gives the seed's two requests and one longer than a KV block: `disaggd status` then shows
# the decode's KV check verdicts (moved, recomputed, short_prompt).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
VENV=${VENV:-.venv}
CONFIG=${CONFIG:-etc/examples/cpu-tiny.toml}
"$VENV/bin/python" -m devtools.tinymodel models/tiny-llama >/dev/null
exec "$VENV/bin/disaggd" run -c "$CONFIG" "$@"
