"""vLLM general plugin shipped with disaggd: tames NIXL's idle progress thread.

vLLM loads every entry point of the ``vllm.general_plugins`` group in each of its
processes (API server, EngineCore, workers) before any KV connector is built. disaggd
registers :func:`register` there (see ``pyproject.toml``)::

    [project.entry-points."vllm.general_plugins"]
    disaggd_nixl = "disaggd.vllm_plugin:register"

The problem it fixes: NIXL's Python API (``nixl_agent``, nixl 1.5.x) creates its agent
with ``pthrDelay = 0``. The UCX backend's shared progress thread then calls
``poll(fds, timeout=0)`` in a loop and burns a whole core per vLLM instance even when
no transfer is in flight. The delay is only the *fallback* wake-up period of that
``poll()``: transfer and notification events wake the thread through its event fds
anyway, so a delay of a millisecond keeps transfers prompt.

What it does: nothing, unless the environment variable
:data:`ENV_NIXL_PROGRESS_DELAY_US` is set to a positive integer (microseconds; NIXL
rounds it up to whole milliseconds). Then it installs an import hook that, when NIXL's
agent API module (``nixl._api`` or the ``nixl_cu12._api`` / ``nixl_cu13._api``
backend it re-exports) is first imported, wraps that module's reference to the native
``nixlAgent`` constructor so that an agent created with a progress thread gets at
least that delay. Nothing is imported eagerly: processes that never use NIXL pay only
for one entry in ``sys.meta_path``. disaggd sets the variable only for instances that
use ``NixlConnector``.

This module imports neither vllm nor nixl nor torch.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

__all__ = ["ENV_NIXL_PROGRESS_DELAY_US", "register"]

#: Progress-thread fallback wake-up period for NIXL agents, in microseconds.
from disaggd.topology.connectors import NIXL_PROGRESS_DELAY_ENV as ENV_NIXL_PROGRESS_DELAY_US

# A child of vLLM's "vllm" logger, so that lines go through vLLM's handler and
# format (prefix "(Worker pid=N)", level, file:line) like the rest of its log.
logger = logging.getLogger("vllm.disaggd_plugin")


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group; safe to call repeatedly.

    Reads :data:`ENV_NIXL_PROGRESS_DELAY_US`; unset, empty or ``0`` means "leave NIXL
    alone". An invalid value is logged as a warning and ignored (a plugin must never
    stop vLLM from starting).
    """
    raw = os.environ.get(ENV_NIXL_PROGRESS_DELAY_US, "").strip()
    if not raw:
        return
    try:
        delay_us = int(raw)
    except ValueError:
        delay_us = -1
    if delay_us < 0:
        logger.warning(
            "disaggd: ignoring %s=%r (want a non-negative integer, microseconds)",
            ENV_NIXL_PROGRESS_DELAY_US,
            raw,
        )
        return
    if delay_us == 0:
        return
    install_nixl_progress_delay(delay_us)


def install_nixl_progress_delay(delay_us: int) -> None:
    """Make NIXL agents created from now on in this process use ``pthrDelay >= delay_us``.

    Patches an already imported NIXL agent API module at once, and installs an import
    hook for one imported later. Idempotent; a second call with another value changes
    the delay used by later agents.
    """
    for finder in sys.meta_path:
        if isinstance(finder, _NixlApiFinder):
            finder.delay_us = delay_us
            break
    else:
        sys.meta_path.insert(0, _NixlApiFinder(delay_us))
    for name, module in list(sys.modules.items()):
        if _is_nixl_api_name(name) and module is not None:
            _patch_api_module(module, delay_us)


def _is_nixl_api_name(fullname: str) -> bool:
    """``nixl._api``, ``nixl_cu12._api``, ``nixl_cu13._api``, ``nixl_rocm._api``, ..."""
    top, _, rest = fullname.partition(".")
    return rest == "_api" and (top == "nixl" or top.startswith("nixl_"))


class _BindingsShim:
    """Stands in for the native bindings module inside NIXL's ``_api`` module only.

    Everything is forwarded to the real bindings, except ``nixlAgent``, whose config
    gets the delay before the native agent (and its progress thread) is created.
    """

    def __init__(self, real: Any, delay_us: int) -> None:
        self._disaggd_real = real
        self._disaggd_delay_us = delay_us

    def __getattr__(self, name: str) -> Any:
        return getattr(self._disaggd_real, name)

    def nixlAgent(self, name: str, config: Any, *args: Any, **kwargs: Any) -> Any:
        delay_us = self._disaggd_delay_us
        if getattr(config, "useProgThread", False) and int(config.pthrDelay) < delay_us:
            logger.info(
                "disaggd: NIXL agent %s: progress thread delay %d -> %d us",
                name,
                int(config.pthrDelay),
                delay_us,
            )
            config.pthrDelay = delay_us
        return self._disaggd_real.nixlAgent(name, config, *args, **kwargs)


def _patch_api_module(module: ModuleType, delay_us: int) -> bool:
    """Swap ``module.nixlBind`` for a :class:`_BindingsShim`. Returns whether patched."""
    if not hasattr(module, "nixl_agent"):
        return False  # not the agent API (another nixl_* package's _api)
    bindings = getattr(module, "nixlBind", None)
    if isinstance(bindings, _BindingsShim):
        bindings._disaggd_delay_us = delay_us
        return True
    if bindings is None or not hasattr(bindings, "nixlAgent"):
        logger.warning(
            "disaggd: %s has no nixlBind.nixlAgent; this NIXL version is not supported, "
            "%s has no effect",
            module.__name__,
            ENV_NIXL_PROGRESS_DELAY_US,
        )
        return False
    module.nixlBind = _BindingsShim(bindings, delay_us)  # type: ignore[attr-defined]
    logger.debug("disaggd: patched %s (progress delay %d us)", module.__name__, delay_us)
    return True


class _PatchingLoader(importlib.abc.Loader):
    """Delegates to the real loader, then patches the freshly executed module."""

    def __init__(self, inner: importlib.abc.Loader, delay_us: int) -> None:
        self._inner = inner
        self._delay_us = delay_us

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        _patch_api_module(module, self._delay_us)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, get_resource_reader...
        return getattr(self._inner, name)


class _NixlApiFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the other finders, then wraps the loader of NIXL's API."""

    def __init__(self, delay_us: int) -> None:
        self.delay_us = delay_us

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if not _is_nixl_api_name(fullname):
            return None
        for finder in sys.meta_path:
            if isinstance(finder, _NixlApiFinder):
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec: importlib.machinery.ModuleSpec | None = find_spec(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _PatchingLoader(spec.loader, self.delay_us)
            return spec
        return None
