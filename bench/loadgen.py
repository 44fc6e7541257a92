"""Load generator: streaming completions, timed from the client's side.

A separate process (so that its CPU is not the daemon's), one pooled aiohttp
session, `time.perf_counter` for every timestamp::

    python -m bench.loadgen --url http://127.0.0.1:8000 --concurrency 16 --requests 400
    python -m bench.loadgen --prefill-url http://127.0.0.1:8100 --url http://127.0.0.1:8200 ...
    python -m bench.loadgen --url URL --concurrency 16 --duration 10 --records
    python -m bench.loadgen --url URL --rate 2.5 --duration 30        # open loop, Poisson

``--prompt-chars N`` sends ``--prompt`` repeated to N characters (a long prompt cannot
be an argv string: Linux caps one at 128 KiB).

With ``--prefill-url`` it is the *two-leg baseline*: it sends the prefill leg
itself (``max_tokens`` 1, ``stream`` false, NIXL-style ``kv_transfer_params``
request) and then the streaming request to ``--url`` with the returned
``kv_transfer_params``, as the least any P/D proxy can do.

Closed loop (``--concurrency`` workers, each sending its next request when the
last one ended) for ``--requests`` requests or ``--duration`` seconds, after
``--warmup`` unmeasured requests (default: one per worker, which also opens the
connections); or open loop (``--rate`` requests/s, exponential gaps) for
``--duration`` seconds. SIGTERM or SIGINT ends the load early: no new
requests, those in flight finish, the result is printed as usual.

Per request: TTFT (request sent → first token chunk), the gaps between token
chunks (ITL), end-to-end latency, tokens streamed, and an error kind when it
failed (``http_503``, ``ClientConnectorError``, ``short``: fewer tokens than
``max_tokens``, ``abort``, ``stream_error``, ``timeout``). Prints one JSON
object: the summary, plus raw samples (``--samples``) and per-request records
with absolute CLOCK_MONOTONIC times (``--records``; on Linux `perf_counter` is
that clock, so another process can compare them with its own).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from disaggd.topology.connectors import prefill_kv_transfer_params

#: The prompt of every request: fixed, so that every way does the same work.
DEFAULT_PROMPT = (
    "Disaggregated serving runs the prefill of a prompt on one instance and its decode on "
    "another, moving the KV cache between them. "
) * 2


def long_prompt(base: str, chars: int) -> str:
    """`base` repeated (the last copy cut) to exactly `chars` characters."""
    return (base * (chars // len(base) + 1))[:chars]


@dataclass
class Sample:
    """One request as the client saw it (perf_counter seconds)."""

    start: float
    end: float = 0.0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


@dataclass(frozen=True)
class Target:
    """Where requests go and what they are."""

    url: str
    prefill_url: str | None
    model: str
    prompt: str
    max_tokens: int
    timeout: float
    ignore_eos: bool

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": self.prompt,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 99)) -> dict[str, float]:
    """Linear-interpolation percentiles (numpy's default) and the mean; {} when empty."""
    if not values:
        return {}
    xs = sorted(values)
    out: dict[str, float] = {}
    for q in qs:
        pos = (len(xs) - 1) * q / 100.0
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        out[f"p{q:g}"] = round(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo), 3)
    out["mean"] = round(sum(xs) / len(xs), 3)
    return out


async def _prefill_leg(
    session: aiohttp.ClientSession, target: Target, rid: str, s: Sample
) -> dict[str, Any] | None:
    """The two-leg baseline's first leg; its kv_transfer_params (None: failed, `s.error` set)."""
    body = target.body()
    del body["stream_options"]
    body.update(stream=False, max_tokens=1, kv_transfer_params=prefill_kv_transfer_params())
    async with session.post(
        f"{target.prefill_url}/v1/completions", json=body, headers={"X-Request-Id": rid}
    ) as resp:
        if resp.status != 200:
            s.error = f"prefill_http_{resp.status}"
            return None
        result = await resp.json()
    params = result.get("kv_transfer_params")
    return params if isinstance(params, dict) else {}


async def one_request(session: aiohttp.ClientSession, target: Target) -> Sample:
    """Send one streaming request (two legs with a prefill URL) and time it."""
    s = Sample(start=time.perf_counter())
    try:
        await asyncio.wait_for(_exchange(session, target, s), target.timeout)
    except asyncio.TimeoutError:
        s.error = "timeout"
    except aiohttp.ClientError as exc:
        s.error = type(exc).__name__
    s.end = time.perf_counter()
    return s


async def _exchange(session: aiohttp.ClientSession, target: Target, s: Sample) -> None:
    rid = uuid.uuid4().hex
    body = target.body()
    if target.prefill_url is not None:
        params = await _prefill_leg(session, target, rid, s)
        if params is None:
            return
        body["kv_transfer_params"] = params
    async with session.post(
        f"{target.url}/v1/completions", json=body, headers={"X-Request-Id": rid}
    ) as resp:
        if resp.status != 200:
            await resp.read()
            s.error = f"http_{resp.status}"
            return
        done, usage_tokens = await _read_stream(resp, s)
    if usage_tokens is not None:
        s.tokens = usage_tokens
    if s.error is None and (not done or s.tokens < target.max_tokens):
        s.error = "short"


async def _read_stream(resp: aiohttp.ClientResponse, s: Sample) -> tuple[bool, int | None]:
    """Time the token chunks of an SSE stream into `s`; ([DONE] seen, usage's token count)."""
    done = False
    last = 0.0
    usage_tokens: int | None = None
    async for line in resp.content:
        if not line.startswith(b"data: "):
            continue
        now = time.perf_counter()
        if line.startswith(b"data: [DONE]"):
            done = True
        elif line.startswith(b'data: {"error"'):
            s.error = "stream_error"
        elif b'"choices":[]' in line:  # the usage chunk
            usage = json.loads(line[6:]).get("usage") or {}
            usage_tokens = usage.get("completion_tokens")
        else:
            if s.ttft is None:
                s.ttft = now - s.start
            else:
                s.gaps.append(now - last)
            last = now
            s.tokens += 1
            if b'"finish_reason":"abort"' in line:
                s.error = "abort"
    return done, usage_tokens


async def closed_loop(
    target: Target,
    *,
    concurrency: int,
    requests: int | None,
    duration: float | None,
    warmup: int,
    error_pause: float,
    stop: asyncio.Event,
) -> tuple[list[Sample], float, float]:
    """`concurrency` workers; returns (measured samples, window start, window end).

    Once `stop` is set no worker starts another request; those in flight finish.
    """
    conn = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    async with aiohttp.ClientSession(
        connector=conn, timeout=aiohttp.ClientTimeout(total=None)
    ) as session:
        counter = itertools.count()

        async def work(samples: list[Sample], n: int | None, until: float | None) -> None:
            while True:
                if n is not None and next(counter) >= n:
                    return
                if stop.is_set() or (until is not None and time.perf_counter() >= until):
                    return
                s = await one_request(session, target)
                samples.append(s)
                if s.error is not None and error_pause > 0:
                    await asyncio.sleep(error_pause)

        if warmup:
            await asyncio.gather(*(work([], warmup, None) for _ in range(concurrency)))
        counter = itertools.count()
        samples: list[Sample] = []
        t0 = time.perf_counter()
        until = t0 + duration if duration is not None else None
        await asyncio.gather(*(work(samples, requests, until) for _ in range(concurrency)))
        return samples, t0, time.perf_counter()


async def open_loop(
    target: Target, rate: float, duration: float, stop: asyncio.Event
) -> tuple[list[Sample], float, float]:
    """Poisson arrivals at `rate`/s for `duration` s (or until `stop`); waits for them all."""
    conn = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    async with aiohttp.ClientSession(connector=conn) as session:
        rng = random.Random(0)
        tasks: list[asyncio.Task[Sample]] = []
        t0 = time.perf_counter()
        at = t0
        while True:
            at += rng.expovariate(rate)
            if at >= t0 + duration or stop.is_set():
                break
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            tasks.append(asyncio.create_task(one_request(session, target)))
        samples = list(await asyncio.gather(*tasks))
        return samples, t0, time.perf_counter()


def summarize(samples: Sequence[Sample], t0: float, t1: float) -> dict[str, Any]:
    """Counts, rates and latency percentiles (ms) of successful requests."""
    ok = [s for s in samples if s.error is None]
    wall = max(t1 - t0, 1e-9)
    return {
        "requests": len(samples),
        "ok": len(ok),
        "failed": len(samples) - len(ok),
        "errors": dict(Counter(s.error for s in samples if s.error is not None)),
        "wall_s": round(wall, 3),
        "req_per_s": round(len(ok) / wall, 2),
        "tokens_per_s": round(sum(s.tokens for s in ok) / wall, 1),
        "ttft_ms": percentiles([s.ttft * 1e3 for s in ok if s.ttft is not None]),
        "itl_ms": percentiles([g * 1e3 for s in ok for g in s.gaps]),
        "e2e_ms": percentiles([(s.end - s.start) * 1e3 for s in ok]),
    }


def raw_samples(samples: Sequence[Sample]) -> dict[str, list[float]]:
    """Successful requests' TTFT, ITL and e2e in ms, for pooling and plots."""
    ok = [s for s in samples if s.error is None]
    return {
        "ttft_ms": [round(s.ttft * 1e3, 3) for s in ok if s.ttft is not None],
        "itl_ms": [round(g * 1e3, 3) for s in ok for g in s.gaps],
        "e2e_ms": [round((s.end - s.start) * 1e3, 3) for s in ok],
    }


def records(samples: Sequence[Sample]) -> list[list[Any]]:
    """[start, end, ttft_ms or None, tokens, error or None] per request, monotonic seconds."""
    return [
        [
            round(s.start, 6),
            round(s.end, 6),
            None if s.ttft is None else round(s.ttft * 1e3, 3),
            s.tokens,
            s.error,
        ]
        for s in samples
    ]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True, help="base URL of the proxy or decode instance")
    p.add_argument("--prefill-url", help="two-leg baseline: send the prefill leg here first")
    p.add_argument("--model", default="standin-model")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument(
        "--prompt-chars",
        type=int,
        help="the prompt repeated up to this many characters (an argv string is <= 128 KiB)",
    )
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--ignore-eos", action="store_true", help="vLLM: always max_tokens tokens")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--requests", type=int, help="measured requests (closed loop)")
    p.add_argument("--duration", type=float, help="seconds of load")
    p.add_argument("--rate", type=float, help="open loop: requests per second (Poisson)")
    p.add_argument("--warmup", type=int, help="unmeasured requests first (default: concurrency)")
    p.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    p.add_argument(
        "--error-pause", type=float, default=0.05, help="a worker's pause after a failure, s"
    )
    p.add_argument("--label", default="", help="copied into the output")
    p.add_argument("--samples", action="store_true", help="include raw latency samples")
    p.add_argument("--records", action="store_true", help="include per-request records")
    args = p.parse_args(argv)
    if args.rate is not None and args.duration is None:
        p.error("--rate needs --duration")
    if args.rate is None and (args.requests is None) == (args.duration is None):
        p.error("give exactly one of --requests and --duration")
    return args


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    target = Target(
        url=args.url.rstrip("/"),
        prefill_url=args.prefill_url.rstrip("/") if args.prefill_url else None,
        model=args.model,
        prompt=long_prompt(args.prompt, args.prompt_chars) if args.prompt_chars else args.prompt,
        max_tokens=args.max_tokens,
        timeout=args.timeout,
        ignore_eos=args.ignore_eos,
    )
    # SIGTERM/SIGINT: stop sending, let the requests in flight finish, report.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.rate is not None:
        samples, t0, t1 = await open_loop(target, args.rate, args.duration, stop)
    else:
        warmup = args.concurrency if args.warmup is None else args.warmup
        samples, t0, t1 = await closed_loop(
            target,
            concurrency=args.concurrency,
            requests=args.requests,
            duration=args.duration,
            warmup=warmup,
            error_pause=args.error_pause,
            stop=stop,
        )
    out: dict[str, Any] = {
        "label": args.label,
        "url": target.url,
        "prefill_url": target.prefill_url,
        "concurrency": None if args.rate is not None else args.concurrency,
        "rate": args.rate,
        "max_tokens": args.max_tokens,
        "prompt_chars": len(target.prompt),
        "t0": round(t0, 6),
        "t1": round(t1, 6),
        **summarize(samples, t0, t1),
    }
    if args.samples:
        out["samples"] = raw_samples(samples)
    if args.records:
        out["records"] = records(samples)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = asyncio.run(amain(args))
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
