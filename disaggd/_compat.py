"""Python 3.10 support in one place: TaskGroup, ExceptionGroup, tomllib."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    from asyncio import TaskGroup
    from builtins import ExceptionGroup

    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib
    from exceptiongroup import ExceptionGroup
    from taskgroup import TaskGroup

__all__ = ["ExceptionGroup", "TaskGroup", "tomllib"]
