"""How the two legs of one request are tied together, one strategy per connector kind.

`disaggd.topology.connectors` holds the protocol facts (which connector hands
off how, the prefill's ``kv_transfer_params``, P2pNccl's id format); this module
applies them to a request: the prefill leg's body, the decode leg's body and the
id each leg carries. The pipeline calls the same three methods whatever the
connector is, so no connector branch sits in the request path:

* `KVParamsHandoff` (NIXL, Mooncake): the prefill is asked for a remote decode
  and returns ``kv_transfer_params``; the decode leg carries them;
* `RequestIdHandoff` (P2pNccl): both legs carry an id that names both KV
  addresses, so the decode cannot change once the prefill ran;
* `StorageHandoff` (ExampleConnector, LMCache, ...): the prefill stores KV keyed
  by the prompt and the decode finds it: the legs need nothing extra.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from disaggd.proxy.errors import dumps
from disaggd.proxy.upstream import Upstream
from disaggd.topology import connectors
from disaggd.topology.connectors import Handoff

#: Keys removed from the prefill leg: vLLM rejects min_tokens > max_tokens, and
#: stream_options without stream (vllm/entrypoints/openai/protocol.py validators).
_PREFILL_DROP = ("stream_options", "min_tokens", "min_completion_tokens", "kv_transfer_params")


def prefill_request(req: Mapping[str, Any], kv_params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The prefill leg's body: the client's request shaped to only prefill.

    ``stream`` false, ``max_tokens`` 1 (and ``max_completion_tokens`` 1 where the
    client sent it, since it overrides ``max_tokens``), ``n`` 1, no
    ``stream_options``/``min_tokens``/``min_completion_tokens``; `kv_params`
    (the connector's prefill ``kv_transfer_params``) when given.
    """
    body = {k: v for k, v in req.items() if k not in _PREFILL_DROP}
    body["stream"] = False
    body["max_tokens"] = 1
    if "max_completion_tokens" in req:
        body["max_completion_tokens"] = 1
    body["n"] = 1
    if kv_params is not None:
        body["kv_transfer_params"] = dict(kv_params)
    return body


def decode_body(raw: bytes, req: Mapping[str, Any], kv_params: Mapping[str, Any] | None) -> bytes:
    """The decode leg's body: the client's own bytes, plus `kv_params` when given.

    Nothing the client did not send is added (no ``max_tokens``). The client's
    bytes are reused as they are when possible, so a long prompt is not
    serialized again; a ``kv_transfer_params`` the client sent is always removed
    (it would let a client point the decode at any host's KV).
    """
    stripped = raw.strip()
    splice = stripped[:1] == b"{" and stripped[-1:] == b"}" and "kv_transfer_params" not in req
    if splice:
        if kv_params is None:
            return raw
        return stripped[:-1] + b',"kv_transfer_params":' + dumps(kv_params).encode() + b"}"
    body = {k: v for k, v in req.items() if k != "kv_transfer_params"}
    if kv_params is not None:
        body["kv_transfer_params"] = dict(kv_params)
    return dumps(body).encode()


class StorageHandoff:
    """The legs carry nothing extra: KV is found by prompt (storage connectors).

    The base of the other strategies: each overrides what its connector needs.

    Attributes:
        kind: the `Handoff` this strategy implements.
        splits_batches: a batch of prompts can be disaggregated as one request.
        pins_decode: once the prefill ran, its decode cannot be replaced.
    """

    kind = Handoff.STORAGE
    splits_batches = True
    pins_decode = False

    def __init__(self, kv_check: bool) -> None:
        self.kv_check = kv_check

    def prefill_body(self, req: Mapping[str, Any]) -> bytes:
        """The prefill leg's body (JSON bytes); see `prefill_request`."""
        return dumps(prefill_request(req, None)).encode()

    def request_id(
        self,
        base: str,
        retry: int,
        client_rid: str | None,
        prefill: Upstream | None,
        decode: Upstream,
    ) -> str:
        """The id one attempt carries (``X-Request-Id``): `base`, plus ``-r<retry>`` on retries.

        Args:
            base: the request's own id (the client's, or a fresh one).
            retry: how many legs were sent again so far (0: first attempt).
            client_rid: the client's ``X-Request-Id``, if it sent one.
            prefill: the prefill of this attempt; None for a decode-only leg.
            decode: the decode of this attempt.
        """
        return f"{base}-r{retry}" if retry else base

    def decode_params(self, result: Mapping[str, Any]) -> tuple[dict[str, Any] | None, bool]:
        """The decode leg's ``kv_transfer_params`` from a prefill `result`, and
        whether the decode can load KV at all (False: it computes the prompt itself)."""
        return None, True

    def decode_body(
        self, raw: bytes, req: Mapping[str, Any], params: Mapping[str, Any] | None
    ) -> bytes:
        """The decode leg's body (JSON bytes); see `decode_body`."""
        return decode_body(raw, req, params)


class KVParamsHandoff(StorageHandoff):
    """The prefill returns ``kv_transfer_params`` that the decode leg carries (NIXL, Mooncake).

    Source: vLLM tests/v1/kv_connector/nixl_integration/toy_proxy_server.py.
    """

    kind = Handoff.KV_TRANSFER_PARAMS
    # One prefill result carries one set of kv_transfer_params: no batches.
    splits_batches = False

    def __init__(self, kv_check: bool) -> None:
        super().__init__(kv_check)
        self._prefill_params = connectors.prefill_kv_transfer_params()

    def prefill_body(self, req: Mapping[str, Any]) -> bytes:
        return dumps(prefill_request(req, self._prefill_params)).encode()

    def decode_params(self, result: Mapping[str, Any]) -> tuple[dict[str, Any] | None, bool]:
        params = result.get("kv_transfer_params")
        if not isinstance(params, dict):
            # Stopped early, or too short for one full block: nothing to load.
            return None, False
        return connectors.decode_kv_transfer_params(params, own_cached_tokens=self.kv_check), True


class RequestIdHandoff(StorageHandoff):
    """Both legs carry an id naming both KV addresses (P2pNccl); see `connectors.p2p_request_id`."""

    kind = Handoff.REQUEST_ID
    pins_decode = True

    def request_id(
        self,
        base: str,
        retry: int,
        client_rid: str | None,
        prefill: Upstream | None,
        decode: Upstream,
    ) -> str:
        if prefill is None or not prefill.kv_address or not decode.kv_address:
            return super().request_id(base, retry, client_rid, prefill, decode)
        # P2pNccl parses both KV addresses out of the id; a client's id could contain
        # ':' and fool its parser, and two clients could send the same one.
        suffix = base
        if client_rid:
            suffix = f"{_safe_id(client_rid)}-{os.urandom(4).hex()}"
        if retry:
            suffix = f"{suffix}-r{retry}"
        return connectors.p2p_request_id(prefill.kv_address, decode.kv_address, suffix)


def _safe_id(value: str) -> str:
    """Only characters a P2pNccl id parser cannot trip on (no ':' or '_')."""
    return "".join(c for c in value[:64] if c.isalnum() or c == "-")


_BY_KIND: dict[Handoff, type[StorageHandoff]] = {
    Handoff.STORAGE: StorageHandoff,
    Handoff.KV_TRANSFER_PARAMS: KVParamsHandoff,
    Handoff.REQUEST_ID: RequestIdHandoff,
}


def handoff_for(kind: Handoff, kv_check: bool) -> StorageHandoff:
    """The strategy of a connector's `Handoff` kind (``kv_check``: ``[kv_transfer] check``)."""
    return _BY_KIND[kind](kv_check)
