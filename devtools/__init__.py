"""Development tools that ship with the repository, not in the wheel.

* `standin` — a stand-in vLLM engine (``python -m devtools.standin``) for fast edge-case
  tests and the benchmark;
* `tinymodel` — a deterministic tiny Llama for the CPU examples (``python -m devtools.tinymodel``).

`scripts/setup.sh` puts the checkout on the virtual environment's path so that children
spawned by the daemon under test can run them.
"""
