"""disaggd: a supervisor daemon and proxy for vLLM disaggregated prefill.

The daemon spawns and supervises prefill (KV producer) and decode (KV consumer)
`vllm serve` instances and hosts an OpenAI-compatible proxy that sends each
request through a prefill instance and then a decode instance.

This package never imports vllm or torch: the engine runs in child processes.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
