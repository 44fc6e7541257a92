"""Issue 12's stand-in acceptance: under eviction pressure (each prefill's prefix cache holds
about half the distinct prefixes), cache_aware's hit rate is at least 1.5x least_outstanding's,
through `disaggd run` (bench/prefix.py, a smaller workload)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import prefix


def test_cache_aware_hit_rate_beats_least_outstanding(tmp_path: Path) -> None:
    out = tmp_path / "prefix.json"
    rc = prefix.main(["--prefixes", "24", "--uses", "4", "--out", str(out)])
    report = json.loads(out.read_text())
    lo, ca = report["results"]
    assert (lo["policy"], ca["policy"]) == ("least_outstanding", "cache_aware")
    assert rc == 0 and ca["hit_rate"] >= prefix.TARGET_RATIO * lo["hit_rate"], report
    assert ca["computed_tokens"] < lo["computed_tokens"]
    assert lo["kv_hit"] == ca["kv_hit"] == ca["requests"]  # every request's KV still moved
