"""The wheel users install carries the daemon, and nothing of the tests or the stand-in."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    argv = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps"]
    argv += ["--no-build-isolation", "-q", "-w", str(out)]
    subprocess.run(argv, check=True, capture_output=True, cwd=out)
    (path,) = out.glob("disaggd-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_holds_every_daemon_module(wheel: zipfile.ZipFile) -> None:
    tree = {p.relative_to(ROOT).as_posix() for p in (ROOT / "disaggd").rglob("*.py")}
    missing = tree - set(wheel.namelist())
    assert not missing, sorted(missing)


def test_wheel_holds_no_test_code_nor_stand_in(wheel: zipfile.ZipFile) -> None:
    code = [n for n in wheel.namelist() if ".dist-info/" not in n]
    assert all(n.startswith("disaggd/") for n in code), code
    for banned in ("standin", "tinymodel", "devtools", "tests/", "bench/", "testing"):
        assert not [n for n in wheel.namelist() if banned in n], banned


def test_wheel_declares_the_command_and_the_vllm_plugin(wheel: zipfile.ZipFile) -> None:
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(name).decode()
    assert "disaggd = disaggd.cli:main" in text
    assert "[vllm.general_plugins]" in text and "disaggd.vllm_plugin:register" in text
