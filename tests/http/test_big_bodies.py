"""Big request bodies do not block the loop: 3 x 7 MB in parallel keep the event-loop
lag (the daemon's ``disaggd_event_loop_lag_seconds``) and /livez under 100 ms."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import aiohttp
import pytest

from disaggd.observe.looplag import LoopLag
from tests.harness.proxy import MODEL, Cluster, serve_proxy, standin_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from standin_cluster(tmp_path_factory, "bigbodies", prefill=1, decode=1)


async def test_three_7mb_bodies_keep_the_loop_responsive(cluster: Cluster) -> None:
    # Many small strings: the decoder builds millions of objects (the slow kind of big).
    prompt = [f"word {i}" for i in range(600_000)]
    body = json.dumps(
        {
            "model": MODEL,
            "prompt": [prompt[0]],
            "max_tokens": 1,
            "logit_bias": {},
            "user": "x",
            "pad": prompt,
        }
    ).encode()
    assert len(body) > 7_000_000
    async with serve_proxy(cluster.topology()) as px, aiohttp.ClientSession() as s:
        lag = LoopLag(px.metrics)
        sampler = asyncio.create_task(lag.run(interval=0.01))
        worst_livez = 0.0

        async def probe() -> None:
            nonlocal worst_livez
            while True:
                t = time.monotonic()
                async with s.get(px.base + "/livez") as r:
                    assert r.status == 200
                worst_livez = max(worst_livez, time.monotonic() - t)
                await asyncio.sleep(0.02)

        async def big() -> int:
            async with s.post(
                px.base + "/v1/completions",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as r:
                await r.read()
                return r.status

        prober = asyncio.create_task(probe())
        try:
            statuses = await asyncio.gather(big(), big(), big())
        finally:
            prober.cancel()
            sampler.cancel()
        print(f"big bodies: loop lag {lag.worst * 1000:.1f} ms, /livez {worst_livez * 1000:.1f} ms")
        assert all(st < 500 for st in statuses), statuses
        assert px.metric("disaggd_event_loop_lag_seconds") < 0.1
