"""FLOOR: the least a gevent relay can do for smtpdup's job, as a bench baseline.

What it does, per message, and nothing more: the client's MAIL, RCPT and
DATA forwarded in lockstep to the primary over a session taken from a pool
of idle ones (as smtpdup shares them across client sessions); the content
appended to one segment file and ``fdatasync``ed before the final dot goes
to the primary, one ``writev`` and one ``fdatasync`` in gevent's threadpool
for every message waiting (group commit: the cheapest durable spool); the
primary's verdict returned; a copy handed to each backup, whose sessions
stay open and take MAIL, RCPT and DATA in one write (RFC 2920) and the
content with its dot in a second, from memory.

What it leaves out, which smtpdup does: retries, per-copy state, the
journal, dead letters, recovery after a crash, reclaiming the segment,
parsing and checking of commands (no policy, no limits, no smuggling
defence), TLS, AUTH, logging and metrics. It is not a relay anyone should
run; it answers one question: how much of smtpdup's CPU per message is the
price of doing the job in Python on gevent at all (see README, "Targets,
and what is left").

With ``--no-spool`` it keeps nothing on disk: the cost of the sockets and
the event loop alone (the Go tool smtpdup replaces keeps nothing either).

    python bench/floor.py --listen PORT --primary PORT --backups PORT,PORT --spool DIR [--no-spool]
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402

import gevent  # noqa: E402
from gevent.event import AsyncResult, Event  # noqa: E402
from gevent.queue import Queue  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

HOST = "127.0.0.1"
WORKERS_PER_BACKUP = 4
EHLO_REPLY = b"250-floor\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 0\r\n"
END = b"\r\n.\r\n"


class Peer:
    """A socket read a line (reply or command) at a time from our own buffer."""

    __slots__ = ("sock", "buf")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def line(self) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line, self.buf = self.buf[: i + 1], self.buf[i + 1:]
                return line
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.buf += data

    def reply(self) -> bytes:
        """One whole reply, multi-line included."""
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return b"".join(lines)

    def content(self) -> bytes:
        """Up to and with the final dot (the DATA reply was just sent)."""
        start = 0
        self.buf = b"\r\n" + self.buf  # a message that is only ".\r\n"
        while True:
            i = self.buf.find(END, start)
            if i >= 0:
                content, self.buf = self.buf[2: i + 5], self.buf[i + 5:]
                return content
            start = max(0, len(self.buf) - 4)
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.buf += data


def connect(port: int) -> Peer:
    peer = Peer(socket.create_connection((HOST, port)))
    peer.reply()
    peer.sock.sendall(b"EHLO floor\r\n")
    peer.reply()
    return peer


class Floor:
    def __init__(self, primary: int, backups: list[int], spool: str | None) -> None:
        self.primary = primary
        self.idle: list[Peer] = []  # primary sessions between transactions
        self.queues = [Queue() for _ in backups]
        self.pool = gevent.get_hub().threadpool
        self.segment = None
        if spool is not None:
            self.segment = os.open(os.path.join(spool, "segment"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.waiting: list[tuple[bytes, AsyncResult]] = []
        self.wake = Event()
        gevent.spawn(self.committer)
        for port, queue in zip(backups, self.queues):
            for _ in range(WORKERS_PER_BACKUP):
                gevent.spawn(self.backup, port, queue)

    def write(self, contents: list[bytes]) -> None:
        os.writev(self.segment, contents)
        os.fdatasync(self.segment)

    def committer(self) -> None:
        """Group commit: every content waiting, one writev and one fdatasync."""
        while True:
            self.wake.wait()
            self.wake.clear()
            batch, self.waiting = self.waiting, []
            if batch:
                self.pool.apply(self.write, ([content for content, _ in batch],))
                for _, done in batch:
                    done.set()

    def store(self, content: bytes) -> None:
        if self.segment is not None:
            done = AsyncResult()
            self.waiting.append((content, done))
            self.wake.set()
            done.get()

    def handle(self, sock: socket.socket, _address: object) -> None:
        client = Peer(sock)
        primary: Peer | None = None
        sender = b""
        recipients: list[bytes] = []
        try:
            sock.sendall(b"220 floor ESMTP\r\n")
            while True:
                line = client.line()
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    sock.sendall(EHLO_REPLY)
                elif verb == b"QUIT":
                    sock.sendall(b"221 2.0.0 bye\r\n")
                    return
                elif verb in (b"MAIL", b"RCPT", b"DATA"):
                    if primary is None:
                        primary = self.idle.pop() if self.idle else connect(self.primary)
                    primary.sock.sendall(line)
                    reply = primary.reply()
                    if verb == b"MAIL":
                        sender, recipients = line, []
                    elif verb == b"RCPT" and reply[:1] == b"2":
                        recipients.append(line)
                    sock.sendall(reply)
                    if verb == b"DATA" and reply[:1] == b"3":
                        content = client.content()
                        self.store(content)
                        primary.sock.sendall(content)
                        reply = primary.reply()
                        if reply[:1] == b"2":
                            copy = (sender, recipients, content)
                            for queue in self.queues:
                                queue.put(copy)
                        self.idle.append(primary)  # the transaction is over
                        primary = None
                        sock.sendall(reply)
                else:
                    sock.sendall(b"250 2.0.0 ok\r\n")
        except (EOFError, OSError):
            pass
        finally:
            if primary is not None:  # left in a transaction
                primary.sock.close()

    def backup(self, port: int, queue: Queue) -> None:
        peer: Peer | None = None
        while True:
            copy = queue.get()
            sender, recipients, content = copy
            try:
                if peer is None:
                    peer = connect(port)
                peer.sock.sendall(b"".join([sender, *recipients, b"DATA\r\n"]))
                for _ in range(len(recipients) + 2):
                    peer.reply()
                peer.sock.sendall(content)
                peer.reply()
            except (EOFError, OSError):
                peer = None
                queue.put(copy)
                gevent.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--primary", type=int, required=True)
    parser.add_argument("--backups", required=True, help="comma-separated ports")
    parser.add_argument("--spool", required=True)
    parser.add_argument("--no-spool", action="store_true", help="keep nothing on disk")
    args = parser.parse_args()
    os.makedirs(args.spool, exist_ok=True)
    floor = Floor(args.primary, [int(p) for p in args.backups.split(",") if p], None if args.no_spool else args.spool)
    StreamServer((HOST, args.listen), floor.handle, backlog=1024).serve_forever()


if __name__ == "__main__":
    main()
