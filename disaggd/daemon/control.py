"""The control socket: a small JSON protocol over a Unix socket, and its client.

Protocol: the client connects, writes one JSON object and a newline, and reads
one JSON object and a newline back, then the connection closes.

A streaming reply (``logs`` with ``follow``) is the same first line followed by
more JSON lines, one object each, until the client closes the connection or
the stream ends (its last object then carries ``"end": REASON``). The daemon
never waits for a slow client while producing them: what the client has not
read waits in a bounded buffer on the producer's side (`disaggd.supervise.output`).

Requests: ``{"command": VERB, ...}``, the verbs of `disaggd.daemon.dispatch`.
Replies: ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.

The socket is created with mode 0600 (owner only), and a peer whose uid is
neither the daemon's nor root is refused after connecting (SO_PEERCRED), in
case the file mode was loosened by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from disaggd.observe.logs import get_logger

log = get_logger("disaggd.control")



@dataclass
class Streamed:
    """A streaming reply: `first`, then every object `rest` yields, one line each.

    `rest` is closed (``aclose``) when the client goes away or the server
    closes, so that it can unregister whatever it follows.
    """

    first: dict[str, Any]
    rest: AsyncIterator[dict[str, Any]]


Handler = Callable[[dict[str, Any]], Awaitable["dict[str, Any] | Streamed"]]

#: A request line larger than this is refused (bytes).
MAX_REQUEST = 64 * 1024


class ControlUnavailable(Exception):
    """No daemon answers on the control socket (missing, refused, or timed out)."""


class ControlSocketInUse(Exception):
    """Another daemon already answers on the control socket."""


class ControlServer:
    """Serves the control protocol on a Unix socket; one handler for all commands."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._server: asyncio.base_events.Server | None = None
        self._inode: int | None = None
        # Set by `close`: open streams end with {"end": ...} instead of holding it up.
        self._closing = asyncio.Event()

    async def start(self) -> None:
        """Create the socket (mode 0600) and start accepting.

        Raises:
            ControlSocketInUse: another daemon answers on `path`.
            OSError: the socket cannot be created.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if await _answers(self.path):
                raise ControlSocketInUse(f"another disaggd answers on {self.path}")
            self.path.unlink()  # stale, left by a daemon that was killed
        # Create it 0600 from the start: a chmod after bind leaves a window.
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve_one, path=str(self.path), limit=MAX_REQUEST
            )
        finally:
            os.umask(old_umask)
        self._inode = self.path.stat().st_ino
        log.info("control_socket_listening", path=str(self.path))

    async def close(self) -> None:
        """Stop accepting, end open streams, wait for connections, remove the socket file."""
        self._closing.set()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None
        # Remove the file only if it is still ours (a new daemon may have replaced it).
        with contextlib.suppress(OSError):
            if self._inode is not None and self.path.stat().st_ino == self._inode:
                self.path.unlink()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            uid = _peer_uid(sock) if sock is not None else None
            if uid is not None and uid not in (0, os.getuid()):
                log.warning("control_peer_refused", uid=uid)
                await _reply(writer, {"ok": False, "error": "permission denied"})
                return
            try:
                line = await asyncio.wait_for(reader.readline(), 10)
                request = json.loads(line)
                if not isinstance(request, dict) or not isinstance(request.get("command"), str):
                    raise ValueError("expected a JSON object with a 'command'")
            except (ValueError, asyncio.LimitOverrunError, asyncio.TimeoutError) as exc:
                await _reply(writer, {"ok": False, "error": f"bad request: {exc}"})
                return
            try:
                reply = await self._handler(request)
            except Exception as exc:  # one bad command must not kill the daemon
                log.exception("control_command_failed", command=request.get("command"))
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            if isinstance(reply, Streamed):
                await self._stream(reader, writer, reply)
            else:
                await _reply(writer, reply)
        except (ConnectionError, OSError):
            pass  # the client went away; nothing to tell it
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


    async def _stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply: Streamed
    ) -> None:
        """Write `reply` line by line until it ends, the client closes, or `close` is called."""
        # The client sends nothing after its request: EOF (or an error) means it is gone.
        gone = asyncio.ensure_future(reader.read(1))
        closing = asyncio.ensure_future(self._closing.wait())
        rest = reply.rest
        try:
            await _reply(writer, reply.first)
            while True:
                item = asyncio.ensure_future(anext(rest))
                await asyncio.wait({item, gone, closing}, return_when=asyncio.FIRST_COMPLETED)
                if not item.done():
                    item.cancel()
                    with contextlib.suppress(BaseException):
                        await item
                    if closing.done() and not gone.done():
                        await _reply(writer, {"end": "the daemon is stopping"})
                    return
                try:
                    obj = item.result()
                except StopAsyncIteration:
                    return
                await _reply(writer, obj)
        finally:
            for task in (gone, closing):
                task.cancel()
            aclose = getattr(rest, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()


async def _reply(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
    writer.write(json.dumps(reply, default=str).encode() + b"\n")
    await writer.drain()


def _peer_uid(sock: socket.socket) -> int | None:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


async def _answers(path: Path) -> bool:
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 2)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return True


# -- the client -------------------------------------------------------------------------------


def resolve_socket(explicit: Path | None, config_path: Path) -> Path:
    """The socket a CLI command talks to: ``--socket``, else the topology's.

    The topology is read leniently: `disaggd reload` of a file that does not
    validate must still reach the daemon, which then reports every problem and
    keeps running as it was. Only ``[daemon].control_socket`` is looked at; when
    the file cannot be parsed at all, the default socket is used.
    """
    if explicit is not None:
        return explicit
    from disaggd._compat import tomllib
    from disaggd.topology import DaemonSection

    default = DaemonSection.model_fields["control_socket"].default
    try:
        data = tomllib.loads(Path(config_path).read_text(encoding="utf-8"))
        raw = data.get("daemon", {}).get("control_socket", default)
    except (OSError, ValueError, AttributeError):
        return Path(default)
    path = Path(str(raw)).expanduser()
    return path if path.is_absolute() else (Path(config_path).parent / path).resolve()


def request(path: Path, payload: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one request and return the reply (blocking; for the CLI).

    Raises:
        ControlUnavailable: no socket, nobody listening, permission denied, or
            no reply within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        _connect(sock, path)
        sock.sendall(json.dumps(payload).encode() + b"\n")
        raw = _read_reply(sock, path, deadline, timeout)
    finally:
        sock.close()
    if not raw:
        raise ControlUnavailable(f"the daemon on {path} closed the connection without a reply")
    reply = json.loads(raw)
    if not isinstance(reply, dict):
        raise ControlUnavailable(f"unexpected reply from {path}: {raw[:200]!r}")
    return reply


def stream(
    path: Path, payload: dict[str, Any], timeout: float = 30.0
) -> Generator[dict[str, Any], None, None]:
    """Send one request; yield the reply's first object, then every later one (blocking).

    The first object must come within `timeout` seconds; later ones may take
    any time (a follower waits for the child to print). Ends when the daemon
    closes the connection; closing the generator closes the connection.

    Raises:
        ControlUnavailable: as `request`, for the first object.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        _connect(sock, path)
        sock.sendall(json.dumps(payload).encode() + b"\n")
        reader = sock.makefile("rb")
        try:
            first = reader.readline()
        except TimeoutError:
            raise ControlUnavailable(f"no reply from {path} within {timeout:g} s") from None
        if not first:
            raise ControlUnavailable(f"the daemon on {path} closed the connection without a reply")
        yield _object(first, path)
        sock.settimeout(None)
        for line in reader:
            yield _object(line, path)
    finally:
        sock.close()


def _object(raw: bytes, path: Path) -> dict[str, Any]:
    reply = json.loads(raw)
    if not isinstance(reply, dict):
        raise ControlUnavailable(f"unexpected reply from {path}: {raw[:200]!r}")
    return reply


def _connect(sock: socket.socket, path: Path) -> None:
    """Connect `sock` to `path`, turning each way of failing into `ControlUnavailable`."""
    try:
        sock.connect(str(path))
    except FileNotFoundError:
        raise ControlUnavailable(
            f"no daemon: control socket {path} does not exist (is disaggd running?)"
        ) from None
    except ConnectionRefusedError:
        raise ControlUnavailable(f"no daemon: nothing listens on {path} (stale socket?)") from None
    except PermissionError:
        raise ControlUnavailable(f"permission denied on {path} (run as its owner)") from None
    except OSError as exc:
        raise ControlUnavailable(f"cannot connect to {path}: {exc}") from None


def _read_reply(sock: socket.socket, path: Path, deadline: float, timeout: float) -> bytes:
    """Read one reply line (or up to EOF) before `deadline` (monotonic seconds)."""
    chunks: list[bytes] = []
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise ControlUnavailable(f"no reply from {path} within {timeout:g} s") from None
        if not chunk:
            break
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            break
    return b"".join(chunks)
