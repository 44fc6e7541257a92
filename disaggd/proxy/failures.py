"""Every way an upstream leg can fail, in one table: metric kind, log tag, what the client gets.

A leg classifies what went wrong (`Fault`, from an exception with `fault_of` or
from a status), then calls `Failures.fail`, which counts it
(``disaggd_upstream_errors_total{instance,kind}``), writes the request's
``error`` field and returns the `Rule`; its ``status`` says how the request
ends when the failure is final:

=========  ============  =============  ======================================  ======
leg        fault         kind           error tag                               client
=========  ============  =============  ======================================  ======
prefill    CONNECT       connect        prefill_connect:{up}: {exc}             retry
prefill    TIMEOUT       timeout        prefill_timeout:{up}                    retry
prefill    DEADLINE      timeout        prefill_timeout:{up}                    504
prefill    BROKEN        disconnect     prefill_{exc_type}:{up}                 retry
prefill    HTTP_4XX      http_4xx       prefill_http_{status}:{up}              as is
prefill    HTTP_429      http_429       prefill_http_429:{up}                   retry
prefill    HTTP_5XX      http_5xx       prefill_http_{status}:{up}              retry
prefill    BAD_RESPONSE  bad_response   prefill_bad_response:{up}               retry
decode     CONNECT       connect        decode_connect:{up}                     retry, 502
decode     TIMEOUT       timeout        decode_timeout:{up}                     504
decode     BROKEN        disconnect     decode_{exc_type}:{up}                  502
decode     HTTP_4XX      http_4xx       decode_http_{status}:{up}               as is
decode     HTTP_5XX      http_5xx       decode_http_{status}:{up}               as is
decode     STREAM_CUT    stream_cut     decode_{exc_type}:{up}                  502
decode     STREAM_SHORT  stream_cut     decode_stream_cut:{up}                  502
decode     ABORTED       stream_cut     decode_aborted:{up}                     502
=========  ============  =============  ======================================  ======

"retry": another instance of the role is tried (the prefill: then the
``prefill_fallback`` policy; the decode: only while the request is not pinned to
it). "as is": the upstream's own reply is passed through. A decode failure after
the first byte reaches the client in-band (`disaggd.proxy.errors.stream_error_event`).
`/v1/models` counts its failures with the same kinds and answers from the topology.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import Enum

import aiohttp

from disaggd.proxy.errors import HTTPError, gateway_timeout
from disaggd.proxy.record import Accounting, Record
from disaggd.proxy.router import Router

#: Connecting failed: the upstream never saw the request, so another one may take it.
CONNECT_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientConnectorError,)
if hasattr(aiohttp, "ConnectionTimeoutError"):  # aiohttp >= 3.10
    CONNECT_ERRORS = (*CONNECT_ERRORS, aiohttp.ConnectionTimeoutError)


class Leg(str, Enum):
    """Which upstream call failed."""

    PREFILL = "prefill"
    DECODE = "decode"
    MODELS = "models"


class Fault(Enum):
    """What went wrong on a leg."""

    CONNECT = "connect"  # no connection (refused, unreachable, connect timeout)
    TIMEOUT = "timeout"  # the leg's own timeout passed
    DEADLINE = "deadline"  # the request's deadline passed during the leg
    BROKEN = "broken"  # any other client error before the answer was read
    HTTP_4XX = "http_4xx"
    HTTP_429 = "http_429"  # the instance is busy: another one may take it
    HTTP_5XX = "http_5xx"  # any non-200, non-4xx status
    BAD_RESPONSE = "bad_response"  # a 200 whose body is not a usable result
    STREAM_CUT = "stream_cut"  # the connection broke mid-stream
    STREAM_SHORT = "stream_short"  # the stream ended without [DONE], or with one after an abort
    ABORTED = "aborted"  # a whole 200 answer the engine aborted (finish_reason "abort")


@dataclass(frozen=True)
class Rule:
    """What one (leg, fault) means.

    Attributes:
        kind: the ``kind`` label of ``disaggd_upstream_errors_total``.
        tag: the request's ``error`` field; ``{up}``, ``{exc}``, ``{exc_type}``
            and ``{status}`` are filled in.
        status: the client's status when this failure ends the request; None
            when the upstream's own reply is passed through (or the view falls back).
        message: the client's error message (same fields), when ``status`` is set.
        retry: another instance of the role may take the request.
    """

    kind: str
    tag: str
    status: int | None = None
    message: str = ""
    retry: bool = False

    def error(self, up: str, exc: BaseException | None = None) -> HTTPError:
        """The client's error for this failure (``status`` must be set)."""
        assert self.status is not None
        if self.status == 504:
            return gateway_timeout()
        return HTTPError(self.status, self.message.format(up=up, exc=exc), "bad_gateway_error")


_P, _D, _M = Leg.PREFILL, Leg.DECODE, Leg.MODELS

TABLE: dict[tuple[Leg, Fault], Rule] = {
    (_P, Fault.CONNECT): Rule("connect", "prefill_connect:{up}: {exc}", retry=True),
    (_P, Fault.TIMEOUT): Rule("timeout", "prefill_timeout:{up}", retry=True),
    (_P, Fault.DEADLINE): Rule("timeout", "prefill_timeout:{up}", 504),
    (_P, Fault.BROKEN): Rule("disconnect", "prefill_{exc_type}:{up}", retry=True),
    (_P, Fault.HTTP_4XX): Rule("http_4xx", "prefill_http_{status}:{up}"),
    (_P, Fault.HTTP_429): Rule("http_429", "prefill_http_429:{up}", retry=True),
    (_P, Fault.HTTP_5XX): Rule("http_5xx", "prefill_http_{status}:{up}", retry=True),
    (_P, Fault.BAD_RESPONSE): Rule("bad_response", "prefill_bad_response:{up}", retry=True),
    (_D, Fault.CONNECT): Rule(
        "connect", "decode_connect:{up}", 502, "decode instance {up} is unreachable: {exc}", True
    ),
    (_D, Fault.TIMEOUT): Rule("timeout", "decode_timeout:{up}", 504),
    (_D, Fault.BROKEN): Rule(
        "disconnect", "decode_{exc_type}:{up}", 502, "decode instance {up} failed: {exc}"
    ),
    (_D, Fault.HTTP_4XX): Rule("http_4xx", "decode_http_{status}:{up}"),
    (_D, Fault.HTTP_429): Rule("http_4xx", "decode_http_{status}:{up}"),
    (_D, Fault.HTTP_5XX): Rule("http_5xx", "decode_http_{status}:{up}"),
    (_D, Fault.STREAM_CUT): Rule(
        "stream_cut", "decode_{exc_type}:{up}", 502, "decode instance {up} failed mid-stream: {exc}"
    ),
    (_D, Fault.STREAM_SHORT): Rule(
        "stream_cut", "decode_stream_cut:{up}", 502, "decode instance {up} ended the stream early"
    ),
    (_D, Fault.ABORTED): Rule(
        "stream_cut", "decode_aborted:{up}", 502, "decode instance {up} aborted the answer"
    ),
    # /v1/models answers from the topology whatever happened: only the kind matters.
    (_M, Fault.CONNECT): Rule("connect", ""),
    (_M, Fault.BROKEN): Rule("connect", ""),
    (_M, Fault.TIMEOUT): Rule("timeout", ""),
    (_M, Fault.HTTP_4XX): Rule("http_4xx", ""),
    (_M, Fault.HTTP_429): Rule("http_4xx", ""),
    (_M, Fault.HTTP_5XX): Rule("http_5xx", ""),
}


def fault_of(exc: BaseException) -> Fault:
    """The `Fault` of an exception raised by a leg's request or read."""
    if isinstance(exc, CONNECT_ERRORS):
        return Fault.CONNECT
    if isinstance(exc, asyncio.TimeoutError):
        return Fault.TIMEOUT
    return Fault.BROKEN


def status_fault(status: int) -> Fault:
    """The `Fault` of a non-200 upstream status."""
    if status == 429:
        return Fault.HTTP_429
    return Fault.HTTP_4XX if 400 <= status < 500 else Fault.HTTP_5XX


#: Faults that count against an instance's breaker (`disaggd.proxy.breaker`): it
#: could not answer. A 4xx (the request's fault), a 429 (busy, not broken), the
#: request's own deadline and an engine abort (shutting down) never count.
BREAKER_FAULTS = frozenset(
    {
        Fault.CONNECT,
        Fault.TIMEOUT,
        Fault.BROKEN,
        Fault.HTTP_5XX,
        Fault.BAD_RESPONSE,
        Fault.STREAM_CUT,
        Fault.STREAM_SHORT,
    }
)


class Failures:
    """Applies `TABLE`: counts a failure and writes the request's error tag."""

    def __init__(self, accounting: Accounting, router: Router | None = None) -> None:
        self._acct = accounting
        self._router = router

    def fail(
        self,
        rec: Record | None,
        leg: Leg,
        fault: Fault,
        up: str,
        exc: BaseException | None = None,
        *,
        status: int | None = None,
    ) -> Rule:
        """Count `fault` of `leg` on instance `up`; set ``rec.error``; return its `Rule`.

        Raises:
            KeyError: a (leg, fault) pair the table does not list (a bug).
        """
        rule = TABLE[(leg, fault)]
        self._acct.upstream_error(up, rule.kind)
        if self._router is not None and fault in BREAKER_FAULTS and leg is not Leg.MODELS:
            upstream = self._router.get(up)
            if upstream is not None:
                self._router.health.failed(upstream, rule.kind)
        if rec is not None:
            rec.error = rule.tag.format(up=up, exc=exc, exc_type=type(exc).__name__, status=status)
        return rule
