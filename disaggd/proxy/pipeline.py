"""The request path: gate → decide → prefill leg → decode leg → reply → account.

`Pipeline.serve` is the ASGI handler of ``POST /v1/completions`` and ``POST
/v1/chat/completions``, and the one place that maps every exception to a
response (after aiohttp's web_protocol.py). `Pipeline._flow` is the path itself:

1. gate (`_gate`): draining → 503; API key → 401; body size → 413; JSON and
   field types → 400;
2. decide (`decide`): pick a decode (none ready → 503); disaggregated, or
   ``decode_only`` (short prompt; a batch the connector cannot hand off);
3. prefill leg (`Legs.prefill`): the request shaped to only prefill, retried on
   other prefills; none left → the ``prefill_fallback`` policy (``fallback``: the
   decode prefills itself, or 503). A prefill that stopped on its one token
   answers the client itself (``prefill_only``);
4. decode leg (`Legs.decode`): the client's own body plus what the connector
   needs (`disaggd.proxy.handoff`);
5. reply (`Replies.forward`): passed through whole, or streamed as it comes;
6. account (`Accounting.done`): metrics, one ``request_done`` line.

A client that goes away cancels the request: both legs' connections are
closed. The whole request has a deadline (``request_timeout``): past it the
client gets 504 and the upstream connection is closed.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Mapping
from typing import Any

from disaggd.observe.logs import get_logger
from disaggd.observe.tracing import Tracer
from disaggd.proxy.admission import Admission
from disaggd.proxy.errors import HTTPError, body_timeout, too_large, unavailable, unencodable
from disaggd.proxy.legs import Legs, first_finish
from disaggd.proxy.prefiller import Prefillers
from disaggd.proxy.prefix import BLOCK_CHARS, route_key
from disaggd.proxy.record import Accounting, Decision, Record, Send
from disaggd.proxy.reply import Replies
from disaggd.proxy.request import (
    CHAT,
    Head,
    Receive,
    Scope,
    answers_from_prefill,
    check_auth,
    is_batch,
    parse_request,
    prompt_chars,
    read_body,
)
from disaggd.proxy.router import Router
from disaggd.proxy.settings import Live
from disaggd.proxy.upstream import Upstream
from disaggd.topology import Role

#: Status recorded for a request whose client went away first (nginx's convention).
CLIENT_CLOSED = 499

#: Bodies larger than this (bytes) are JSON-decoded in a worker thread.
PARSE_OFF_LOOP_BYTES = 256 * 1024

log = get_logger("disaggd.proxy")


def decide(rec: Record) -> tuple[Decision, str]:
    """The decision and its reason, taken once the decode is chosen.

    ``decode_only`` when the chosen decode is known (prefix index) to hold all but
    fewer than ``decode_only_uncached_below_chars`` characters of the prompt
    (``cached``: llm-d's prefix-based decider), else for a prompt under
    ``decode_only_below_chars`` (``short``), or a batch the connector cannot hand
    off in one piece (``batch``); otherwise ``disaggregated`` (``uncached``, or
    ``header``: llm-d's ``x-prefiller-host-port`` named the prefill).
    """
    splits = rec.s.handoff.splits_batches
    if rec.prefiller is not None and (splits or not is_batch(rec.route, rec.req)):
        return "disaggregated", "header"
    p = rec.s.proxy
    uncached_below, below = p.decode_only_uncached_below_chars, p.decode_only_below_chars
    chars = prompt_chars(rec.route, rec.req) if uncached_below or below else 0
    held = rec.key.matched.get(Role.DECODE) if rec.key is not None else None
    if uncached_below and held is not None and chars - held * BLOCK_CHARS < uncached_below:
        return "decode_only", "cached"
    if below and chars < below:
        return "decode_only", "short"
    if not splits and is_batch(rec.route, rec.req):
        return "decode_only", "batch"
    return "disaggregated", "uncached"


def _end_trace(rec: Record) -> None:
    """End the request's span (`disaggd.observe.tracing`) with what the request became."""
    if not rec.trace.recording:
        return
    attrs = {
        "request_id": rec.rid,
        "decision": rec.decision,
        "prefill": rec.prefill,
        "decode": rec.decode,
        "retries": rec.retries,
    }
    rec.trace.end(rec.status, rec.error, rec.ttft, attrs)


class Pipeline:
    """Serves inference requests: one `serve` call per request."""

    def __init__(
        self,
        live: Live,
        router: Router,
        legs: Legs,
        replies: Replies,
        accounting: Accounting,
        *,
        admission: Admission,
        prefillers: Prefillers,
        tracer: Tracer,
    ) -> None:
        self._live = live
        self._router = router
        self._legs = legs
        self._replies = replies
        self._acct = accounting
        self._admission = admission
        self._prefillers = prefillers
        self._tracer = tracer

    async def serve(self, scope: Scope, receive: Receive, send: Send, route: str) -> None:
        """Serve one request on `route`; never raises except on the server's own cancel."""
        live = self._live
        rec = Record(route, time.monotonic(), live.settings, send)
        live.enter()
        task = asyncio.current_task()
        watcher: asyncio.Task[None] | None = None
        try:
            try:
                if await self._gate(rec, scope, receive):
                    assert task is not None
                    watcher = asyncio.get_running_loop().create_task(
                        self._watch_disconnect(receive, task, rec)
                    )
                    await self._flow(rec)
            except (HTTPError, RecursionError, UnicodeError) as exc:
                if rec.started:  # pragma: no cover - past the first byte errors are in-band
                    raise
                # RecursionError: JSON nested past the interpreter's limit; UnicodeError: a
                # lone UTF-16 surrogate ("\ud800") that cannot be encoded again.
                err = exc if isinstance(exc, HTTPError) else unencodable(exc)
                await self._replies.error(rec, err)
        except asyncio.CancelledError:
            if not rec.disconnected:
                raise
            # We cancelled ourselves because the client left; the legs' connections are
            # closed by now (aiohttp closes a connection whose request is cancelled).
            if sys.version_info >= (3, 11) and task is not None:
                task.uncancel()
            rec.status = CLIENT_CLOSED
            rec.error = "client_disconnected"
        except Exception as exc:  # a bug: still answer, never hang
            log.exception("proxy_bug", request_id=rec.rid)
            rec.error = f"internal: {exc!r}"
            if not rec.started:
                await self._replies.error(
                    rec, HTTPError(500, "internal proxy error", "server_error")
                )
            else:
                rec.status = 500
        finally:
            if watcher is not None:
                watcher.cancel()
            live.leave()
            self._acct.done(rec)
            _end_trace(rec)

    async def _flow(self, rec: Record) -> None:
        """decide → prefill leg → decode leg → reply; the decode is held throughout."""
        decode = await self._admission.take(rec, Role.DECODE)
        assert decode is not None
        with self._router.hold(decode) as held:
            rec.decision, rec.reason = decide(rec)  # what a prefill's 4xx or a 504 is counted as
            params: dict[str, Any] | None = None
            if rec.decision == "disaggregated":
                result = await self._legs.prefill(rec, held.up)
                rec.decision, params = self._after_prefill(rec, result, held.up)
                if rec.decision == "none":
                    raise unavailable("no prefill instance is ready")
                if rec.decision == "prefill_only":
                    assert result is not None
                    await self._replies.from_prefill(rec, result)
                    return
            async with self._legs.decode(rec, held, params) as (up, resp):
                await self._replies.forward(rec, resp, up)

    def _after_prefill(
        self, rec: Record, result: Mapping[str, Any] | None, decode: Upstream
    ) -> tuple[Decision, dict[str, Any] | None]:
        """What the prefill leg's outcome makes of the request, and the decode's
        ``kv_transfer_params``."""
        if result is None:  # no prefill left
            if rec.s.proxy.prefill_fallback == "fail":
                return "none", None
            rec.error = rec.error or "no_prefill"
            self._legs.attempt(rec, None, decode)
            return "fallback", None
        usage = result.get("usage")
        if isinstance(usage, Mapping) and isinstance(usage.get("prompt_tokens"), int):
            rec.prompt_tokens = usage["prompt_tokens"]
        if answers_from_prefill(rec.req, first_finish(result)):
            return "prefill_only", None
        params, loadable = rec.s.handoff.decode_params(result)
        if not loadable:
            # Stopped early, or too short for one full block: nothing to load, the
            # decode computes the prompt itself.
            rec.error = "no_kv_transfer_params"
            return "fallback", None
        return "disaggregated", params

    async def _gate(self, rec: Record, scope: Scope, receive: Receive) -> bool:
        """Admit a request and read it; False when the client left while sending it.

        Raises:
            HTTPError: 405 (not POST), 503 (draining), 401, 413, 400.
        """
        head = Head(scope)
        rec.identify(head.client_rid)
        rec.trace = self._tracer.start(head.traceparent, head.tracestate, rec.route, rec.t0)
        s = rec.s
        if head.method != "POST":
            raise HTTPError(
                405,
                f"method {head.method} is not allowed here; use POST",
                "invalid_request_error",
                headers=[(b"allow", b"POST")],
            )
        if not self._live.accepting:
            raise HTTPError(
                503,
                "the server is shutting down",
                "service_unavailable_error",
                retry_after=True,
                headers=[(b"connection", b"close")],
            )
        if s.auth_required:
            check_auth(head.auth, s.api_key)
        rec.prefiller = self._prefillers.resolve(head.prefiller, s.proxy.allow_prefiller_header)
        limit = s.proxy.max_body_bytes
        if head.length is not None and head.length > limit:
            raise too_large(limit)
        if s.proxy.forward_authorization:
            rec.auth = head.auth
        try:
            raw = await asyncio.wait_for(read_body(receive, limit), s.proxy.body_timeout)
        except asyncio.TimeoutError:
            raise body_timeout(s.proxy.body_timeout) from None
        if raw is None:
            rec.disconnected = True
            rec.status = CLIENT_CLOSED
            rec.error = "client_disconnected"
            return False
        rec.raw = raw
        if len(raw) > PARSE_OFF_LOOP_BYTES:
            # A body this big takes milliseconds to decode: a worker thread does it, so
            # that the loop (supervision's probes, /livez) runs meanwhile.
            rec.req = await asyncio.to_thread(parse_request, rec.route, raw)
        else:
            rec.req = parse_request(rec.route, raw)
        rec.stream = rec.req.get("stream") is True
        rec.key = route_key(rec.route == CHAT, rec.req, scope["headers"], self._router.cache)
        return True

    @staticmethod
    async def _watch_disconnect(receive: Receive, task: asyncio.Task[Any], rec: Record) -> None:
        """Cancel the request's task when its client goes away (Hypercorn only tells `receive`)."""
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                if not rec.sending_last:
                    rec.disconnected = True
                    task.cancel()
                return
