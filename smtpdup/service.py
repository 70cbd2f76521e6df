"""A whole relay process, wired: spool, scheduler, relay, SMTP server,
metrics endpoint and signals.

:class:`RelayService` builds and runs the parts in this process (tests
drive it directly; a worker process runs one, see workers.py);
:func:`run_relay` drives it from signals: SIGTERM/SIGINT drain, SIGHUP
reloads the configuration.
"""

from __future__ import annotations

import resource
import signal
import socket
from collections.abc import Callable

import gevent
from gevent.event import Event

from . import config as config_module
from . import logs, metrics, notify
from .blocking import log_hub_errors
from .config import Config, ConfigError, Current
from .delivery import Scheduler
from .preflight import check_ca_file
from .relay import Relay
from .server import SmtpServer
from .spool import Spool

log = logs.get("server")  # started, reloaded, stopped: the logger name operators already filter on

# At most this long, at shutdown, for backup deliveries in flight.
BACKUP_STOP_SECONDS = 5.0


def raise_fd_limit() -> None:
    """Lift the soft open-files limit to the hard one: every connection and
    every backup session is a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def reload_config(
    load: Callable[[], Config],
    apply: Callable[[Config], None],
    status: Callable[[], str] | None = None,
    **fields: object,
) -> None:
    """SIGHUP in any process: build the configuration again (``load``) and
    hand it to ``apply``; the new log level and format take effect too. A
    rejected one (ConfigError from either) is logged as reload_failed, with
    ``fields``, and counted; the configuration in force stays. ``status``
    is for the process that speaks to systemd: it hears RELOADING, then
    READY with that status line (and why a reload was rejected)."""
    if status is not None:
        notify.reloading()
    try:
        new = load()
        apply(new)
    except ConfigError as exc:
        log.error("reload_failed", extra={"error": str(exc), **fields})
        metrics.record_config_load(False)
        if status is not None:
            notify.ready(f"{status()}; last reload rejected: {exc}")
        return
    metrics.record_config_load(True)
    logs.setup(new.log.level, new.log.format)
    if status is not None:
        notify.ready(status())


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
        # The one holder of the configuration in force, shared by the
        # scheduler, the relay and the listener: see reload().
        self.current = Current(config)
        self.spool = Spool(config.relay.spool_dir)
        self.recovered_files = self.spool.recover() if share == (0, 1) else 0
        self.share = share
        self.serve_metrics = serve_metrics
        self.scheduler = Scheduler(self.current, self.spool)
        self.relay = Relay(self.current, self.spool, self.scheduler.submit, self.scheduler.flow_delay)
        self.server = SmtpServer(self.current, self.relay.session, listener=listener)
        self.draining = False
        self._http = None

    @property
    def config(self) -> Config:
        """The configuration in force."""
        return self.current.config

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
        ConfigError (the old configuration stays) for an unusable one.

        Every part reads the configuration from ``current``: one assignment
        replaces it for all. What is built from it is rebuilt here: the
        listener's TLS context and limits (first, as it may fail), the
        idle sessions to the primary, the size of the backup pool."""
        check_ca_file(new)
        self.server.reconfigure(new)
        old, self.current.config = self.current.config, new
        self.relay.pool.reconfigure()
        self.scheduler.reconfigure()
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
    load = load_config or (lambda: config_module.load(service.config.path))
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    gevent.signal_handler(
        signal.SIGHUP, lambda: gevent.spawn(reload_config, load, service.reload, lambda: _status(service))
    )
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
