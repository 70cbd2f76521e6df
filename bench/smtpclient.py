"""A small, raw-socket SMTP client for the benchmark (never imported by smtpdup).

Lockstep like Postfix's smtp-source (no PIPELINING): every command waits for
its reply. Content is built once per size in wire form (CRLF lines, nothing to
dot-stuff), so a transaction costs the client a handful of syscalls and no
per-line work: on a 2-core machine the load client must not be what limits
the server it measures.

Used by ``latency.py`` (paced transactions), ``run.py`` (idle connections,
the 100 MiB message, and the fallback load generator when smtp-source is
missing).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets; a reply of many
# lines (EHLO) stays far below this. A peer sending more is broken.
MAX_REPLY_BYTES = 64 * 1024
RECV_BYTES = 64 * 1024
# Content lines: 78 characters + CRLF, the RFC 5322 recommendation.
LINE = b"x" * 78 + b"\r\n"


class SmtpError(Exception):
    """An unexpected reply, or the peer closed/broke the session."""


def make_content(size_bytes: int, subject: str = "smtpdup bench") -> bytes:
    """Wire-form content of about ``size_bytes`` body bytes: a few headers,
    then 80-byte lines; ends with CRLF (the final dot is not included)."""
    headers = (
        "From: <bench@example.com>\r\n"
        "To: <rcpt@example.net>\r\n"
        f"Subject: {subject}\r\n"
        "Message-ID: <bench@example.com>\r\n"
        "\r\n"
    ).encode("ascii")
    lines, rest = divmod(max(size_bytes, 0), len(LINE))
    tail = (b"y" * max(rest - 2, 0) + b"\r\n") if rest else b""
    return headers + LINE * lines + tail


@dataclass
class Reply:
    code: int
    text: bytes


class SmtpConnection:
    """One client session; every wait is bounded by ``timeout_seconds``."""

    def __init__(self, host: str, port: int, *, timeout_seconds: float = 30.0, greet: bool = True) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_seconds)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = bytearray()
        if greet:
            self.expect(self.reply(), 220, "greeting")

    def reply(self) -> Reply:
        """Read one (possibly multi-line) reply."""
        buf = self._buffer
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                if len(buf) > MAX_REPLY_BYTES:
                    raise SmtpError("reply too long")
                chunk = self.sock.recv(RECV_BYTES)
                if not chunk:
                    raise SmtpError("connection closed by the server")
                buf += chunk
                continue
            line = bytes(buf[start:end + 1])
            if len(line) >= 4 and line[3:4] == b"-":
                start = end + 1  # continuation line
                continue
            text = bytes(buf[:end + 1])
            del buf[:end + 1]
            try:
                return Reply(int(line[:3]), text)
            except ValueError:
                raise SmtpError(f"malformed reply {line[:80]!r}") from None

    @staticmethod
    def expect(reply: Reply, code: int, what: str) -> Reply:
        if reply.code != code:
            raise SmtpError(f"{what}: expected {code}, got {reply.text[:200]!r}")
        return reply

    def command(self, line: bytes) -> Reply:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def ehlo(self, name: str = "bench.example") -> None:
        self.expect(self.command(b"EHLO " + name.encode("ascii")), 250, "EHLO")

    def transaction(self, sender: str, recipients: list[str], content: bytes) -> Reply:
        """MAIL, RCPTs, DATA, content and the final dot, in lockstep.
        Returns the reply to the final dot; raises SmtpError otherwise."""
        self.expect(self.command(f"MAIL FROM:<{sender}>".encode()), 250, "MAIL")
        for recipient in recipients:
            self.expect(self.command(f"RCPT TO:<{recipient}>".encode()), 250, "RCPT")
        self.expect(self.command(b"DATA"), 354, "DATA")
        self.sock.sendall(content + b".\r\n")
        return self.expect(self.reply(), 250, "end of data")

    def send_large(self, sender: str, recipients: list[str], block: bytes, blocks: int) -> Reply:
        """One transaction whose content is ``block`` repeated ``blocks``
        times (``block`` must end with CRLF), streamed without building it."""
        self.expect(self.command(f"MAIL FROM:<{sender}>".encode()), 250, "MAIL")
        for recipient in recipients:
            self.expect(self.command(f"RCPT TO:<{recipient}>".encode()), 250, "RCPT")
        self.expect(self.command(b"DATA"), 354, "DATA")
        for _ in range(blocks):
            self.sock.sendall(block)
        self.sock.sendall(b".\r\n")
        return self.expect(self.reply(), 250, "end of data")

    def quit(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
            self.reply()
        except (OSError, SmtpError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def recipients_for(count: int) -> list[str]:
    """Recipient addresses as smtp-source makes them (a number prepended)."""
    if count == 1:
        return ["rcpt@example.net"]
    return [f"{n}rcpt@example.net" for n in range(1, count + 1)]


def load(
    host: str,
    port: int,
    *,
    messages: int,
    sessions: int,
    size_bytes: int,
    recipients: int,
    reuse: bool,
    timeout_seconds: float = 30.0,
    deadline_seconds: float = 600.0,
) -> dict:
    """A closed-loop load like ``smtp-source -s sessions -m messages``
    (``-d`` when ``reuse``): the fallback when smtp-source is missing.
    Returns {"seconds", "sent", "errors"}; slower than smtp-source (Python,
    the GIL), so its numbers are not comparable with smtp-source's."""
    content = make_content(size_bytes)
    rcpts = recipients_for(recipients)
    lock = threading.Lock()
    state = {"left": messages, "sent": 0, "errors": 0, "first_error": ""}

    def take() -> bool:
        with lock:
            if state["left"] <= 0:
                return False
            state["left"] -= 1
            return True

    def worker() -> None:
        conn: SmtpConnection | None = None
        while take():
            try:
                if conn is None:
                    conn = SmtpConnection(host, port, timeout_seconds=timeout_seconds)
                    conn.ehlo()
                conn.transaction("bench@example.com", rcpts, content)
                with lock:
                    state["sent"] += 1
            except (OSError, SmtpError) as exc:
                with lock:
                    state["errors"] += 1
                    state["first_error"] = state["first_error"] or str(exc)
                if conn is not None:
                    conn.close()
                conn = None
                continue
            if not reuse:
                conn.quit()
                conn = None
        if conn is not None:
            conn.quit()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(sessions)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + deadline_seconds
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return {
        "seconds": time.perf_counter() - started,
        "sent": state["sent"],
        "errors": state["errors"],
        "first_error": state["first_error"],
    }
