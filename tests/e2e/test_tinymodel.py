"""The tiny model is built locally and deterministically (needs the cpu extra: torch etc.)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm


def digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def test_two_builds_are_byte_identical(tmp_path: Path) -> None:
    for name in ("a", "b"):
        proc = subprocess.run(
            [sys.executable, "-m", "devtools.tinymodel", str(tmp_path / name)],
            capture_output=True,
            text=True,
            timeout=300,
            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},  # no hub, no cache
        )
        assert proc.returncode == 0, proc.stderr
    a, b = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert a == b
    assert "model.safetensors" in a and "tokenizer.json" in a and "config.json" in a
    size = sum(p.stat().st_size for p in (tmp_path / "a").iterdir())
    assert size < 20 * 1024 * 1024  # a few MB


def test_another_seed_gives_other_weights(tmp_path: Path) -> None:
    from devtools.tinymodel import build_tiny_model

    a = build_tiny_model(tmp_path / "s0", seed=0)
    b = build_tiny_model(tmp_path / "s1", seed=1)
    assert digests(a)["model.safetensors"] != digests(b)["model.safetensors"]
    assert digests(a)["tokenizer.json"] == digests(b)["tokenizer.json"]
    # a second call on a complete folder is a no-op
    before = (a / "model.safetensors").stat().st_mtime_ns
    build_tiny_model(tmp_path / "s0", seed=0)
    assert (a / "model.safetensors").stat().st_mtime_ns == before
