"""The listening side: accept, admit, serve, drain, reload.

:class:`SmtpServer` wraps a gevent ``StreamServer``. It admits a connection
only from ``smtp.allowed_networks`` (554 5.7.1 otherwise) and below
``smtp.max_connections`` (421 4.7.0 otherwise), answering those itself:
``spawn=Pool(n)`` would silently stop accepting instead. Sessions run in
plain greenlets, tracked so that a drain can wait for them and then end them,
and so that one sweeper ends those whose client kept them waiting past
``smtp.idle_timeout_seconds`` (a timer per wait would cost every idle
connection a Timeout and its watcher, about 500 bytes, and every read the
time to arm and cancel it).

It knows sessions, not what they serve: the relay (service.py wires it) and
the sink (cli.py) hand it their session factory.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import gevent
from gevent.server import StreamServer

from . import logs, metrics
from .config import Config, Current
from .preflight import server_tls_context
from .protocol import Limits
from .reply import ACCESS_DENIED, SHUTTING_DOWN, TOO_MANY_CONNECTIONS
from .session import Backend, Drain, IdleTimeout, Session

log = logs.get("server")

# How often a drain looks whether the last sessions have finished.
DRAIN_POLL_SECONDS = 0.05
# How often the sweeper looks for sessions past their deadline: a quarter
# of smtp.idle_timeout_seconds, within these bounds; a silent client is
# cut between the timeout and the timeout plus this.
SWEEP_MIN_SECONDS = 0.05
SWEEP_MAX_SECONDS = 1.0


def limits_for(config: Config, tls: bool) -> Limits:
    smtp = config.smtp
    return Limits(
        max_message_bytes=smtp.max_message_bytes,
        max_recipients=smtp.max_recipients,
        bare_newline=smtp.bare_newline,
        require_tls=smtp.require_tls,
        tls_available=tls,
    )


class SmtpServer:
    def __init__(
        self,
        current: Current,
        backend_factory: Callable[[str], Backend],
        *,
        listener: socket.socket | None = None,
    ) -> None:
        """``current`` holds the configuration in force (``current.config``),
        read anew for every connection."""
        self.current = current
        self.backend_factory = backend_factory
        self.sessions: dict[Session, gevent.Greenlet] = {}
        self.draining = False
        self._sweeper: gevent.Greenlet | None = None
        self.reconfigure(current.config)
        listen = current.config.smtp.listen
        # Plain greenlets: a Pool would cost each idle session ~800 bytes,
        # and ``sessions`` already tracks them for the drain.
        self._server = StreamServer(
            listener if listener is not None else (listen.host, listen.port),
            self._handle,
        )

    def reconfigure(self, config: Config) -> None:
        """Build what ``config`` needs beyond its values, the STARTTLS
        context and the protocol limits, for sessions that start from now
        on; a reload calls this before it swaps ``current.config``. Raises
        ConfigError for a certificate or key that cannot be used."""
        tls_context = server_tls_context(config)
        self.tls_context = tls_context
        self.limits = limits_for(config, tls_context is not None)

    @property
    def address(self) -> tuple[str, int]:
        return self._server.address[:2]

    def start(self) -> None:
        self._server.start()
        self._sweeper = gevent.spawn(self._sweep)
        log.info("listening", extra={"address": f"{self.address[0]}:{self.address[1]}"})

    def _sweep(self) -> None:
        """End the sessions past their deadline (Session.deadline), forever."""
        loop = gevent.get_hub().loop
        while True:
            timeout = self.current.config.smtp.idle_timeout_seconds
            gevent.sleep(min(SWEEP_MAX_SECONDS, max(SWEEP_MIN_SECONDS, timeout / 4)))
            now = time.monotonic()
            for session, greenlet in list(self.sessions.items()):
                if 0.0 < session.deadline <= now:
                    loop.run_callback(_expire, session, greenlet)

    def _handle(self, sock: socket.socket, address: tuple) -> None:
        client_ip = address[0]
        smtp = self.current.config.smtp
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        refusal = None
        if not smtp.allows(client_ip):
            refusal, outcome = ACCESS_DENIED, "denied_network"
        elif self.draining:
            refusal, outcome = SHUTTING_DOWN, "draining"
        elif len(self.sessions) >= smtp.max_connections:
            refusal, outcome = TOO_MANY_CONNECTIONS, "over_limit"
        if refusal is not None:
            metrics.CONNECTIONS.labels(outcome).inc()
            log.info("connection_refused", extra={"client": client_ip, "reply": str(refusal)})
            try:
                sock.sendall(refusal.to_bytes())
            except OSError:
                pass
            sock.close()
            return
        metrics.CONNECTIONS.labels("accepted").inc()
        session = Session(
            sock,
            client_ip,
            self.backend_factory(client_ip),
            limits=self.limits,
            domain=smtp.domain,
            idle_timeout_seconds=smtp.idle_timeout_seconds,
            tls_context=self.tls_context,
        )
        self.sessions[session] = gevent.getcurrent()
        metrics.ACTIVE_SESSIONS.inc()
        try:
            session.run()
        finally:
            del self.sessions[session]
            metrics.ACTIVE_SESSIONS.dec()

    def drain(self, grace_seconds: float) -> None:
        """Stop accepting; idle sessions get 421 4.3.2 now, sessions in a
        transaction may finish it within ``grace_seconds``, then are cut
        (before their final dot: their clients never heard 250)."""
        self.draining = True
        self._server.close()
        deadline = time.monotonic() + grace_seconds
        told: set[Session] = set()
        while self.sessions and time.monotonic() < deadline:
            for session, greenlet in list(self.sessions.items()):
                session.draining = True
                if session.idle and session not in told:
                    told.add(session)
                    greenlet.kill(Drain, block=False)
            gevent.sleep(DRAIN_POLL_SECONDS)
        for session, greenlet in list(self.sessions.items()):
            if session not in told:
                greenlet.kill(Drain, block=False)
        gevent.joinall(list(self.sessions.values()), timeout=1.0)
        if self._sweeper is not None:
            self._sweeper.kill(block=False)


def _expire(session: Session, greenlet: gevent.Greenlet) -> None:
    """In the hub: throw IdleTimeout into a session still past its deadline
    (it may have been woken by its client since the sweep saw it)."""
    if 0.0 < session.deadline <= time.monotonic() and not greenlet.dead:
        greenlet.throw(IdleTimeout())
