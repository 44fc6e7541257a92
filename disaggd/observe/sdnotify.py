"""sd_notify(3): readiness, reload, stopping, status and watchdog messages to systemd.

The protocol is one datagram per message on the AF_UNIX socket named by
``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace), each a
newline-separated list of ``KEY=VALUE`` (sd_notify(3), "Description"). With no
``NOTIFY_SOCKET`` every call does nothing, so the daemon runs the same outside
systemd.

``RELOADING=1`` must carry ``MONOTONIC_USEC`` (CLOCK_MONOTONIC in microseconds)
for ``Type=notify-reload`` and newer systemd (systemd.service(5), "Type=").
"""

from __future__ import annotations

import os
import socket
import time

from disaggd.observe.logs import get_logger

log = get_logger("disaggd.sdnotify")


class Notifier:
    """Sends sd_notify messages; a no-op when not started by systemd."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._address: str | None = None
        self._sock: socket.socket | None = None
        if address:
            # "@name" is Linux's abstract namespace: a leading NUL byte.
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Never block the event loop: a datagram socket whose reader stalls queues only
            # a few messages (net.unix.max_dgram_qlen), and a blocking sendto would then
            # freeze the proxy and supervision with it. A full queue drops the message.
            self._sock.setblocking(False)
        self._last_status = ""

    @property
    def enabled(self) -> bool:
        """True when a notify socket was given."""
        return self._sock is not None

    def send(self, **fields: str | int) -> bool:
        """Send one message made of `fields` (``READY=1`` is ``send(READY=1)``).

        Returns False (and logs) when systemd could not be told, including when its
        queue is full (the message is dropped); never raises, never blocks.
        """
        if self._sock is None or self._address is None:
            return False
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            log.warning("sd_notify_failed", error=str(exc), message=payload.decode())
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: the service is up (after a reload too)."""
        return self.send(READY=1, **({"STATUS": status} if status else {}))

    def reloading(self) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC``; follow with `ready` when done."""
        return self.send(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)

    def stopping(self) -> bool:
        """``STOPPING=1``: shutdown has begun."""
        return self.send(STOPPING=1)

    def status(self, text: str) -> bool:
        """``STATUS=...``, shown by ``systemctl status``; repeats are not resent."""
        if text == self._last_status:
            return True
        self._last_status = text
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the keep-alive ping."""
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        """Close the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``, or None.

    ``WATCHDOG_PID``, when set, must be this process (sd_watchdog_enabled(3)).
    """
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return None
