"""The one harness for processes the tests start: bounded waits, free
ports, and ``python -m smtpdup ...`` as a subprocess.

Plain Python, no gevent: ``conftest.py`` re-exports these names (after
gevent's monkey-patching) and turns ``Smtpdup`` into the ``smtpdup``
fixture; ``postfix_tools.py`` uses ``free_port`` and ``listening`` as well.
Every wait is bounded in time; every process is stopped by its PID (or its
process group, which is its own) at teardown.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Upper bounds for every wait in the suite.
START_TIMEOUT = 15.0
WAIT_TIMEOUT = 10.0
STOP_TIMEOUT = 30.0
# Bound on a command that should answer at once (`check`, `queue list`, `--help`).
RUN_TIMEOUT = 30.0


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
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """True if something accepts TCP connections on ``host``:``port``."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def clean_environ(**variables: str) -> dict[str, str]:
    """This process's environment less anything that configures smtpdup
    (SMTP_DUP_*, SMTPDUP_*, NOTIFY_SOCKET), plus ``variables``."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("SMTP_DUP_", "SMTPDUP_")) and k != "NOTIFY_SOCKET"}
    environ.update(variables)
    return environ


def json_lines(text: str) -> list[dict]:
    """The JSON objects among ``text``'s lines (a JSON log, less anything else)."""
    found = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            found.append(value)
    return found


def run_smtpdup(args, environ: dict[str, str] | None = None, cwd: Path = ROOT,
                timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    """``python -m smtpdup ARGS`` to its end, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "smtpdup", *args], cwd=cwd, env=clean_environ(**(environ or {})),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
    )


class Smtpdup:
    """``python -m smtpdup ARGS`` in a process group of its own (a supervisor
    and its workers go together), restartable; stdout and stderr go to one
    file per start (a pipe nobody reads would stall it)."""

    def __init__(self, args, environ: dict[str, str], directory: Path, name: str = "smtpdup",
                 cwd: Path = ROOT, python: str = sys.executable) -> None:
        self.args = list(args)
        self.python = python
        self.environ = clean_environ(**environ)
        self.directory = directory
        self.name = name
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.runs = 0
        self.started: list[subprocess.Popen] = []  # every start, for teardown

    @property
    def log_path(self) -> Path:
        """The output of the latest start."""
        return self.directory / f"{self.name}-{self.runs}.log"

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.environ["SMTP_DUP_SMTP_LISTEN"].rpartition(":")
        return host, int(port)

    def start(self, wait: str | None = None, crash_at: str = "", **popen) -> Smtpdup:
        """Start; ``wait``: None, "listening" (SMTP_DUP_SMTP_LISTEN accepts)
        or "started" (the relay's log says so). ``crash_at`` names a crash
        point (``SMTPDUP_TEST_CRASH_AT``, smtpdup/relay.py); ``popen``:
        more of ``subprocess.Popen``'s arguments (``preexec_fn``, ``user``)."""
        self.runs += 1
        environ = dict(self.environ)
        if crash_at:
            environ["SMTPDUP_TEST_CRASH_AT"] = crash_at
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [self.python, "-m", "smtpdup", *self.args], cwd=self.cwd, env=environ,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, **popen,
            )
        self.started.append(self.proc)
        proc = self.proc
        if wait == "listening":
            self.wait_listening(*self.address)
        elif wait == "started":
            wait_until(lambda: proc.poll() is not None or self.events_named("started"), START_TIMEOUT,
                       what="the relay to start")
        else:
            assert wait is None, wait
        return self

    def start_on_free_port(self, **start) -> Smtpdup:
        """Start the relay on a fresh free port and wait until it has
        started; a port taken between ``free_port`` and the relay's bind is
        retried with another."""
        for _ in range(5):
            self.environ["SMTP_DUP_SMTP_LISTEN"] = f"127.0.0.1:{free_port()}"
            self.start(wait="started", **start)
            if self.proc.poll() is None:
                return self
            text = self.log()
            if "in use" not in text:
                raise AssertionError(f"relay exited with {self.proc.returncode}: {text[-2000:]}")
        raise AssertionError("no free port for the relay after 5 tries")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict]:
        """The JSON log lines of the latest start so far."""
        return json_lines(self.log())

    def events_named(self, name: str) -> list[dict]:
        return [e for e in self.events() if e.get("event") == name]

    def _while_running(self, condition, what: str):
        def check():
            assert self.proc.poll() is None, f"smtpdup exited with {self.proc.returncode}:\n{self.log()}"
            return condition()

        return wait_until(check, START_TIMEOUT, what=what)

    def wait_for_event(self, name: str, count: int = 1) -> dict:
        """The ``count``-th log event ``name``, once logged."""
        return self._while_running(
            lambda: (self.events_named(name)[count - 1:] or [None])[0], f"log event {name} #{count}")

    def wait_listening(self, host: str, port: int) -> None:
        self._while_running(lambda: listening(port, host), f"smtpdup to listen on {host}:{port}")

    def wait_for_text(self, text: str) -> None:
        self._while_running(lambda: text in self.log(), repr(text))

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, as an operator stops it; its group gets SIGKILL after
        ``timeout``. Returns the exit status (None: never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill(group=True)
        return self.proc.returncode

    def kill(self, group: bool = False) -> int:
        """SIGKILL, as a crash would: the main process (``group``: all of its
        process group, its workers too); returns its exit status."""
        assert self.proc is not None and self.proc.poll() is None, "smtpdup is not running"
        if group:
            os.killpg(self.proc.pid, signal.SIGKILL)
        else:
            os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(timeout=START_TIMEOUT)

    def kill_all(self) -> None:
        """Teardown: SIGKILL the process group of every start still there."""
        for proc in self.started:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=START_TIMEOUT)
