"""The reply to the client: headers, whole bodies, errors, and the decode's stream.

Errors before the first byte reach the client as HTTP errors with an OpenAI
error body; after it, as an SSE ``data: {"error": ...}`` event followed by
``data: [DONE]`` (what vLLM itself does).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp

from disaggd.proxy.endings import answer_aborted, last_chunk
from disaggd.proxy.errors import (
    DONE,
    JSON_CT,
    HTTPError,
    Passthrough,
    dumps,
    error_body,
    stream_error_event,
)
from disaggd.proxy.failures import Failures, Fault, Leg, fault_of, status_fault
from disaggd.proxy.kvcheck import usage_from
from disaggd.proxy.record import Accounting, Record
from disaggd.proxy.request import include_usage
from disaggd.proxy.sse import SSE_CT, event_end, synthesize_stream
from disaggd.proxy.upstream import Upstream

#: Bytes of an unterminated SSE event held back before giving up on framing.
MAX_PENDING = 1 << 20

_SYNTH_CT = b"text/event-stream; charset=utf-8"


class Replies:
    """Writes replies for every request of one proxy."""

    def __init__(self, accounting: Accounting, failures: Failures) -> None:
        self._acct = accounting
        self._failures = failures

    async def start(
        self,
        rec: Record,
        status: int,
        ctype: bytes,
        length: int | None,
        extra: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        """Send the response head (``X-Request-Id``: the current attempt's id)."""
        headers = [(b"content-type", ctype), (b"x-request-id", rec.rid.encode("latin-1"))]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        else:
            headers.append((b"cache-control", b"no-cache"))
        headers.extend(extra)
        rec.status = status
        rec.started = True
        await rec.send({"type": "http.response.start", "status": status, "headers": headers})

    async def whole(
        self,
        rec: Record,
        status: int,
        body: bytes,
        ctype: bytes,
        extra: Iterable[tuple[bytes, bytes]] = (),
        *,
        length: bool = True,
    ) -> None:
        """Send a whole response (with ``Content-Length`` unless `length` is False)."""
        await self.start(rec, status, ctype, len(body) if length else None, extra)
        rec.sending_last = True
        await rec.send({"type": "http.response.body", "body": body, "more_body": False})

    async def error(self, rec: Record, err: HTTPError) -> None:
        """Answer with `err` (an upstream's own reply when it is a `Passthrough`)."""
        if isinstance(err, Passthrough):
            await self.whole(rec, err.status, err.body, err.ctype)
            return
        extra = list(err.headers)
        if err.retry_after:
            extra.append((b"retry-after", rec.s.retry_after))
        if err.status == 401:
            extra.append((b"www-authenticate", b"Bearer"))
        if rec.error is None:
            rec.error = err.message
        body = error_body(err.message, err.type, err.status, err.param)
        await self.whole(rec, err.status, body, JSON_CT, extra)

    async def from_prefill(self, rec: Record, result: Mapping[str, Any]) -> None:
        """Reply with the prefill's own result, shaped as the client asked."""
        if rec.stream:
            body = synthesize_stream(rec.route, result, include_usage(rec.req))
            rec.ttft = time.monotonic() - rec.t0
            await self.whole(rec, 200, body, _SYNTH_CT, length=False)
        else:
            await self.whole(rec, 200, dumps(result).encode(), JSON_CT)

    async def forward(self, rec: Record, resp: aiohttp.ClientResponse, up: Upstream) -> None:
        """Pass the decode's answer to the client: a stream as it comes, else whole.

        Raises:
            HTTPError: the decode broke before the first byte (502, or 504 at the deadline).
        """
        ctype = resp.headers.get("Content-Type", "application/json")
        if resp.status == 200 and rec.stream and ctype.startswith(SSE_CT):
            await self._pipe(rec, resp, up, ctype.encode("latin-1"))
            return
        try:
            data = await resp.read()
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            # A timeout's total is the request's remaining time: the deadline.
            rule = self._failures.fail(rec, Leg.DECODE, fault_of(exc), up.name, exc)
            raise rule.error(up.name, exc) from None
        if resp.status >= 400:
            self._failures.fail(
                rec, Leg.DECODE, status_fault(resp.status), up.name, status=resp.status
            )
        elif resp.status == 200:
            if answer_aborted(rec.rid, up.name, data):
                raise self._failures.fail(rec, Leg.DECODE, Fault.ABORTED, up.name).error(up.name)
            self._acct.usage(rec, usage_from(data))
        await self.whole(rec, resp.status, data, ctype.encode("latin-1"))

    async def _pipe(
        self, rec: Record, resp: aiohttp.ClientResponse, up: Upstream, ctype: bytes
    ) -> None:
        """Forward an SSE stream as it arrives, whole events only; end it with its
        usage checked, or with an in-band error."""
        failure: HTTPError | None = None
        tail = b""
        try:
            tail = await self._relay(rec, resp.content, ctype)
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            fault = Fault.TIMEOUT if isinstance(exc, asyncio.TimeoutError) else Fault.STREAM_CUT
            failure = self._failures.fail(rec, Leg.DECODE, fault, up.name, exc).error(up.name, exc)
        else:
            if not tail.endswith(DONE):
                rule = self._failures.fail(rec, Leg.DECODE, Fault.STREAM_SHORT, up.name)
                failure = rule.error(up.name)
        if failure is not None:
            if not rec.started:
                raise failure
            rec.sending_last = True
            event = stream_error_event(failure.message, failure.type, failure.status)
            await rec.send({"type": "http.response.body", "body": event, "more_body": False})
            return
        if rec.decision == "disaggregated":
            self._acct.usage(rec, usage_from(tail) if include_usage(rec.req) else None)
        rec.sending_last = True
        await rec.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _relay(self, rec: Record, content: aiohttp.StreamReader, ctype: bytes) -> bytes:
        """The per-chunk loop: one read, one send. Returns the last two chunks sent.

        The response starts with the first complete event, so a stream that
        fails before any event still gets a proper HTTP error status.
        """
        send = rec.send
        gaps = rec.gaps = self._acct.gaps(rec.route)
        pending = tail = prev_tail = b""
        while True:
            chunk = await content.readany()
            if not chunk:
                return prev_tail + tail
            if pending:
                chunk = pending + chunk
                pending = b""
            # Hold back a partial event, so that an upstream cut mid-event never
            # leaves a torn line in front of the error event.
            if not chunk.endswith(b"\n\n"):
                cut = event_end(chunk)
                if cut == 0:
                    if len(chunk) < MAX_PENDING:
                        pending = chunk
                        continue
                elif cut < len(chunk):
                    pending = chunk[cut:]
                    chunk = chunk[:cut]
            # The end: if the engine cut it short, `_pipe` ends it with an error event instead.
            chunk = last_chunk(rec.rid, rec.decode, tail, chunk) if chunk.endswith(DONE) else chunk
            now = time.monotonic()
            if not rec.started:
                await self.start(rec, 200, ctype, None)
                rec.ttft = now - rec.t0
            elif not chunk.startswith(DONE) and b'"choices":[]' not in chunk:
                # The usage chunk and [DONE] follow the last token at once: not a gap.
                gaps.add(now - rec.last_sent)
            rec.last_sent = now
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            prev_tail, tail = tail, chunk
