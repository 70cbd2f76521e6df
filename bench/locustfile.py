"""Locust load for an SMTP relay (smtpdup, or anything that speaks SMTP).

locust is not a dependency of smtpdup; install it where you run the load:

    pip install locust
    locust -f bench/locustfile.py --host smtp://127.0.0.1:2525 \\
        --headless --users 50 --spawn-rate 10 --run-time 2m

Every simulated user holds one SMTP connection (smtplib) and sends one
message per task, then waits ``SMTP_BENCH_WAIT_SECONDS`` (default 0.5-1.5 s).
Each message is reported to locust as a request of type "SMTP" named
``sendmail <size> x<recipients>``, with its response time (MAIL to the reply
after the final dot), its size and, on failure, the exception (a refused
recipient, a 4xx/5xx reply, a dropped connection). Locust's statistics,
charts and CSV output (``--csv PREFIX``) then work as for HTTP.

Knobs (environment variables):

    SMTP_BENCH_SIZE_BYTES   body size (default 1024)
    SMTP_BENCH_RECIPIENTS   recipients per message (default 1)
    SMTP_BENCH_REUSE        1: keep the connection between messages (default);
                            0: connect, EHLO, send, QUIT for every message
    SMTP_BENCH_SENDER       envelope sender (default bench@example.com)
    SMTP_BENCH_DOMAIN       recipients are <n>rcpt@DOMAIN (default example.net)
    SMTP_BENCH_WAIT_SECONDS "MIN-MAX" seconds between a user's messages
                            (default 0.5-1.5; "0" for none: a closed loop)

``--host`` takes ``smtp://HOST:PORT``, ``HOST:PORT`` or ``HOST`` (port 25).
Importing this file without locust installed fails with an ImportError
that says so: it is a load driver, never imported by smtpdup or its tests.
"""

from __future__ import annotations

import os
import smtplib
import socket
import time

try:
    from locust import User, between, constant, task
except ImportError as exc:  # pragma: no cover - depends on the operator's machine
    raise ImportError("bench/locustfile.py needs locust: pip install locust") from exc

SIZE_BYTES = int(os.environ.get("SMTP_BENCH_SIZE_BYTES", "1024"))
RECIPIENTS = int(os.environ.get("SMTP_BENCH_RECIPIENTS", "1"))
REUSE = os.environ.get("SMTP_BENCH_REUSE", "1") not in ("0", "no", "false")
SENDER = os.environ.get("SMTP_BENCH_SENDER", "bench@example.com")
DOMAIN = os.environ.get("SMTP_BENCH_DOMAIN", "example.net")
TIMEOUT_SECONDS = 30.0


def _wait_time():
    text = os.environ.get("SMTP_BENCH_WAIT_SECONDS", "0.5-1.5")
    low, _, high = text.partition("-")
    return between(float(low), float(high)) if high else constant(float(low))


def _message(size_bytes: int) -> bytes:
    """Headers and ``size_bytes`` of 80-byte CRLF lines (no line starts with
    a dot: smtplib would dot-stuff it, costing the load generator time)."""
    line = b"x" * 78 + b"\r\n"
    lines, rest = divmod(size_bytes, len(line))
    body = line * lines + ((b"y" * max(rest - 2, 0) + b"\r\n") if rest else b"")
    headers = (
        f"From: <{SENDER}>\r\nTo: <rcpt@{DOMAIN}>\r\nSubject: locust\r\n"
        f"Message-ID: <locust@{SENDER.rpartition('@')[2] or 'example.com'}>\r\n\r\n"
    ).encode("ascii")
    return headers + body


def _parse_host(host: str | None) -> tuple[str, int]:
    text = (host or "127.0.0.1:2525").strip()
    for prefix in ("smtp://", "tcp://"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    text = text.rstrip("/")
    if text.startswith("["):  # [v6]:port
        address, _, port = text[1:].partition("]:")
        return address, int(port or 25)
    address, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    return address, int(port or 25)


class SmtpUser(User):
    """One SMTP client; see the module docstring for the knobs."""

    wait_time = _wait_time()
    host = "smtp://127.0.0.1:2525"

    def on_start(self) -> None:
        self.address = _parse_host(self.host)
        self.content = _message(SIZE_BYTES)
        self.recipients = (
            [f"rcpt@{DOMAIN}"] if RECIPIENTS == 1 else [f"{n}rcpt@{DOMAIN}" for n in range(1, RECIPIENTS + 1)]
        )
        self.request_name = f"sendmail {SIZE_BYTES}B x{RECIPIENTS}"
        self.smtp: smtplib.SMTP | None = None

    def on_stop(self) -> None:
        self._close(polite=True)

    def _connect(self) -> smtplib.SMTP:
        smtp = smtplib.SMTP(self.address[0], self.address[1], local_hostname="locust.example",
                            timeout=TIMEOUT_SECONDS)
        # Lockstep commands meet delayed ACKs: without this, ~40 ms each.
        smtp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        smtp.ehlo()
        return smtp

    def _close(self, polite: bool) -> None:
        smtp, self.smtp = self.smtp, None
        if smtp is None:
            return
        try:
            if polite:
                smtp.quit()
            else:
                smtp.close()
        except (OSError, smtplib.SMTPException):
            smtp.close()

    @task
    def send(self) -> None:
        exception: BaseException | None = None
        started = time.perf_counter()
        try:
            if self.smtp is None:
                self.smtp = self._connect()
                started = time.perf_counter() if REUSE else started
            refused = self.smtp.sendmail(SENDER, self.recipients, self.content)
            if refused:
                exception = smtplib.SMTPRecipientsRefused(refused)
        except (OSError, smtplib.SMTPException) as exc:
            exception = exc
            self._close(polite=False)
        elapsed_ms = (time.perf_counter() - started) * 1000
        self.environment.events.request.fire(
            request_type="SMTP",
            name=self.request_name,
            response_time=elapsed_ms,
            response_length=len(self.content),
            exception=exception,
            context={},
        )
        if not REUSE:
            self._close(polite=True)
