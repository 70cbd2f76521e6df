"""The gevent shell around one client connection.

A :class:`Session` moves bytes between the socket and the sans-IO
:class:`~smtpdup.protocol.ServerProtocol`, and hands the events that need a
verdict to a :class:`Backend` (the relay, or the sink). Replies to a
pipelined batch leave in one write, and only right before the session
blocks on a read. A session blocked on its client (a read, a write, the TLS
handshake) sets ``deadline``; the server's sweeper ends it with 421 4.4.2
once that passes (one sweep for every session, not a timer per wait).

It owns no policy and keeps no SMTP state: what to answer comes from the
protocol or the backend, and whether a transaction is open (a draining
server lets it finish) from the protocol's ``in_transaction``.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Protocol

from . import logs
from .protocol import (
    ConnectionClosed,
    DataAbort,
    DataChunk,
    DataEnd,
    DataStart,
    Hello,
    Limits,
    MailFrom,
    Quit,
    RcptTo,
    Reset,
    ServerProtocol,
    StartTls,
)
from .reply import IDLE_TIMEOUT, LOCAL_ERROR, SHUTTING_DOWN, Reply

log = logs.get("session")

# Bytes asked of the socket per read: large enough that a DATA stream
# arrives in few, large chunks (per-event cost is where Python pays).
RECV_BYTES = 256 * 1024


class Backend(Protocol):
    """What a session needs from whatever handles the mail."""

    def hello(self, name: str, extended: bool) -> None: ...
    def tls_started(self) -> None: ...
    def mail(self, sender: str, params: dict[str, str | None]) -> Reply: ...
    def rcpt(self, recipient: str, params: dict[str, str | None]) -> Reply: ...
    def data(self) -> Reply: ...
    def data_chunk(self, data: bytes) -> None: ...
    def data_end(self) -> Reply: ...
    def data_abort(self, reply: Reply) -> None: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...


class Drain(BaseException):
    """Thrown into an idle session when the server shuts down."""


class IdleTimeout(socket.timeout):
    """Thrown into a session whose client kept it waiting past its deadline."""


class Session:
    __slots__ = (
        "sock", "client_ip", "backend", "proto", "idle_timeout_seconds", "tls_context",
        "draining", "idle", "deadline", "_start_tls",
    )

    def __init__(
        self,
        sock: socket.socket,
        client_ip: str,
        backend: Backend,
        *,
        limits: Limits,
        domain: str,
        idle_timeout_seconds: float,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.sock = sock
        self.client_ip = client_ip
        self.backend = backend
        self.proto = ServerProtocol(limits, domain)
        self.idle_timeout_seconds = idle_timeout_seconds
        self.tls_context = tls_context
        self.draining = False
        self.idle = False  # blocked on a read with no transaction open
        # time.monotonic() by which the client must have answered, while
        # the session waits on it; 0.0 while it does not.
        self.deadline = 0.0
        self._start_tls = False

    def _waiting(self) -> None:
        self.deadline = time.monotonic() + self.idle_timeout_seconds

    def run(self) -> None:
        """Serve the connection until QUIT, close, timeout or drain."""
        sock = self.sock
        try:
            sock.settimeout(None)  # waits end by the deadline (see the module's docstring)
            self._serve()
        except Drain:
            self._last_words(SHUTTING_DOWN)
        except socket.timeout:
            self._last_words(IDLE_TIMEOUT)
        except (OSError, ssl.SSLError) as exc:
            log.debug("connection_lost", extra={"client": self.client_ip, "error": str(exc)})
        except Exception:
            # A bug: the client hears a temporary failure, never our text.
            log.exception("session_failed", extra={"client": self.client_ip})
            self._last_words(LOCAL_ERROR)
        finally:
            try:
                self.backend.close()
            except Drain:
                pass  # cut while closing: nothing is left to finish
            finally:
                self.sock.close()

    def _last_words(self, reply: Reply) -> None:
        self._waiting()
        try:
            self.sock.sendall(reply.to_bytes())
        except OSError:
            pass
        finally:
            self.deadline = 0.0

    def _serve(self) -> None:
        proto = self.proto
        pending = proto.greeting()
        while True:
            for event in proto.events():
                self._dispatch(event)
            pending += proto.data_to_send()  # the whole batch's replies, in order
            if pending:
                sent = self.sock.send(pending)  # one send() nearly always takes it all
                if sent < len(pending):
                    self._waiting()
                    self.sock.sendall(memoryview(pending)[sent:])
                    self.deadline = 0.0
                pending = b""
            if proto.closed:
                return
            if self._start_tls:
                self._wrap_tls()
                continue
            if self.draining and not proto.in_transaction:
                self._last_words(SHUTTING_DOWN)
                return
            self.idle = not proto.in_transaction
            self._waiting()
            try:
                data = self.sock.recv(RECV_BYTES)
            finally:
                self.idle = False
                self.deadline = 0.0
            proto.receive_data(data)

    def _dispatch(self, event: object) -> None:
        """Hand one event to the backend. A verdict goes to `proto.reply()`,
        which queues it for `data_to_send()` and moves the protocol's state."""
        backend = self.backend
        proto = self.proto
        match event:
            case DataChunk(data=data):
                backend.data_chunk(data)
            case MailFrom(sender=sender, params=params):
                proto.reply(backend.mail(sender, params))
            case RcptTo(recipient=recipient, params=params):
                proto.reply(backend.rcpt(recipient, params))
            case DataStart():
                proto.reply(backend.data())
            case DataEnd():
                proto.reply(backend.data_end())
            case DataAbort(reply=reply):
                backend.data_abort(reply)  # the protocol tells the client at its final dot
            case Reset():
                backend.reset()
            case Hello(name=name, extended=extended):
                backend.hello(name, extended)
            case StartTls():
                self._start_tls = True
            case Quit() | ConnectionClosed():
                pass

    def _wrap_tls(self) -> None:
        self._start_tls = False
        assert self.tls_context is not None
        self._waiting()
        try:
            self.sock = self.tls_context.wrap_socket(self.sock, server_side=True)
        finally:
            self.deadline = 0.0
        self.proto.tls_started()
        self.backend.tls_started()
