"""Prometheus metrics of smtpdup and the HTTP endpoint that serves them.

This module owns the metric objects (all named ``smtpdup_*``) and the small
HTTP server for ``/metrics``, ``/healthz`` and ``/readyz``. Other modules
import the objects and update them; they never create metrics of their own.

The objects are module singletons registered once in ``REGISTRY``, a registry
of our own rather than prometheus_client's global one: nothing a library
registers globally leaks into our output. Besides the ``smtpdup_*`` series it
carries the standard ``process_*`` series (memory, CPU, descriptors, start
time) every Prometheus user expects. Several relays in one process (tests)
share the counters; tests assert on differences, not totals.

With ``smtp.workers`` > 1 each worker writes its values to prometheus_client's
multiprocess directory and the supervisor serves ``supervisor_registry()``:
the workers' values combined as each gauge's ``multiprocess_mode`` says, and
``process_*`` summed over the supervisor and its workers (one relay, one set
of series, as an operator reads them).

Label values must be bounded: ``outcome`` takes the values listed below and
``destination`` the configured backups in display form (password masked,
never a recipient or sender).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol

import gevent.pywsgi
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from smtpdup import __version__, logs

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

# The *_created series double the output and tell an operator nothing that
# process_start_time would not; this flag is process-wide in prometheus_client.
disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)
# process_* of this process (Linux /proc; elsewhere it yields nothing).
ProcessCollector(registry=REGISTRY)

CONNECTION_OUTCOMES = ("accepted", "denied_network", "over_limit", "draining")
TRANSACTION_OUTCOMES = ("accepted", "rejected", "deferred", "aborted")
BACKUP_OUTCOMES = ("delivered", "deferred", "dead")
SPOOL_STATES = ("pending", "dead")

CONNECTIONS = Counter(
    "smtpdup_connections",
    "Inbound SMTP connections by outcome",
    ["outcome"],
    registry=REGISTRY,
)
# multiprocess_mode: how gauges of several worker processes (smtp.workers)
# add up; ignored with one process.
ACTIVE_SESSIONS = Gauge(
    "smtpdup_active_sessions",
    "Inbound SMTP sessions open now",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
TRANSACTIONS = Counter(
    "smtpdup_transactions",
    "Inbound transactions by outcome: accepted (primary 2xx), rejected (5xx: the primary's, or "
    "smtpdup's for content too big, bare CR/LF or NUL), deferred (4xx), aborted (client gone, spool failure)",
    ["outcome"],
    registry=REGISTRY,
)
PRIMARY_LATENCY = Histogram(
    "smtpdup_primary_latency_seconds",
    "Time from the final dot to the primary's reply",
    # From a loopback sink (~0.5 ms) to a primary that runs content filters
    # (seconds); relay.timeout_seconds defaults to 10, beyond that is +Inf.
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
# Counts attempts, not copies: a copy deferred three times then delivered
# is 3 deferred + 1 delivered. BACKUP_DELIVERIES is the older name of the
# same object (callers keep working).
BACKUP_ATTEMPTS = BACKUP_DELIVERIES = Counter(
    "smtpdup_backup_attempts",
    "Backup delivery attempts by destination and outcome: delivered, deferred (will retry), dead",
    ["destination", "outcome"],
    registry=REGISTRY,
)
INFLOW_DELAY = Counter(
    "smtpdup_inflow_delay_seconds",
    "Time new transactions waited before MAIL because backup delivery was behind "
    "and the relay short of CPU (inflow control, as Postfix's in_flow_delay)",
    registry=REGISTRY,
)
BACKUP_REFUSED_RECIPIENTS = Counter(
    "smtpdup_backup_refused_recipients",
    "Recipients a backup refused although the primary accepted them",
    ["destination"],
    registry=REGISTRY,
)
SPOOL_COPIES = Gauge(
    "smtpdup_spool_copies",
    "Backup copies in the spool by state: pending, dead",
    ["state"],
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
SPOOL_OLDEST_AGE = Gauge(
    "smtpdup_spool_oldest_age_seconds",
    "Age of the oldest pending backup copy (0 when none is pending)",
    registry=REGISTRY,
    multiprocess_mode="livemax",
)

# Per backup: what the migration is waiting for. Set by the scheduler
# (delivery.py) from its own view of the spool; a worker counts its share,
# so the supervisor adds pending copies and takes the oldest age.
BACKUP_PENDING_COPIES = Gauge(
    "smtpdup_backup_pending_copies",
    "Backup copies waiting for delivery (not dead), by destination",
    ["destination"],
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
BACKUP_OLDEST_PENDING_AGE = Gauge(
    "smtpdup_backup_oldest_pending_age_seconds",
    "Age of the oldest backup copy waiting for delivery (0 when none), by destination",
    ["destination"],
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
BUILD_INFO = Gauge(
    "smtpdup_build_info",
    "Always 1; the label says which smtpdup runs",
    ["version"],
    registry=REGISTRY,
    multiprocess_mode="max",
)
BUILD_INFO.labels(version=__version__).set(1)
# As Prometheus's own prometheus_config_last_reload_*: alert on == 0.
# Several workers: 0 when any live process failed the last reload.
CONFIG_RELOAD_SUCCESSFUL = Gauge(
    "smtpdup_config_last_reload_successful",
    "1 when the last configuration load (start or SIGHUP) succeeded, 0 when it was rejected",
    registry=REGISTRY,
    multiprocess_mode="livemin",
)
CONFIG_RELOAD_TIME = Gauge(
    "smtpdup_config_last_reload_timestamp_seconds",
    "Unix time of the last configuration load (start or SIGHUP), successful or not",
    registry=REGISTRY,
    multiprocess_mode="livemax",
)

# Series that exist from the start read 0 instead of being absent, so that
# rate() and alerts work before the first event of each kind.
for _outcome in CONNECTION_OUTCOMES:
    CONNECTIONS.labels(outcome=_outcome)
for _outcome in TRANSACTION_OUTCOMES:
    TRANSACTIONS.labels(outcome=_outcome)
for _state in SPOOL_STATES:
    SPOOL_COPIES.labels(state=_state)


def declare_destinations(destinations: Iterable[str]) -> None:
    """Create the zero-valued series of each backup ``destination`` (display
    form, password masked). Idempotent; call at start and after a reload.

    The per-destination gauges of a backup no longer configured are
    removed (a frozen "pending" would page somebody forever); its counters
    stay, as counters do.
    """
    names = list(destinations)
    for destination in names:
        for outcome in BACKUP_OUTCOMES:
            BACKUP_ATTEMPTS.labels(destination=destination, outcome=outcome)
        BACKUP_REFUSED_RECIPIENTS.labels(destination=destination)
        BACKUP_PENDING_COPIES.labels(destination=destination)
        BACKUP_OLDEST_PENDING_AGE.labels(destination=destination)
    for gauge in (BACKUP_PENDING_COPIES, BACKUP_OLDEST_PENDING_AGE):
        for (destination,) in _label_values(gauge):
            if destination not in names:
                gauge.remove(destination)


def _label_values(metric: Any) -> list[tuple[str, ...]]:
    # prometheus_client has no public listing of a metric's children.
    with metric._lock:
        return list(metric._metrics)


def record_config_load(successful: bool) -> None:
    """Set the last-reload gauges: at start (successful) and after each SIGHUP."""
    CONFIG_RELOAD_SUCCESSFUL.set(1 if successful else 0)
    CONFIG_RELOAD_TIME.set(time.time())


class ProcessTreeCollector:
    """The ``process_*`` series of several processes added up (a supervisor
    and its workers: ``pids()`` lists them, the supervisor first).

    Memory, CPU time and open descriptors are sums; the start time and the
    descriptor limit are the first process's. The CPU time of a worker that
    died leaves the sum with it, which ``rate()`` reads as a counter reset.
    """

    def __init__(self, pids: Callable[[], Iterable[int]]) -> None:
        self._pids = pids

    def collect(self) -> Iterable[Metric]:
        totals: dict[str, Metric] = {}
        for index, pid in enumerate(self._pids()):
            for family in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():
                value = family.samples[0].value
                merged = totals.get(family.name)
                if merged is None:
                    kind = CounterMetricFamily if family.type == "counter" else GaugeMetricFamily
                    totals[family.name] = kind(family.name, family.documentation, value=value)
                elif family.name not in ("process_start_time_seconds", "process_max_fds"):
                    sample = merged.samples[0]
                    merged.samples[0] = sample._replace(value=sample.value + value)
        return list(totals.values())


def supervisor_registry(metrics_dir: str, pids: Callable[[], Iterable[int]]) -> CollectorRegistry:
    """What the supervisor of several workers serves: every worker's (and
    its own) ``smtpdup_*`` values from ``metrics_dir``, and the ``process_*``
    series of ``pids()`` added up. Needs ``PROMETHEUS_MULTIPROC_DIR`` set
    before prometheus_client was imported (workers.prepare_metrics)."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=metrics_dir)
    registry.register(ProcessTreeCollector(pids))
    return registry


class HostPort(Protocol):
    """What ``serve`` needs of ``smtpdup.destination.HostPort``."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


_log = logs.get("metrics")

_TEXT = "text/plain; charset=utf-8"


def serve(
    listen: HostPort,
    ready: Callable[[], bool],
    healthy: Callable[[], bool] = lambda: True,
    registry: Any = None,
) -> gevent.pywsgi.WSGIServer:
    """Start serving ``/metrics``, ``/healthz`` and ``/readyz`` on ``listen``.

    ``registry`` defaults to this module's REGISTRY; the supervisor of
    several workers passes one that collects every worker's values.

    ``/healthz`` answers 200 "ok" while ``healthy()`` is true, else 503;
    ``/readyz`` answers 200 "ready" while ``ready()`` is true, else 503
    "draining". A callable that raises counts as false (and is logged).
    Other paths get 404, other methods than GET/HEAD 405.

    Returns the started server (port 0 picks a free port: read
    ``server.server_port``); the caller stops it with ``server.stop()``.
    Raises ``OSError`` when the address cannot be bound.
    """
    host = listen.host
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # gevent wants a bare IPv6 address
    app = _App(ready=ready, healthy=healthy, registry=registry)
    # log=None: no access log (scrapes every few seconds are noise);
    # error_log: gevent wraps a Logger and logs at ERROR.
    server = gevent.pywsgi.WSGIServer((host, listen.port), app, log=None, error_log=logs.get("metrics.http"))
    server.start()
    _log.info("metrics_listening", extra={"listen": f"{listen.host}:{server.server_port}"})
    return server


class _App:
    """The WSGI application behind ``serve``."""

    def __init__(self, ready: Callable[[], bool], healthy: Callable[[], bool], registry: Any = None) -> None:
        self._registry = REGISTRY if registry is None else registry
        self._ready = ready
        self._healthy = healthy
        self._routes: dict[str, Callable[[], tuple[str, str, bytes]]] = {
            "/metrics": self._metrics,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
        }

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        route = self._routes.get(environ.get("PATH_INFO", ""))
        method = environ.get("REQUEST_METHOD", "GET")
        headers: list[tuple[str, str]] = []
        if route is None:
            status, content_type, body = "404 Not Found", _TEXT, b"not found"
        elif method not in ("GET", "HEAD"):
            status, content_type, body = "405 Method Not Allowed", _TEXT, b"method not allowed"
            headers.append(("Allow", "GET, HEAD"))
        else:
            status, content_type, body = route()
        headers += [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ]
        start_response(status, headers)
        return [b""] if method == "HEAD" else [body]

    def _metrics(self) -> tuple[str, str, bytes]:
        return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self._registry)

    def _healthz(self) -> tuple[str, str, bytes]:
        if _ask(self._healthy, "healthz"):
            return "200 OK", _TEXT, b"ok"
        return "503 Service Unavailable", _TEXT, b"unhealthy"

    def _readyz(self) -> tuple[str, str, bytes]:
        if _ask(self._ready, "readyz"):
            return "200 OK", _TEXT, b"ready"
        return "503 Service Unavailable", _TEXT, b"draining"


def _ask(check: Callable[[], Any], name: str) -> bool:
    try:
        return bool(check())
    except Exception:  # a broken probe must answer 503, not crash the server
        _log.exception("probe_failed", extra={"probe": name})
        return False
