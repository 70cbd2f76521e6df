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
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from smtpdup import config as config_module  # noqa: E402

from harness import (  # noqa: E402,F401  (re-exported: tests import these from conftest)
    ROOT,
    RUN_TIMEOUT,
    START_TIMEOUT,
    STOP_TIMEOUT,
    WAIT_TIMEOUT,
    Smtpdup,
    clean_environ,
    free_port,
    listening,
    run_smtpdup,
    wait_until,
)

PEER = Path(__file__).resolve().parent / "peers" / "upstream.py"


@pytest.fixture
def smtpdup(tmp_path):
    """Factory: ``smtpdup(environ, args=())`` -> a ``harness.Smtpdup`` not yet
    started, logging under tmp_path; every process it starts is killed (its
    process group, by PID) at teardown."""
    made: list[Smtpdup] = []

    def make(environ: dict[str, str], args=(), cwd: Path = ROOT, python: str = sys.executable) -> Smtpdup:
        process = Smtpdup(args, environ, tmp_path, f"smtpdup-{len(made)}", cwd, python)
        made.append(process)
        return process

    yield make
    for process in made:
        process.kill_all()


@pytest.fixture
def background(smtpdup, tmp_path):
    """Factory: ``background(args, **variables)`` starts ``smtpdup ARGS`` in
    tmp_path with these SMTP_DUP_* variables, not waiting for it."""

    def start(args: list[str], **variables: str) -> Smtpdup:
        return smtpdup(variables, args, cwd=tmp_path).start()

    return start


@dataclass
class Stored:
    """A message as an upstream server received it."""

    mail_from: str
    rcpt_tos: list
    mail_options: list
    ehlo: str
    content: bytes
    tls: bool = False  # the session was encrypted (STARTTLS or implicit TLS)
    auth_login: str | None = None  # the user the session authenticated as

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

    def __init__(self, directory: Path, name: str, smtputf8: bool = True, pipelining: bool = True,
                 tls: "Certificates | None" = None, smtps: bool = False, auth: str | None = None,
                 auth_mechanisms: str = "PLAIN,LOGIN", auth_in_clear: bool = False,
                 tls_max_version: str | None = None) -> None:
        """``tls``: offer STARTTLS with ``tls.cert``/``tls.key`` (``smtps``:
        implicit TLS instead); ``auth`` "user:password": accept that identity
        by AUTH (only once encrypted, unless ``auth_in_clear``)."""
        self.directory = directory / name
        self.store = self.directory / "store"
        self.store.mkdir(parents=True)
        self.rules_path = self.directory / "rules.json"
        self.port_file = self.directory / "port"
        self.smtputf8 = smtputf8
        self.pipelining = pipelining
        self.tls = tls
        self.smtps = smtps
        self.auth = auth
        self.auth_mechanisms = auth_mechanisms
        self.auth_in_clear = auth_in_clear
        self.tls_max_version = tls_max_version
        self.events_path = self.directory / "events.jsonl"
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
        if self.tls is not None:
            args += ["--tls-cert", str(self.tls.cert), "--tls-key", str(self.tls.key)]
            if self.smtps:
                args.append("--smtps")
            if self.tls_max_version:
                args += ["--tls-max-version", self.tls_max_version]
        if self.auth is not None:
            args += ["--auth", self.auth, "--auth-mechanisms", self.auth_mechanisms]
            if self.auth_in_clear:
                args.append("--auth-in-clear")
        args += ["--events", str(self.events_path)]
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
            result.append(Stored(meta["mail_from"], meta["rcpt_tos"], meta["mail_options"], meta["ehlo"], content,
                                 meta.get("tls", False), meta.get("auth_login")))
        return result

    def events(self) -> list[dict]:
        """Every command the server received so far, in order:
        ``{"command": "EHLO", "tls": False}`` (the verb only)."""
        if not self.events_path.exists():
            return []
        return [json.loads(line) for line in self.events_path.read_text().splitlines() if line.strip()]

    def commands(self) -> list[str]:
        return [event["command"] for event in self.events()]

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

    def make(name: str, smtputf8: bool = True, start: bool = True, pipelining: bool = True, **tls_auth) -> Upstream:
        upstream = Upstream(tmp_path, name, smtputf8, pipelining, **tls_auth)
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
    from smtpdup.service import RelayService

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


@dataclass
class Certificates:
    """A test CA and a server certificate it signed, for 127.0.0.1 and
    localhost; ``ca`` is what a client trusts."""

    ca: Path
    cert: Path
    key: Path
    ca_key: Path | None = None


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_certificates(directory: Path, name: str = "test", names: str = "IP:127.0.0.1,DNS:localhost",
                      signer: Certificates | None = None) -> Certificates:
    """A fresh CA (``name`` CA; or ``signer``'s) and a server certificate
    signed by it, valid two days for ``names`` (a subjectAltName); EC keys,
    so it is quick."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key, csr = directory / f"{name}-server.pem", directory / f"{name}-server.key", directory / f"{name}.csr"
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    if signer is not None:
        assert signer.ca_key is not None
        ca, ca_key = signer.ca, signer.ca_key
    else:
        ca, ca_key = directory / f"{name}-ca.pem", directory / f"{name}-ca.key"
        _openssl("req", "-x509", *ec, "-days", "2", "-subj", f"/CN={name} CA", "-keyout", str(ca_key),
                 "-out", str(ca), "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _openssl("req", *ec, "-subj", f"/CN={name} server", "-keyout", str(key), "-out", str(csr))
    extensions = directory / f"{name}-ext.cnf"
    extensions.write_text(f"subjectAltName={names}\nbasicConstraints=CA:FALSE\n"
                          "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-set_serial", str(int.from_bytes(os.urandom(8), "big")),
             "-days", "2", "-extfile", str(extensions), "-out", str(cert))
    return Certificates(ca, cert, key, ca_key)


@pytest.fixture(scope="session")
def certificates(tmp_path_factory) -> Certificates:
    """A CA and a server certificate for 127.0.0.1 (see make_certificates)."""
    return make_certificates(tmp_path_factory.mktemp("tls"), "trusted")


@pytest.fixture(scope="session")
def other_certificates(tmp_path_factory) -> Certificates:
    """Another CA and server certificate: not trusted by ``certificates.ca``."""
    return make_certificates(tmp_path_factory.mktemp("tls-other"), "untrusted")
