"""The two upstream legs of a request: the prefill leg (with retries) and the decode leg.

Each leg holds what it acquires in the function that acquires it: a prefill
attempt holds its prefill (`Router.hold`) and its connection for one call; the
decode leg is an async context manager that owns the decode's connection while
the reply reads it. Every failure goes through the one table in
`disaggd.proxy.failures`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp

from disaggd.observe.tracing import LegSpan
from disaggd.proxy.clients import Upstreams, client_timeout, done_with
from disaggd.proxy.errors import Passthrough, gateway_timeout
from disaggd.proxy.failures import Failures, Fault, Leg, Rule, fault_of, status_fault
from disaggd.proxy.prefiller import Prefillers
from disaggd.proxy.record import Accounting, Record
from disaggd.proxy.router import Router
from disaggd.proxy.upstream import Lease, Upstream
from disaggd.topology import Role


def first_finish(result: Mapping[str, Any]) -> Any:
    """The ``finish_reason`` of a result's first choice, or None."""
    choices = result.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
        return choices[0].get("finish_reason")
    return None


def _prefill_result(data: bytes) -> dict[str, Any] | None:
    """A prefill's parsed result, or None when it is not one another prefill could beat."""
    try:
        result = json.loads(data)
    except ValueError:
        return None
    if not isinstance(result, dict) or not isinstance(result.get("choices"), list):
        return None
    # abort / error: the engine gave up on it (shutting down, internal error): another may not.
    if first_finish(result) in (None, "abort", "error"):
        return None
    return result


class Legs:
    """Sends legs to upstreams; shared by every request of one proxy."""

    def __init__(
        self,
        router: Router,
        upstreams: Upstreams,
        accounting: Accounting,
        failures: Failures,
        prefillers: Prefillers,
    ) -> None:
        self._router = router
        self._up = upstreams
        self._acct = accounting
        self._failures = failures
        self._prefillers = prefillers

    def _abandoned(self) -> bool:
        """Whether the current task was cancelled because its upstream stalled
        (`Router.abandon`): then the cancel is taken back and the leg fails over."""
        task = asyncio.current_task()
        if task is None or task not in self._router.health.abandoned:
            return False
        self._router.health.abandoned.discard(task)
        if sys.version_info >= (3, 11):
            task.uncancel()
        return True

    def attempt(self, rec: Record, prefill: Upstream | None, decode: Upstream) -> None:
        """Start an attempt: the id both its legs carry (the connector's `request_id`)."""
        rec.rid = rec.s.handoff.request_id(
            rec.base_rid, rec.retries, rec.client_rid, prefill, decode
        )

    def _headers(self, rec: Record, span: LegSpan) -> dict[str, str]:
        # Built from scratch: no client header (hop-by-hop or other) reaches an engine,
        # except the trace context, with this leg's own span as the engine's parent.
        h = {
            "Content-Type": "application/json",
            "X-Request-Id": rec.rid,
            "traceparent": span.traceparent,
        }
        if rec.auth is not None:
            h["Authorization"] = rec.auth
        if rec.trace.state is not None:
            h["tracestate"] = rec.trace.state
        return h

    async def prefill(self, rec: Record, decode: Upstream) -> dict[str, Any] | None:
        """Run the prefill leg, trying every ready prefill in turn (only the one
        llm-d's ``x-prefiller-host-port`` names, when it does: `Prefillers.take`).

        Returns:
            The prefill's result (``rec.rid`` is the id it ran under), or None
            when no prefill is left.

        Raises:
            HTTPError: the prefill's own 4xx (passed through), or 504 at the deadline.
        """
        body = rec.s.handoff.prefill_body(rec.req)
        tried: list[str] = []
        while True:
            up = await self._prefillers.take(rec, tried)
            if up is None:
                return None
            if tried:
                self._acct.retry(rec, "prefill")
            self.attempt(rec, up, decode)
            rec.prefill = up.name
            result = await self._prefill_once(rec, up, body)
            if result is not None:
                rec.error = None  # an earlier attempt's failure was recovered from
                return result
            tried.append(up.name)

    async def _prefill_once(self, rec: Record, up: Upstream, body: bytes) -> dict[str, Any] | None:
        """One prefill attempt: its result, or None when another prefill should be tried."""
        remaining = rec.remaining()
        if remaining <= 0:
            raise gateway_timeout()
        total = min(rec.s.proxy.prefill_timeout, remaining)
        router = self._router
        with router.hold(up), rec.trace.leg("prefill", up.name) as span:
            t = time.monotonic()
            resp: aiohttp.ClientResponse | None = None
            router.health.sent(up)
            try:
                resp = await self._up.session(up).post(
                    self._up.url(up, rec.route),
                    data=body,
                    headers=self._headers(rec, span),
                    timeout=client_timeout(total, rec.s.connect_timeout),
                )
                span.status = resp.status
                data = await resp.read()
            except (asyncio.TimeoutError, aiohttp.ClientError, asyncio.CancelledError) as exc:
                self._prefill_failed(rec, up, exc, total >= remaining)
                return None
            finally:
                router.health.answered(up)
                if resp is not None:
                    done_with(resp)
                self._acct.prefill_leg(rec, up.name, time.monotonic() - t)
        return self._judge_prefill(rec, up, resp, data)

    def _prefill_failed(self, rec: Record, up: Upstream, exc: BaseException, last: bool) -> None:
        """A prefill attempt raised `exc`: count it, and raise unless another may be tried.

        `last`: the leg's timeout was the request's own deadline.
        """
        if isinstance(exc, asyncio.CancelledError):
            if rec.disconnected or not self._abandoned():
                raise exc
            # Its instance stalled (no answer to anything): another prefill takes it.
            exc = asyncio.TimeoutError(f"{up.name} stalled")
        fault = fault_of(exc)
        if fault is Fault.TIMEOUT and last:
            fault = Fault.DEADLINE  # the request's own deadline, not the leg's
        rule = self._failures.fail(rec, Leg.PREFILL, fault, up.name, exc)
        if rule.status is not None:
            raise rule.error(up.name, exc) from None

    def _judge_prefill(
        self, rec: Record, up: Upstream, resp: aiohttp.ClientResponse, data: bytes
    ) -> dict[str, Any] | None:
        status = resp.status
        if status < 500:
            self._router.health.succeeded(up)  # it answers: a 4xx is the request's fault
        if status != 200:
            rule = self._failures.fail(
                rec, Leg.PREFILL, status_fault(status), up.name, status=status
            )
            if not rule.retry:
                # The request itself is wrong (too long, bad field): the same everywhere.
                ctype = resp.headers.get("Content-Type", "application/json")
                raise Passthrough(status, data, ctype.encode("latin-1"))
            return None
        result = _prefill_result(data)
        if result is None:
            self._failures.fail(rec, Leg.PREFILL, Fault.BAD_RESPONSE, up.name)
        return result

    @contextlib.asynccontextmanager
    async def decode(
        self, rec: Record, held: Lease, params: Mapping[str, Any] | None
    ) -> AsyncIterator[tuple[Upstream, aiohttp.ClientResponse]]:
        """The decode leg: ``async with legs.decode(...) as (up, resp)`` gives the decode's
        response (headers read, body not) and closes its connection at the end.

        A decode that cannot be connected to never saw the request: it is sent to
        another ready decode (`held` moves to it), unless the request is pinned to
        this one (`StorageHandoff.pins_decode` after a prefill). A decode that
        stopped being ready during the prefill leg is replaced the same way.

        Raises:
            HTTPError: 502 (unreachable, broken), 504 at the deadline.
        """
        body = rec.s.handoff.decode_body(rec.raw, rec.req, params)
        pinned = rec.decision == "disaggregated" and rec.s.handoff.pins_decode
        if not pinned and (not held.up.ready or held.up.draining):
            other = self._router.pick(Role.DECODE)
            if other is not None:
                held.move(other)
        tried: list[str] = []
        while True:
            up = held.up
            rec.decode = up.name
            with rec.trace.leg("decode", up.name) as span:
                resp = await self._open_decode(rec, up, body, pinned, tried, span=span)
                if isinstance(resp, Upstream):
                    held.move(resp)
                    self._acct.retry(rec, "decode")
                    self.attempt(rec, None, resp)
                    continue
                span.status = resp.status
                try:
                    yield up, resp
                finally:
                    done_with(resp)
                return

    async def _open_decode(
        self,
        rec: Record,
        up: Upstream,
        body: bytes,
        pinned: bool,
        tried: list[str],
        *,
        span: LegSpan,
    ) -> aiohttp.ClientResponse | Upstream:
        """Send the decode leg to `up`: its response, or the next decode to try
        when `up` could not be connected to (`up` is appended to `tried`)."""
        remaining = rec.remaining()
        if remaining <= 0:
            raise gateway_timeout()
        router = self._router
        router.health.sent(up)
        try:
            resp = await self._up.session(up).post(
                self._up.url(up, rec.route),
                data=body,
                headers=self._headers(rec, span),
                timeout=client_timeout(remaining, rec.s.connect_timeout),
            )
        except asyncio.CancelledError:
            if rec.disconnected or not self._abandoned():
                raise
            # Its instance stalled before answering: like a connect failure, it fails over.
            exc: BaseException = aiohttp.ServerTimeoutError(f"{up.name} stalled")
            rule = self._failures.fail(rec, Leg.DECODE, Fault.CONNECT, up.name, exc)
            return self._next_decode(up, exc, rule, pinned, tried)
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            # A timeout's total is the request's remaining time: the deadline.
            rule = self._failures.fail(rec, Leg.DECODE, fault_of(exc), up.name, exc)
            return self._next_decode(up, exc, rule, pinned, tried)
        finally:
            router.health.answered(up)
        if resp.status < 500:
            router.health.succeeded(up)
        return resp

    def _next_decode(
        self, up: Upstream, exc: BaseException, rule: Rule, pinned: bool, tried: list[str]
    ) -> Upstream:
        """The decode to try after `up` failed with `exc` (`rule`); raises its error when none."""
        tried.append(up.name)
        nxt = self._router.pick(Role.DECODE, tried) if rule.retry and not pinned else None
        if nxt is None:
            raise rule.error(up.name, exc) from None
        return nxt
