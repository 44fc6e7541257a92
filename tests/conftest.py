"""Session-wide checks: every process a test started is gone at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.harness.common import SHORT_BASE_ENV, processes_with_env

#: Every process the test session starts inherits this variable, so survivors can be
#: found by it (children, grandchildren and reparented orphans alike).
MARKER = "DISAGGD_TEST_SESSION"


@pytest.fixture(scope="session", autouse=True)
def no_survivors() -> Iterator[None]:
    """Fail the session if a process started by a test outlives it."""
    token = uuid.uuid4().hex
    os.environ[MARKER] = token
    short = tempfile.mkdtemp(prefix="dd-")
    os.environ[SHORT_BASE_ENV] = short
    yield
    shutil.rmtree(short, ignore_errors=True)
    deadline = time.monotonic() + 10
    left = processes_with_env(MARKER, token)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = processes_with_env(MARKER, token)
    if left:
        details = []
        for pid in left:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
                details.append(f"{pid}: {cmdline}")
            except OSError:
                details.append(str(pid))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # our own survivors, by pid
        pytest.fail("processes left behind by the tests:\n" + "\n".join(details))
