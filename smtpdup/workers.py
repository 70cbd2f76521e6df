"""Several relay processes on one listening socket (``smtp.workers`` > 1).

CPython runs one core per process; a relay process spends its CPU on
parsing and on syscalls, so a second process on a second core nearly
doubles what a machine relays. The supervisor here

* binds ``smtp.listen`` once and recovers the spool once (before any
  worker exists, so no worker's files in ``tmp/`` are ever taken for a
  crash's leftovers);
* forks the workers: each is a full relay (``RelayService``) on the
  inherited socket, with its own scheduler and its own share of the pending
  copies (by queue id), so no copy is claimed twice; a message stays with
  the worker that received it;
* serves ``/metrics`` (every worker's values, summed through
  prometheus_client's multiprocess mode), ``/healthz`` and ``/readyz``;
* forwards SIGTERM/SIGINT (drain) and SIGHUP (reload, after checking the
  new configuration itself), restarts a worker that died, and exits 0 once
  every worker has drained;
* speaks for the relay to systemd (notify.py): READY=1 once every worker
  has said, through a pipe, that it listens and delivers.

``prepare_metrics`` must run before prometheus_client is first imported.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable

import gevent
from gevent.event import Event

from . import logs, notify
from .blocking import log_hub_errors
from .config import Config

log = logs.get("workers")

# How often the supervisor looks for workers that exited.
REAP_INTERVAL_SECONDS = 0.2
# A worker that dies is started again after this pause.
RESTART_DELAY_SECONDS = 1.0
# Beyond the drain grace, how long a worker may take to exit before SIGKILL.
EXIT_MARGIN_SECONDS = 15.0
LISTEN_BACKLOG = 1024
# How long the supervisor waits for every worker to start before telling
# systemd READY=1 anyway (a worker that fails is restarted and logged).
READY_TIMEOUT_SECONDS = 60.0

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_metrics() -> str:
    """Point prometheus_client at a fresh directory for the workers' values;
    returns it. Call before anything imports prometheus_client."""
    directory = tempfile.mkdtemp(prefix="smtpdup-metrics-")
    os.environ[_MULTIPROC_ENV] = directory
    return directory


def _listen(config: Config) -> socket.socket:
    listen = config.smtp.listen
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((listen.host, listen.port))
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def _worker(config: Config, listener: socket.socket, index: int, count: int,
            load_config: Callable[[], Config], started: int) -> None:
    """The body of a worker process; never returns. Writes a byte to the
    pipe ``started`` once it listens and delivers."""
    from .service import RelayService, reload_config

    status = 1
    # Only the supervisor speaks to systemd (NotifyAccess=main).
    os.environ.pop(notify.ENV, None)
    log_hub_errors()
    try:
        service = RelayService(config, listener=listener, share=(index, count), serve_metrics=False)
        service.start()
        try:
            os.write(started, b"+")
        except OSError:
            pass  # the supervisor is gone; SIGTERM follows
        stop = Event()
        gevent.signal_handler(signal.SIGTERM, stop.set)
        gevent.signal_handler(signal.SIGINT, lambda: None)  # the supervisor decides
        gevent.signal_handler(
            signal.SIGHUP, lambda: gevent.spawn(reload_config, load_config, service.reload, worker=index)
        )
        stop.wait()
        service.stop()
        status = 0
    except Exception:
        log.exception("worker_failed", extra={"worker": index})
    finally:
        os._exit(status)


def run_workers(config: Config, metrics_dir: str, load_config: Callable[[], Config]) -> int:
    """Supervise ``config.smtp.workers`` relay processes until SIGTERM;
    returns the exit status. Raises OSError if the address cannot be bound,
    SpoolError if the spool is unusable."""
    from prometheus_client import multiprocess

    from . import metrics
    from .service import raise_fd_limit, reload_config
    from .spool import Spool

    raise_fd_limit()
    log_hub_errors()
    listener = _listen(config)
    started_read, started_write = os.pipe()
    removed = Spool(config.relay.spool_dir).recover()
    count = config.smtp.workers
    children: dict[int, int] = {}  # pid -> worker index
    # The supervisor's own: a worker forked later must not act on its
    # signals nor answer its metrics scrapes.
    watchers: list = []
    servers: list = []
    greenlets: list = []

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:
            for watcher in watchers:
                watcher.cancel()
            for server in servers:
                server.close()
            for greenlet in greenlets:
                greenlet.kill(block=False)
            _worker(state["config"], listener, index, count, load_config, started_write)
        children[pid] = index

    state = {"draining": False, "config": config}
    metrics.record_config_load(True)

    for index in range(count):
        spawn(index)
    log.info("workers_started", extra={
        "workers": count, "pids": sorted(children), "recovered_files": removed,
        "address": f"{config.smtp.listen.host}:{listener.getsockname()[1]}",
    })

    http = None
    if config.metrics.listen is not None:
        registry = metrics.supervisor_registry(metrics_dir, lambda: [os.getpid(), *children])
        http = metrics.serve(config.metrics.listen, ready=lambda: not state["draining"], registry=registry)
        servers.append(http)
    address = f"{config.smtp.listen.host}:{listener.getsockname()[1]}"
    summary = f"relaying on {address} with {count} workers"
    waiter = gevent.spawn(_await_workers, started_read, count, lambda: notify.ready(summary))
    greenlets.append(waiter)

    def terminate() -> None:
        if state["draining"]:
            return
        state["draining"] = True
        notify.stopping()
        log.info("draining", extra={"workers": sorted(children)})
        for pid in list(children):
            _signal(pid, signal.SIGTERM)

    def apply(new: Config) -> None:
        state["config"] = new
        for pid in list(children):
            _signal(pid, signal.SIGHUP)

    watchers.append(gevent.signal_handler(signal.SIGTERM, terminate))
    watchers.append(gevent.signal_handler(signal.SIGINT, terminate))
    watchers.append(gevent.signal_handler(signal.SIGHUP, reload_config, load_config, apply, lambda: summary))

    deadline = None
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if state["draining"]:
                grace = state["config"].smtp.shutdown_grace_seconds
                deadline = deadline or time.monotonic() + grace + EXIT_MARGIN_SECONDS
                if time.monotonic() > deadline:
                    for child in list(children):
                        _signal(child, signal.SIGKILL)
            gevent.sleep(REAP_INTERVAL_SECONDS)
            continue
        index = children.pop(pid, None)
        multiprocess.mark_process_dead(pid, metrics_dir)
        if index is None:
            continue
        if not state["draining"]:
            log.error("worker_died", extra={"worker": index, "pid": pid, "status": status})
            gevent.sleep(RESTART_DELAY_SECONDS)
            spawn(index)
    waiter.kill(block=True, timeout=1)
    if http is not None:
        http.stop(timeout=1)
    listener.close()
    os.close(started_read)
    os.close(started_write)
    shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("stopped", extra={"workers": count})
    return 0


def _await_workers(started: int, count: int, then: Callable[[], object]) -> None:
    """Call ``then`` once ``count`` workers have written to the pipe
    ``started`` (each once it listens), or after READY_TIMEOUT_SECONDS."""
    from gevent.os import make_nonblocking, nb_read

    make_nonblocking(started)
    seen = 0
    with gevent.Timeout(READY_TIMEOUT_SECONDS, False):
        while seen < count:
            chunk = nb_read(started, count)
            if not chunk:
                break
            seen += len(chunk)
    if seen < count:
        log.warning("workers_slow_to_start", extra={"started": seen, "workers": count})
    then()
    # Workers restarted later write too: keep the pipe drained.
    while nb_read(started, 64):
        pass


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
