"""The command line's own edges: argument checks and a reader that goes away."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from disaggd.cli import EX_SIGPIPE, EX_USAGE, main

ROOT = Path(__file__).resolve().parents[2]


def test_a_negative_line_count_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["logs", "decode-0", "-n", "-3"])
    assert exc.value.code == EX_USAGE
    assert "must be 0 or more, got -3" in capsys.readouterr().err


def test_a_closed_pipe_ends_the_command_quietly() -> None:
    # `disaggd check ... | head -1`: the reader leaves before the output is written.
    proc = subprocess.Popen(
        [sys.executable, "-m", "disaggd", "check", "-c", str(ROOT / "etc" / "disaggd.toml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(30) == EX_SIGPIPE, err
    assert "Traceback" not in err and "BrokenPipe" not in err
