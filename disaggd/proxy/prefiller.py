"""llm-d's decode-sidecar contract: ``x-prefiller-host-port`` names the request's prefill.

The contract, as llm-d's routing sidecar implements it (repository
``llm-d/llm-d-routing-sidecar``: ``internal/proxy/chat_completions.go``,
``chatCompletionsHandler``; the header names in ``internal/proxy/proxy.go``):

* the header is ``x-prefiller-host-port: HOST:PORT`` (the older ``x-prefiller-url`` is
  read only when it is absent; an ``http://`` prefix is trimmed);
* several values are allowed, as several header lines or as one line of
  comma-separated values (RFC 7230 3.2.2); the sidecar takes the first (or, with its
  prefiller-sampling option, a random one);
* absent or empty: no remote prefill, the request goes straight to the decode (the
  endpoint picker decided decode-only);
* a target outside the sidecar's SSRF allowlist (when enabled) is refused with 403.

What disaggd does (it is its own endpoint picker, so the header is an override):

* absent: disaggd's own routing, unchanged;
* present: the first value is the prefill (as the sidecar without sampling), and the
  header is a decision to disaggregate (`disaggd.proxy.pipeline.decide`, reason
  ``header``; a batch a connector cannot hand off stays decode-only);
* HOST:PORT equal to a configured prefill's base URL host:port: that instance, picked
  like any other (admission's in-flight limit and queue, draining, its breaker); when it
  cannot take the request or fails, no other prefill is tried and ``prefill_fallback``
  decides (the decode prefills, or 503);
* any other address: an ad-hoc upstream (counted in flight, the leg's timeouts, no health
  check) only with ``[proxy] allow_prefiller_header = true``; by default a **400** in
  OpenAI's error shape naming the header: an address chosen by a client is an SSRF risk;
  a value that is not HOST:PORT is a 400 either way.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection
from urllib.parse import urlsplit

from disaggd.proxy.admission import Admission
from disaggd.proxy.errors import bad_request
from disaggd.proxy.record import Record
from disaggd.proxy.router import Router
from disaggd.proxy.upstream import Upstream
from disaggd.topology import Role

HEADER = "x-prefiller-host-port"

#: Ad-hoc prefills remembered (their in-flight counts and pooled clients), LRU.
ADHOC_KEPT = 64


def first_value(value: str) -> str:
    """The HOST:PORT the sidecar would use: the first comma-separated value, trimmed,
    without an ``http://`` prefix; "" when there is none."""
    first = value.split(",", 1)[0].strip()
    return first[7:] if first.lower().startswith("http://") else first


def host_port(hostport: str) -> str | None:
    """`hostport` normalized (lower-case host, IPv6 in brackets), or None when it is not
    HOST:PORT with a port in 1..65535."""
    try:
        parts = urlsplit(f"http://{hostport}")
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname
    if not host or port is None or port == 0 or parts.path or parts.query or parts.username:
        return None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Prefillers:
    """Resolves the header to an upstream, and picks the prefill of each attempt."""

    def __init__(self, router: Router, admission: Admission) -> None:
        self._router = router
        self._admission = admission
        self._adhoc: OrderedDict[str, Upstream] = OrderedDict()

    def resolve(self, value: str | None, allow_adhoc: bool) -> Upstream | None:
        """The prefill the request's header names, or None without the header.

        Raises:
            HTTPError: 400 when the value is not HOST:PORT, or names no configured
                prefill and `allow_adhoc` is False.
        """
        if value is None:
            return None
        target = host_port(first_value(value))
        if target is None:
            raise bad_request(f"'{HEADER}' must be HOST:PORT", HEADER)
        for up in self._router.upstreams():
            if up.role is Role.PREFILL and host_port(urlsplit(up.base_url).netloc) == target:
                return up
        if not allow_adhoc:
            raise bad_request(
                f"'{HEADER}' names {target}, which is no configured prefill instance "
                "(set [proxy] allow_prefiller_header = true to allow any address)",
                HEADER,
            )
        return self._adhoc_upstream(target)

    def _adhoc_upstream(self, target: str) -> Upstream:
        up = self._adhoc.get(target)
        if up is None:
            up = Upstream(target, Role.PREFILL, f"http://{target}", None, ready=True)
            self._adhoc[target] = up
            while len(self._adhoc) > ADHOC_KEPT:
                self._adhoc.popitem(last=False)
        self._adhoc.move_to_end(target)
        return up

    async def take(self, rec: Record, tried: Collection[str]) -> Upstream | None:
        """The prefill of the next attempt, or None when none is left to try.

        Without the header: admission's pick among every prefill. With it: only the
        named one, and only once.

        Raises:
            HTTPError: 429 from admission (every slot busy past ``queue_timeout``).
        """
        named = rec.prefiller
        if named is None:
            return await self._admission.take(rec, Role.PREFILL, tried, required=False)
        if tried:
            return None
        if self._router.get(named.name) is None:
            return named  # ad-hoc: nothing to pick from
        others = {
            up.name
            for up in self._router.upstreams()
            if up.role is Role.PREFILL and up.name != named.name
        }
        return await self._admission.take(rec, Role.PREFILL, others, required=False)
