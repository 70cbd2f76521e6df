"""The listening side: accept, admit, serve, drain, reload.

:class:`SmtpServer` wraps a gevent ``StreamServer``. It admits a connection
only from ``smtp.allowed_networks`` (554 5.7.1 otherwise) and below
``smtp.max_connections`` (421 4.7.0 otherwise), answering those itself:
``spawn=Pool(n)`` would silently stop accepting instead. Sessions run in
plain greenlets, tracked so that a drain can wait for them and then end them.

:func:`run_relay` wires a whole relay process: spool, scheduler, server,
metrics endpoint and signals (SIGTERM/SIGINT drain, SIGHUP reload).
"""

from __future__ import annotations

import resource
import signal
import socket
import time
from collections.abc import Callable

import gevent
from gevent.event import Event
from gevent.server import StreamServer

from . import config as config_module
from . import logs, metrics, notify
from .blocking import log_hub_errors
from .config import Config, ConfigError
from .delivery import Scheduler
from .preflight import check_ca_file, server_tls_context
from .protocol import Limits
from .relay import Relay
from .reply import ACCESS_DENIED, SHUTTING_DOWN, TOO_MANY_CONNECTIONS
from .session import Backend, Drain, Session
from .spool import Spool

log = logs.get("server")

# How often a drain looks whether the last sessions have finished.
DRAIN_POLL_SECONDS = 0.05
# At most this long, at shutdown, for backup deliveries in flight.
BACKUP_STOP_SECONDS = 5.0


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
        config: Config,
        backend_factory: Callable[[str], Backend],
        *,
        listener: socket.socket | None = None,
    ) -> None:
        self.backend_factory = backend_factory
        self.sessions: dict[Session, gevent.Greenlet] = {}
        self.draining = False
        self.reconfigure(config)
        listen = config.smtp.listen
        # Plain greenlets: a Pool would cost each idle session ~800 bytes,
        # and ``sessions`` already tracks them for the drain.
        self._server = StreamServer(
            listener if listener is not None else (listen.host, listen.port),
            self._handle,
        )

    def reconfigure(self, config: Config) -> None:
        """Apply a new configuration to sessions that start from now on."""
        tls_context = server_tls_context(config)
        self.config = config
        self.tls_context = tls_context
        self.limits = limits_for(config, tls_context is not None)

    @property
    def address(self) -> tuple[str, int]:
        return self._server.address[:2]

    def start(self) -> None:
        self._server.start()
        log.info("listening", extra={"address": f"{self.address[0]}:{self.address[1]}"})

    def _handle(self, sock: socket.socket, address: tuple) -> None:
        client_ip = address[0]
        smtp = self.config.smtp
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


def raise_fd_limit() -> None:
    """Lift the soft open-files limit to the hard one: every connection and
    every backup session is a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


class RelayService:
    """A whole relay in this process: spool, scheduler, SMTP server and
    metrics endpoint. ``run_relay`` drives it from signals; tests drive it
    directly."""

    def __init__(
        self,
        config: Config,
        *,
        listener: socket.socket | None = None,
        share: tuple[int, int] = (0, 1),
        serve_metrics: bool = True,
    ) -> None:
        """``listener``, ``share`` and ``serve_metrics`` are for a worker
        process (see workers.py): an inherited listening socket, its share
        of the pending copies, and no metrics endpoint of its own (the
        supervisor serves every worker's). A single process recovers the
        spool itself; workers find it recovered by the supervisor."""
        self.config = config
        self.spool = Spool(config.relay.spool_dir)
        self.recovered_files = self.spool.recover() if share == (0, 1) else 0
        self.share = share
        self.serve_metrics = serve_metrics
        self.scheduler = Scheduler(config, self.spool)
        self.relay = Relay(config, self.spool, self.scheduler.submit, self.scheduler.flow_delay)
        self.server = SmtpServer(config, self.relay.session, listener=listener)
        self.draining = False
        self._http = None

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    def start(self) -> None:
        """Listen and deliver; the pending copies in the spool are indexed
        in the background meanwhile."""
        config = self.config
        metrics.declare_destinations(b.name for b in config.relay.destination_backups)
        metrics.record_config_load(True)
        self.server.start()
        if config.metrics.listen is not None and self.serve_metrics:
            try:
                self._http = metrics.serve(config.metrics.listen, ready=lambda: not self.draining)
            except OSError:
                self.server.drain(0)
                raise
        self.scheduler.start(self.share)
        log.info("started", extra={
            "version": _version(), "recovered_files": self.recovered_files,
            "primary": config.relay.destination_primary.name if config.relay.destination_primary else None,
            "backups": [b.name for b in config.relay.destination_backups],
        })

    def reload(self, new: Config) -> None:
        """Apply a new configuration without dropping sessions. Raises
        ConfigError (the old configuration stays) for an unusable one."""
        check_ca_file(new)
        self.server.reconfigure(new)
        old, self.config = self.config, new
        self.relay.reconfigure(new)
        self.scheduler.config = new
        metrics.declare_destinations(b.name for b in new.relay.destination_backups)
        if new.smtp.listen != old.smtp.listen or new.relay.spool_dir != old.relay.spool_dir:
            log.warning("reload_needs_restart", extra={"keys": "smtp.listen, relay.spool_dir"})
        log.info("reloaded", extra={"backups": [b.name for b in new.relay.destination_backups]})

    def stop(self, grace_seconds: float | None = None) -> None:
        """Drain sessions, stop deliveries; the spool keeps what is pending."""
        self.draining = True
        grace = self.config.smtp.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        log.info("draining", extra={"sessions": len(self.server.sessions), "grace_seconds": grace})
        self.server.drain(grace)
        self.relay.pool.close()
        # Deliveries in flight get a moment to finish (else they are simply
        # tried again after the restart: at-least-once).
        self.scheduler.stop(timeout=min(grace, BACKUP_STOP_SECONDS))
        if self._http is not None:
            self._http.stop(timeout=1)
        log.info("stopped", extra={"pending_copies": self.scheduler.pending_count()})


def run_relay(
    config: Config,
    *,
    ready: Callable[[SmtpServer], None] | None = None,
    load_config: Callable[[], Config] | None = None,
) -> int:
    """Run the relay until SIGTERM/SIGINT; returns the exit status.

    ``load_config`` builds the configuration again on SIGHUP (default: the
    same file and the process environment). Raises SpoolError or
    ConfigError (exit 2 in cli) for problems found at start, and OSError
    when a listening address cannot be bound.
    """
    raise_fd_limit()
    log_hub_errors()
    service = RelayService(config)
    service.start()
    if ready is not None:
        ready(service.server)
    stop = Event()

    def reload() -> None:
        notify.reloading()
        try:
            new = load_config() if load_config is not None else config_module.load(service.config.path)
            service.reload(new)
        except ConfigError as exc:
            log.error("reload_failed", extra={"error": str(exc)})
            metrics.record_config_load(False)
            notify.ready(f"{_status(service)}; last reload rejected: {exc}")
            return
        metrics.record_config_load(True)
        logs.setup(new.log.level, new.log.format)
        notify.ready(_status(service))

    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(reload))
    # Listening, delivering, and the signals handled: systemd (Type=notify)
    # may start dependants, and stop or reload us.
    notify.ready(_status(service))
    stop.wait()
    notify.stopping()
    service.stop()
    return 0


def _status(service: RelayService) -> str:
    host, port = service.address
    return f"relaying on {host}:{port}"


def _version() -> str:
    from . import __version__

    return __version__
