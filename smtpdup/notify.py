"""systemd's readiness protocol (sd_notify), without libsystemd.

With ``Type=notify`` systemd starts a service's dependants only once the
service says ``READY=1``, and shows ``STATUS=`` lines in ``systemctl
status``. The protocol is one datagram per message to the unix socket named
by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace):
newline-separated ``KEY=value`` assignments (sd_notify(3)).

This module owns that socket and nothing else; the relay decides when to
say what (service.py, workers.py). Outside systemd (no ``$NOTIFY_SOCKET``)
every call does nothing. A failure to send is never fatal: the relay runs
the same whether systemd hears it or not.
"""

from __future__ import annotations

import os
import socket
import time

from . import logs

ENV = "NOTIFY_SOCKET"

log = logs.get("notify")


def notify(*assignments: str) -> bool:
    """Send ``assignments`` (``"READY=1"``, ``"STATUS=..."``) as one message;
    returns True when a message was sent, False outside systemd or when the
    socket refused it (logged once per call at warning level)."""
    address = os.environ.get(ENV)
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    payload = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(payload, address)
    except OSError as exc:
        log.warning("notify_failed", extra={"error": str(exc), "socket": os.environ.get(ENV)})
        return False
    return True


def ready(status: str) -> bool:
    """READY=1: listening and delivering (at start, and after a reload)."""
    return notify("READY=1", f"STATUS={status}")


def reloading() -> bool:
    """RELOADING=1 with the monotonic time that systemd 253+ asks for."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}",
                  "STATUS=reloading the configuration")


def stopping() -> bool:
    """STOPPING=1: draining, no new sessions."""
    return notify("STOPPING=1", "STATUS=draining: finishing transactions in flight")
