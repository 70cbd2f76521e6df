"""Prometheus metrics of smtpdup and the HTTP endpoint that serves them.

This module owns the metric objects (all named ``smtpdup_*``) and the small
HTTP server for ``/metrics``, ``/healthz`` and ``/readyz``. Other modules
import the objects and update them; they never create metrics of their own.

The objects are module singletons registered once in ``REGISTRY``, a registry
of our own rather than prometheus_client's global one: importing this module
twice (tests, reloads) cannot raise "Duplicated timeseries", and nothing a
library registers globally leaks into our output. Several relays in one
process (tests) share the counters; tests assert on differences, not totals.

Label values must be bounded: ``outcome`` takes the values listed below and
``destination`` the configured backups in display form (password masked,
never a recipient or sender).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol

import gevent.pywsgi
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from smtpdup import logs

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

# The *_created series double the output and tell an operator nothing that
# process_start_time would not; this flag is process-wide in prometheus_client.
disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)

CONNECTION_OUTCOMES = ("accepted", "denied_network", "over_limit")
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
BACKUP_DELIVERIES = Counter(
    "smtpdup_backup_deliveries",
    "Backup delivery attempts by destination and outcome: delivered, deferred (will retry), dead",
    ["destination", "outcome"],
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
    form, password masked). Idempotent; call at start and after a reload."""
    for destination in destinations:
        for outcome in BACKUP_OUTCOMES:
            BACKUP_DELIVERIES.labels(destination=destination, outcome=outcome)
        BACKUP_REFUSED_RECIPIENTS.labels(destination=destination)


class HostPort(Protocol):
    """What ``serve`` needs of ``smtpdup.config.HostPort``."""

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
