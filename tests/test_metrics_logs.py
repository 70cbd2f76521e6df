# tests/conftest.py applies gevent's monkey-patching for the whole suite.
# Until it exists (and when this module runs alone), patch here, and only if
# nobody did: the metrics server is a greenlet, and an unpatched urllib would
# block the only thread it runs in.
from gevent import monkey

if not monkey.is_module_patched("socket"):
    monkey.patch_all()

import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import datetime  # noqa: E402

import pytest  # noqa: E402

from smtpdup import __version__, logs, metrics  # noqa: E402


@dataclass(frozen=True)
class Listen:
    """Stands in for smtpdup.destination.HostPort (same .host and .port)."""

    host: str
    port: int


@pytest.fixture
def log_stream():
    stream = io.StringIO()
    yield stream
    root = logging.getLogger(logs.ROOT)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.NOTSET)


@pytest.fixture
def serve():
    servers = []

    def start(**kwargs):
        kwargs.setdefault("ready", lambda: True)
        server = metrics.serve(Listen("127.0.0.1", 0), **kwargs)
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    try:
        yield start
    finally:
        for server in servers:
            server.stop(timeout=1)


def fetch(url, method="GET"):
    """Return (status, content type, body), HTTP errors included."""
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read()


# --- logs -----------------------------------------------------------------


def test_json_line_has_leading_fields_and_extras(log_stream):
    logs.setup(level="info", fmt="json", stream=log_stream)
    logs.get("relay").info("transaction", extra={"queue_id": "Q1", "code": 250, "sender": "a@b.example"})

    lines = log_stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert list(record)[:4] == ["time", "level", "logger", "event"]
    assert record["event"] == "transaction"
    assert record["level"] == "info"
    assert record["logger"] == "smtpdup.relay"
    assert record["queue_id"] == "Q1" and record["code"] == 250 and record["sender"] == "a@b.example"
    assert record["time"].endswith("Z")
    assert datetime.fromisoformat(record["time"].replace("Z", "+00:00")).utcoffset().total_seconds() == 0
    # No LogRecord internals leak into the line.
    assert not {"msg", "args", "levelno", "pathname", "message"} & set(record)


def test_json_extra_cannot_shadow_leading_fields(log_stream):
    logs.setup(fmt="json", stream=log_stream)
    logs.get("t").warning("spool_full", extra={"event": "other", "level": "x"})
    record = json.loads(log_stream.getvalue())
    assert record["event"] == "spool_full" and record["level"] == "warning"


def test_json_exception_is_one_line_with_exc_info(log_stream):
    logs.setup(fmt="json", stream=log_stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logs.get("t").exception("delivery_failed", extra={"queue_id": "Q2"})
    lines = log_stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["level"] == "error" and "RuntimeError: boom" in record["exc_info"]


def test_setup_twice_replaces_handler_and_level(log_stream):
    first = io.StringIO()
    logs.setup(level="info", fmt="json", stream=first)
    logs.setup(level="warning", fmt="json", stream=log_stream)
    log = logs.get("t")
    log.info("hidden")
    log.warning("shown")
    assert first.getvalue() == ""
    assert [json.loads(line)["event"] for line in log_stream.getvalue().splitlines()] == ["shown"]
    assert len(logging.getLogger(logs.ROOT).handlers) == 1


def test_text_format_is_one_readable_line(log_stream):
    logs.setup(level="debug", fmt="text", stream=log_stream)
    logs.get("session").debug("connect", extra={"client": "127.0.0.1:4711", "reply": "250 2.0.0 ok\r\nx", "n": 3})
    line = log_stream.getvalue()
    assert line.count("\n") == 1
    time, level, event, rest = line.rstrip("\n").split(" ", 3)
    assert time.endswith("Z") and level == "debug" and event == "connect"
    assert rest == 'client=127.0.0.1:4711 reply="250 2.0.0 ok\\r\\nx" n=3'


def test_bad_level_or_format_raises():
    with pytest.raises(ValueError):
        logs.setup(level="loud")
    with pytest.raises(ValueError):
        logs.setup(fmt="xml")


def test_get_is_under_smtpdup():
    assert logs.get("relay").name == "smtpdup.relay"


# --- metrics --------------------------------------------------------------


def test_metrics_endpoint_serves_registry(serve):
    base = serve()
    metrics.CONNECTIONS.labels(outcome="accepted").inc()
    status, content_type, body = fetch(base + "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    text = body.decode()
    assert 'smtpdup_connections_total{outcome="accepted"}' in text
    # Series declared up front read 0 before their first event.
    assert 'smtpdup_transactions_total{outcome="aborted"}' in text
    assert 'smtpdup_spool_copies{state="dead"}' in text
    assert "smtpdup_primary_latency_seconds_bucket" in text
    # Our own registry: the standard process_* series, no python_gc_*, no *_created.
    assert "python_gc_" not in text and "_created" not in text
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
                 "process_start_time_seconds"):
        assert f"\n{name} " in text, name
    assert f'smtpdup_build_info{{version="{__version__}"}} 1.0' in text


def test_every_metric_is_named_smtpdup_or_process():
    names = [m.name for m in metrics.REGISTRY.collect()]
    ours = [name for name in names if name.startswith("smtpdup_")]
    assert ours and all(name.startswith(("smtpdup_", "process_")) for name in names)
    assert {"process_resident_memory_bytes", "process_open_fds"} <= set(names)


def test_counter_increment_is_visible(serve):
    base = serve()

    def value():
        for line in fetch(base + "/metrics")[2].decode().splitlines():
            if line.startswith('smtpdup_connections_total{outcome="over_limit"}'):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError("series missing")

    before = value()
    metrics.CONNECTIONS.labels(outcome="over_limit").inc()
    assert value() == before + 1


def test_declare_destinations_creates_zero_series(serve):
    base = serve()
    metrics.declare_destinations(["backup.example:25"])
    text = fetch(base + "/metrics")[2].decode()
    assert 'smtpdup_backup_attempts_total{destination="backup.example:25",outcome="dead"} 0.0' in text
    assert 'smtpdup_backup_refused_recipients_total{destination="backup.example:25"} 0.0' in text
    assert 'smtpdup_backup_pending_copies{destination="backup.example:25"} 0.0' in text
    assert 'smtpdup_backup_oldest_pending_age_seconds{destination="backup.example:25"} 0.0' in text
    assert "backup_deliveries" not in text
    assert metrics.BACKUP_DELIVERIES is metrics.BACKUP_ATTEMPTS  # the older name still works


def test_declare_destinations_drops_gauges_of_a_removed_backup(serve):
    base = serve()
    metrics.declare_destinations(["old.example:25", "kept.example:25"])
    metrics.BACKUP_PENDING_COPIES.labels(destination="old.example:25").set(3)
    metrics.declare_destinations(["kept.example:25"])
    text = fetch(base + "/metrics")[2].decode()
    assert 'smtpdup_backup_pending_copies{destination="old.example:25"}' not in text
    assert 'smtpdup_backup_oldest_pending_age_seconds{destination="old.example:25"}' not in text
    assert 'smtpdup_backup_pending_copies{destination="kept.example:25"} 0.0' in text
    # Counters stay: they count what happened.
    assert 'smtpdup_backup_attempts_total{destination="old.example:25",outcome="delivered"}' in text


def test_process_tree_collector_adds_up_processes():
    import os

    from prometheus_client import CollectorRegistry, generate_latest

    def series(pids):
        registry = CollectorRegistry()
        registry.register(metrics.ProcessTreeCollector(lambda: pids))
        return {line.split(" ")[0]: float(line.split(" ")[1])
                for line in generate_latest(registry).decode().splitlines() if not line.startswith("#")}

    alone, two = series([os.getpid()]), series([os.getpid(), 1])
    one = series([1])
    assert two["process_open_fds"] >= alone["process_open_fds"] + one["process_open_fds"] - 5
    assert two["process_resident_memory_bytes"] > alone["process_resident_memory_bytes"]
    assert two["process_start_time_seconds"] == alone["process_start_time_seconds"]  # the first's


def test_readyz_follows_callable(serve):
    state = {"ready": True}
    base = serve(ready=lambda: state["ready"])
    assert fetch(base + "/readyz")[::2] == (200, b"ready")
    state["ready"] = False
    assert fetch(base + "/readyz")[::2] == (503, b"draining")
    state["ready"] = True
    assert fetch(base + "/readyz")[0] == 200


def test_healthz(serve):
    healthy = {"ok": True}
    base = serve(healthy=lambda: healthy["ok"])
    assert fetch(base + "/healthz")[::2] == (200, b"ok")
    healthy["ok"] = False
    assert fetch(base + "/healthz")[0] == 503


def test_raising_probe_answers_503(serve):
    def broken():
        raise RuntimeError("probe bug")

    base = serve(ready=broken)
    assert fetch(base + "/readyz")[0] == 503


def test_unknown_path_is_404_and_post_is_405(serve):
    base = serve()
    assert fetch(base + "/")[0] == 404
    assert fetch(base + "/metrics/extra")[0] == 404
    assert fetch(base + "/metrics", method="POST")[0] == 405


def test_head_has_no_body(serve):
    base = serve()
    status, _, body = fetch(base + "/healthz", method="HEAD")
    assert status == 200 and body == b""


# --- the JSON log of a running relay ----------------------------------------


def _records(stream) -> list[dict]:
    """Every line of ``stream`` parsed as JSON (a line that is not fails the test)."""
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _operations_section() -> str:
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    start = readme.index("\n## Operations")
    return readme[start:readme.index("\n## ", start + 1)]


def test_transaction_and_backup_attempt_lines_carry_the_documented_fields(upstreams, relay, log_stream):
    import ipaddress
    import smtplib

    from conftest import MESSAGE, wait_until

    logs.setup(level="info", fmt="json", stream=log_stream)
    primary, backup = upstreams("primary"), upstreams("backup")
    service = relay(primary.address, [backup.address])
    host, port = service.address
    with smtplib.SMTP(host, port, timeout=10) as smtp:
        smtp.sendmail("alice@example.com", ["bob@example.com", "carol@example.com"], MESSAGE)
    backup.wait_for(1)
    wait_until(lambda: any(r["event"] == "backup_attempt" for r in _records(log_stream)), what="backup_attempt line")

    records = _records(log_stream)
    transaction = next(r for r in records if r["event"] == "transaction")
    attempt = next(r for r in records if r["event"] == "backup_attempt")
    assert set(logs.TRANSACTION_FIELDS) <= set(transaction), set(logs.TRANSACTION_FIELDS) - set(transaction)
    assert set(logs.BACKUP_ATTEMPT_FIELDS) <= set(attempt), set(logs.BACKUP_ATTEMPT_FIELDS) - set(attempt)
    # client is the peer's IP address, no port (as documented).
    assert ipaddress.ip_address(transaction["client"]) == ipaddress.ip_address("127.0.0.1")
    # size: the content as the client sent it (dot-stuffed), as smtp.max_message_bytes counts it.
    assert transaction["recipients"] == 2 and transaction["size"] == len(MESSAGE.replace(b"\r\n.", b"\r\n.."))
    assert transaction["sender"] == "alice@example.com" and transaction["reply"].startswith("250")
    assert attempt["queue_id"] == transaction["queue_id"] and attempt["destination"] == backup.address
    assert attempt["outcome"] == "delivered" and attempt["delivered"] == 2
    # Never the content.
    assert "Hello." not in log_stream.getvalue()

    # The README lists every one of these fields.
    section = _operations_section()
    missing = [f for f in (*logs.TRANSACTION_FIELDS, *logs.BACKUP_ATTEMPT_FIELDS) if f"`{f}`" not in section]
    assert not missing, f"README Operations does not list {missing}"


HUB_ERRORS = r"""
from gevent import monkey; monkey.patch_all()
import gevent
from smtpdup import logs
from smtpdup.blocking import blocking, log_hub_errors

logs.setup("info", "json")
log_hub_errors()

def read_spool_file():
    with open("/nonexistent/smtpdup-spool/msg/0123", "rb") as f:
        return f.read()

try:
    blocking(read_spool_file)
except OSError:
    pass  # the caller handles it, as delivery.py does
gevent.spawn(lambda: 1 / 0).join()
print("done", flush=True)
"""


def test_gevent_error_printing_becomes_one_json_line_each(tmp_path):
    """A threadpool task's and a greenlet's traceback: one JSON record each
    on stderr, nothing else (gevent would print raw multi-line tracebacks)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", HUB_ERRORS], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0 and run.stdout == "done\n", run.stderr
    lines = run.stderr.splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON
    assert [(r["event"], r["level"]) for r in records] == [
        ("threadpool_task_failed", "warning"), ("greenlet_failed", "error")]
    assert "FileNotFoundError" in records[0]["exc_info"] and "read_spool_file" in records[0]["function"]
    assert "ZeroDivisionError" in records[1]["exc_info"]
