"""Shared test harness: real SMTP peers on 127.0.0.1, bounded waits.

gevent's monkey-patching comes first, as in ``smtpdup/cli.py``: the relay
runs in this process (as greenlets) for most tests, the upstream servers
run as separate processes (aiosmtpd under asyncio), and every process a
test starts is stopped by its PID in a fixture's teardown.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import smtplib  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from smtpdup import config as config_module  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PEER = Path(__file__).resolve().parent / "peers" / "upstream.py"

# Upper bounds for every wait in the suite.
START_TIMEOUT = 15.0
WAIT_TIMEOUT = 10.0


def wait_until(condition, timeout: float = WAIT_TIMEOUT, interval: float = 0.02, what: str = "condition"):
    """Poll ``condition`` until it returns something truthy (returned) or
    ``timeout`` passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stored:
    """A message as an upstream server received it."""

    mail_from: str
    rcpt_tos: list
    mail_options: list
    ehlo: str
    content: bytes

    @property
    def body_without_trace(self) -> bytes:
        """The content less smtpdup's Received header (its first 3 lines)."""
        assert self.content.startswith(b"Received: "), self.content[:80]
        head, _, rest = self.content.partition(b"\r\n\t")
        _, _, rest = rest.partition(b"\r\n\t")
        _, _, rest = rest.partition(b"\r\n")
        return rest


class Upstream:
    """An aiosmtpd server in its own process, scripted by a rules file."""

    def __init__(self, directory: Path, name: str, smtputf8: bool = True, pipelining: bool = True) -> None:
        self.directory = directory / name
        self.store = self.directory / "store"
        self.store.mkdir(parents=True)
        self.rules_path = self.directory / "rules.json"
        self.port_file = self.directory / "port"
        self.smtputf8 = smtputf8
        self.pipelining = pipelining
        self.proc: subprocess.Popen | None = None
        self._port = 0
        self.set_rules()

    def start(self) -> "Upstream":
        """Start the process; ``port`` waits until it listens, so several
        upstreams start in parallel."""
        if self.port_file.exists():
            self.port_file.unlink()
        args = [sys.executable, str(PEER), "--store", str(self.store), "--rules", str(self.rules_path),
                "--port-file", str(self.port_file)]
        if not self.smtputf8:
            args.append("--no-smtputf8")
        if not self.pipelining:
            args.append("--no-pipelining")
        self._port = 0
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    @property
    def port(self) -> int:
        if not self._port:
            proc = self.proc
            assert proc is not None, "upstream not started"
            wait_until(lambda: self.port_file.exists() or proc.poll() is not None, START_TIMEOUT,
                       what="upstream to listen")
            assert proc.poll() is None, "upstream server exited"
            self._port = int(self.port_file.read_text())
        return self._port

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.port  # a stopped upstream keeps its (now dead) address
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=START_TIMEOUT)
        self.proc = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_rules(self, **rules) -> None:
        tmp = self.rules_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rules))
        tmp.replace(self.rules_path)

    def messages(self) -> list[Stored]:
        result = []
        for meta_path in sorted(self.store.glob("*.json")):
            meta = json.loads(meta_path.read_text())
            content = meta_path.with_suffix(".eml").read_bytes()
            result.append(Stored(meta["mail_from"], meta["rcpt_tos"], meta["mail_options"], meta["ehlo"], content))
        return result

    def count(self) -> int:
        return len(list(self.store.glob("*.json")))

    def wait_for(self, n: int, timeout: float = WAIT_TIMEOUT) -> list[Stored]:
        wait_until(lambda: self.count() >= n, timeout, what=f"{n} message(s) at {self.directory.name}")
        return self.messages()


@pytest.fixture
def upstreams(tmp_path):
    """Factory: ``upstreams("primary")`` starts an upstream server; all are
    stopped (by PID) at teardown."""
    started: list[Upstream] = []

    def make(name: str, smtputf8: bool = True, start: bool = True, pipelining: bool = True) -> Upstream:
        upstream = Upstream(tmp_path, name, smtputf8, pipelining)
        started.append(upstream)
        return upstream.start() if start else upstream

    yield make
    for upstream in started:
        upstream.stop()


def relay_environ(tmp_path: Path, primary: str, backups: list[str] = (), **keys) -> dict[str, str]:
    """A relay configuration as environment variables: loopback, port 0,
    spool under tmp_path, quick retries; ``keys`` like relay_timeout_seconds=2."""
    empty = tmp_path / "empty-config.yaml"
    empty.write_text("{}\n")
    environ = {
        "SMTP_DUP_CONFIG": str(empty),
        "SMTP_DUP_SMTP_LISTEN": "127.0.0.1:0",
        "SMTP_DUP_METRICS_LISTEN": "",
        "SMTP_DUP_RELAY_DESTINATION_PRIMARY": primary,
        "SMTP_DUP_RELAY_DESTINATION_BACKUPS": ",".join(backups),
        "SMTP_DUP_RELAY_SPOOL_DIR": str(tmp_path / "spool"),
        "SMTP_DUP_RELAY_TIMEOUT_SECONDS": "5",
        "SMTP_DUP_RELAY_RETRY_INITIAL_SECONDS": "0.2",
        "SMTP_DUP_RELAY_RETRY_MAX_INTERVAL_SECONDS": "0.5",
        "SMTP_DUP_LOG_LEVEL": "debug",
    }
    environ.update({f"SMTP_DUP_{k.upper()}": str(v) for k, v in keys.items()})
    return environ


@pytest.fixture
def relay(tmp_path):
    """Factory: ``relay(primary, [backups], **keys)`` runs a relay in this
    process (greenlets) and returns its RelayService; stopped at teardown."""
    from smtpdup.server import RelayService

    services = []

    def make(primary: str, backups=(), **keys):
        config = config_module.load(None, relay_environ(tmp_path, primary, list(backups), **keys))
        service = RelayService(config)
        service.start()
        services.append(service)
        return service

    yield make
    for service in services:
        service.stop(grace_seconds=0)


def client(service, timeout: float = 10.0) -> smtplib.SMTP:
    host, port = service.address
    smtp = smtplib.SMTP(host, port, timeout=timeout)
    return smtp


MESSAGE = (
    b"From: alice@example.com\r\n"
    b"To: bob@example.com\r\n"
    b"Subject: test\r\n"
    b"\r\n"
    b"Hello.\r\n"
    b".A line that starts with a dot.\r\n"
)
