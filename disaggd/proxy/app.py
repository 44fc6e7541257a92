"""The proxy's front: the ASGI app, its ordinary views, the listening socket, Hypercorn.

`Proxy.app` is a Quart app served by Hypercorn inside the daemon's event loop
(`Proxy.serve`, no signal handlers of its own). The two inference routes are
answered by a plain ASGI handler placed in front of Quart (``app.asgi_app``,
`disaggd.proxy.pipeline`), because Quart's request/response machinery costs
about 0.2 ms of CPU per request, a fifth of the proxy's whole budget (issue 7).
``/health``, ``/metrics`` and ``/v1/models`` are ordinary Quart views.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
import hypercorn.asyncio
import hypercorn.config
import quart

from disaggd.observe.logs import get_logger
from disaggd.observe.metrics import Metrics
from disaggd.observe.tracing import tracer_for
from disaggd.proxy.admission import Admission
from disaggd.proxy.clients import Upstreams, client_timeout
from disaggd.proxy.errors import HTTPError, dumps, error_body
from disaggd.proxy.failures import Failures, Fault, Leg, fault_of
from disaggd.proxy.legs import Legs
from disaggd.proxy.pipeline import Pipeline
from disaggd.proxy.prefiller import Prefillers
from disaggd.proxy.record import Accounting, Send
from disaggd.proxy.reply import Replies
from disaggd.proxy.request import INFERENCE_ROUTES, Receive, check_auth
from disaggd.proxy.router import Router
from disaggd.proxy.settings import Live, Settings
from disaggd.topology import Role, Topology

ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

#: HTTP keep-alive toward clients, seconds. Longer than common client pools
#: (aiohttp 15 s, httpx 5 s) so that the client, not the proxy, closes an idle
#: connection: a client never sends on a connection the proxy is closing. Not
#: longer: Hypercorn 0.18 keeps a connection the client closed (CLOSE-WAIT) until
#: this timeout, so it bounds how long each closed connection holds a descriptor.
CLIENT_KEEPALIVE = 20.0

#: Seconds Hypercorn gives connections still open when the shutdown trigger fires,
#: before cancelling them (which closes their upstream legs). Short, because the
#: daemon drains first (`stop_accepting`, `wait_drained` up to ``drain_timeout``).
SHUTDOWN_GRACE = 2.0

#: Deadline of the `/v1/models` call to a decode instance, seconds (after connect).
MODELS_TIMEOUT = 5.0

#: Pending connections the kernel queues before Hypercorn accepts them.
LISTEN_BACKLOG = 2048

log = get_logger("disaggd.proxy")


def bind_listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port and listening (IPv4 or IPv6), for `Proxy.serve`.

    Bind it before starting anything that takes time, so that an address in use
    fails at once (no check-then-bind race).

    Raises:
        OSError: the address cannot be resolved or bound; the message names it
            (``cannot listen on HOST:PORT: <reason>``), ``errno`` is the OS's.
    """
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, type_, proto, _, addr = infos[0]
        sock = socket.socket(family, type_, proto)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def _json(status: int, obj: Any, headers: dict[str, str] | None = None) -> quart.Response:
    return quart.Response(
        dumps(obj), status=status, content_type="application/json", headers=headers
    )


def _error(
    status: int, message: str, type_: str, headers: dict[str, str] | None = None
) -> quart.Response:
    return quart.Response(
        error_body(message, type_, status),
        status=status,
        content_type="application/json",
        headers=headers,
    )


async def _refuse_websocket(scope: MutableMapping[str, Any], send: Send) -> None:
    """No route takes a WebSocket: a 400 in the API's error shape where the server can
    send a denial response (ASGI's ``websocket.http.response``), else a plain close (403)."""
    if "websocket.http.response" in scope.get("extensions", {}):
        body = error_body("WebSockets are not served here", "invalid_request_error", 400)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "websocket.http.response.start", "status": 400, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
        return
    await send({"type": "websocket.close", "code": 1008})


class Proxy:
    """The OpenAI-compatible proxy of one daemon.

    Attributes:
        app: the Quart app (the inference routes are served by `Pipeline.serve`,
            installed as ``app.asgi_app`` in front of Quart's own).
    """

    def __init__(self, topo: Topology, router: Router, metrics: Metrics) -> None:
        self._router = router
        self._metrics = metrics
        self._live = Live(Settings.from_topology(topo))
        self._upstreams = Upstreams(topo.proxy.upstream_keepalive)
        acct = Accounting(metrics)
        self._failures = Failures(acct, router)
        admission = Admission(router, metrics)
        prefillers = Prefillers(router, admission)
        # [observe] otlp_endpoint: read once (a change needs a restart, topology.plan).
        self._tracer = tracer_for(topo.observe.otlp_endpoint)
        self._pipeline = Pipeline(
            self._live,
            router,
            Legs(router, self._upstreams, acct, self._failures, prefillers),
            Replies(acct, self._failures),
            acct,
            admission=admission,
            prefillers=prefillers,
            tracer=self._tracer,
        )
        self._started = int(time.time())
        metrics.inflight.set_function(lambda: self._live.inflight)
        metrics.bind_upstreams(
            lambda: [
                (u.name, u.role.value, u.ready and not u.draining, u.outstanding)
                for u in router.upstreams()
            ]
        )
        app = quart.Quart("disaggd")
        app.config["RESPONSE_TIMEOUT"] = None  # streams last as long as generation does
        app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
        app.add_url_rule("/health", "health", self._health, methods=["GET"])
        app.add_url_rule("/livez", "livez", self._livez, methods=["GET"])
        app.add_url_rule("/readyz", "readyz", self._readyz, methods=["GET"])
        app.add_url_rule("/metrics", "metrics", self._metrics_view, methods=["GET"])
        app.add_url_rule("/v1/models", "models", self._models, methods=["GET"])
        app.register_error_handler(404, self._not_found)
        app.register_error_handler(405, self._method_not_allowed)
        self._quart_asgi: ASGIApp = app.asgi_app  # type: ignore[assignment]
        app.asgi_app = self._asgi  # type: ignore[method-assign,assignment]
        self.app = app

    # -- lifecycle -------------------------------------------------------------------------

    def update_settings(self, topo: Topology) -> None:
        """Apply a reloaded topology's proxy settings to the next requests.

        Timeouts, fallback policy, thresholds, body limit, API key (its env var
        is read again), connector handoff and model name apply at once;
        requests in flight keep the settings they started with and no
        connection is dropped. A new ``upstream_keepalive`` applies to new
        pooled clients: the current ones are retired (closed by `aclose`).
        Routing policies are the router's (`Router.update_topology`); a new
        listen address needs a restart.
        """
        self._live.settings = Settings.from_topology(topo)
        self._upstreams.set_keepalive(topo.proxy.upstream_keepalive)

    async def serve(
        self,
        shutdown_trigger: Callable[[], Awaitable[object]],
        *,
        sock: socket.socket | None = None,
        bound: asyncio.Event | None = None,
    ) -> None:
        """Serve until `shutdown_trigger` returns.

        Args:
            shutdown_trigger: awaited by Hypercorn; when it returns, connections
                still open get `SHUTDOWN_GRACE` seconds before they are cancelled
                (their upstream legs closed): the daemon drains first
                (`stop_accepting`, `wait_drained`).
            sock: a listening socket from `bind_listener`, now owned by the
                proxy; None: bind ``[proxy] host:port`` here.
            bound: set as soon as clients can connect.

        Raises:
            OSError: `sock` is None and the address cannot be bound.
        """
        p = self._live.settings.proxy
        if sock is None:
            sock = bind_listener(p.host, p.port)
        config = hypercorn.config.Config()
        config.bind = [f"fd://{sock.detach()}"]
        config.accesslog = None  # one request_done line per request instead
        config.errorlog = logging.getLogger("disaggd.hypercorn")
        config.keep_alive_timeout = CLIENT_KEEPALIVE
        config.graceful_timeout = SHUTDOWN_GRACE
        log.info("proxy_listening", host=p.host, port=p.port)
        if bound is not None:
            bound.set()
        await hypercorn.asyncio.serve(self.app, config, shutdown_trigger=shutdown_trigger)

    def stop_accepting(self) -> None:
        """Shutdown drain: new requests get 503 (with Retry-After); requests in flight go on."""
        self._live.accepting = False

    @property
    def inflight(self) -> int:
        """Inference requests being served now."""
        return self._live.inflight

    async def wait_drained(self, timeout: float) -> bool:
        """Wait until no inference request is in flight; False if `timeout` (s) passed first."""
        return await self._live.wait_drained(timeout)

    async def aclose(self) -> None:
        """Close every pooled upstream client (and their idle connections)."""
        await self._upstreams.aclose()
        # Export the spans still queued (the SDK's thread; off the loop).
        await asyncio.to_thread(self._tracer.shutdown)

    # -- ASGI entry ------------------------------------------------------------------------

    async def _asgi(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path in INFERENCE_ROUTES:
                await self._pipeline.serve(scope, receive, send, path)
                return
        elif scope["type"] == "websocket":
            await _refuse_websocket(scope, send)
            return
        await self._quart_asgi(scope, receive, send)

    # -- Quart views -----------------------------------------------------------------------

    async def _health(self) -> quart.Response:
        router = self._router
        prefill = router.ready_count(Role.PREFILL)
        decode = router.ready_count(Role.DECODE)
        missing = [r.value for r, n in ((Role.PREFILL, prefill), (Role.DECODE, decode)) if n == 0]
        body: dict[str, Any] = {"prefill_ready": prefill, "decode_ready": decode}
        retry = {"Retry-After": str(self._live.settings.proxy.retry_after)}
        if not self._live.accepting:
            body.update(status="draining", missing=missing)
            return _json(503, body, retry)
        if missing:
            why = {r: router.why_none(Role(r)) for r in missing}
            body.update(status="unavailable", missing=missing, why=why)
            return _json(503, body, retry)
        body.update(status="ok", missing=[])
        return _json(200, body)

    async def _livez(self) -> quart.Response:
        """Liveness: the daemon's loop answers (200 while it serves, draining included).
        A failure means "restart me"; not ready is `/readyz`'s question."""
        return _json(200, {"status": "alive"})

    async def _readyz(self) -> quart.Response:
        """Readiness: a prefill and a decode can take a request (ready, not draining, breaker
        not open) and the proxy is not draining: 200, else 503 with ``Retry-After``."""
        router = self._router
        prefill = router.routable_count(Role.PREFILL)
        decode = router.routable_count(Role.DECODE)
        body: dict[str, Any] = {"prefill_routable": prefill, "decode_routable": decode}
        if self._live.accepting and prefill and decode:
            return _json(200, {"status": "ready", **body})
        retry = {"Retry-After": str(self._live.settings.proxy.retry_after)}
        status = "draining" if not self._live.accepting else "not_ready"
        return _json(503, {"status": status, **body}, retry)

    def _refused(self) -> quart.Response | None:
        """A 401 for a GET view when the API key is required and not given, else None."""
        s = self._live.settings
        if not s.auth_required:
            return None
        try:
            check_auth(quart.request.headers.get("Authorization"), s.api_key)
        except HTTPError as err:
            return _error(401, err.message, err.type, {"WWW-Authenticate": "Bearer"})
        return None

    async def _metrics_view(self) -> quart.Response:
        # The metrics name every instance and its load: behind the key unless opened.
        if self._live.settings.proxy.metrics_require_key and (refused := self._refused()):
            return refused
        return quart.Response(self._metrics.render(), status=200, content_type=Metrics.CONTENT_TYPE)

    async def _models(self) -> quart.Response:
        if refused := self._refused():
            return refused
        s = self._live.settings
        auth = quart.request.headers.get("Authorization")
        up = self._router.pick(Role.DECODE)
        if up is not None:
            headers = {"Authorization": auth} if s.proxy.forward_authorization and auth else {}
            try:
                async with self._upstreams.session(up).get(
                    self._upstreams.url(up, "/v1/models"),
                    headers=headers,
                    timeout=client_timeout(s.connect_timeout + MODELS_TIMEOUT, s.connect_timeout),
                ) as resp:
                    data = await resp.read()
                    if resp.status == 200:
                        return quart.Response(data, status=200, content_type="application/json")
                    fault = Fault.HTTP_5XX if resp.status >= 500 else Fault.HTTP_4XX
                    self._failures.fail(None, Leg.MODELS, fault, up.name)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                self._failures.fail(None, Leg.MODELS, fault_of(exc), up.name, exc)
        # No decode to ask (or it failed): the topology knows the name clients use.
        model = {
            "id": s.public_model,
            "object": "model",
            "created": self._started,
            "owned_by": "disaggd",
            "root": s.root_model,
            "parent": None,
            "permission": [],
        }
        return _json(200, {"object": "list", "data": [model]})

    async def _not_found(self, _exc: Exception) -> quart.Response:
        return _error(404, f"no route {quart.request.path}", "not_found_error")

    async def _method_not_allowed(self, _exc: Exception) -> quart.Response:
        req = quart.request
        return _error(
            405, f"method {req.method} is not allowed on {req.path}", "invalid_request_error"
        )
