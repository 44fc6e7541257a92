"""Proxy tests: each test starts from clean stand-ins (no recorded requests, no faults)."""

from __future__ import annotations

import pytest

from tests.harness.proxy import Cluster


@pytest.fixture(autouse=True)
async def _clean_clusters(request: pytest.FixtureRequest) -> None:
    """Clear the stand-ins of every cluster fixture the test uses, before it runs."""
    for name in ("cluster", "p2p", "storage"):
        if name in request.fixturenames:
            c: Cluster = request.getfixturevalue(name)
            await c.clear()
            await c.reset_faults()
