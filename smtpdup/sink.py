"""A capturing SMTP server backend: every accepted message becomes a file.

Runs on the same protocol and session code as the relay (``smtpdup sink``,
``smtpdup demo`` and tests use it). Each message is written to
``<maildir>/tmp/`` while it streams and renamed into ``<maildir>/new/``
when complete, as a maildir does, so a reader never sees half a message.

A stored file starts with two envelope lines, then the content as the
client meant it (dot-stuffing undone)::

    X-Envelope-From: <sender>
    X-Envelope-To: <rcpt1>, <rcpt2>
    ...content...
"""

from __future__ import annotations

import itertools
import os
import time

from . import logs
from .reply import START_DATA, Reply

log = logs.get("sink")

_ids = itertools.count(1)


class Maildir:
    """Where a sink stores messages."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(directory, sub), exist_ok=True)

    def new_names(self) -> tuple[str, str]:
        name = f"{time.time_ns()}.{os.getpid()}.{next(_ids)}.eml"
        return os.path.join(self.directory, "tmp", name), os.path.join(self.directory, "new", name)


class SinkSession:
    """The backend of one client session of a sink (see ``session.Backend``)."""

    def __init__(self, maildir: Maildir, client_ip: str) -> None:
        self.maildir = maildir
        self.client_ip = client_ip
        self._sender: str | None = None
        self._recipients: list[str] = []
        self._file = None
        self._paths: tuple[str, str] | None = None
        self._carry = b"\r\n"  # content starts a line

    def hello(self, name: str, extended: bool) -> None:
        pass

    def tls_started(self) -> None:
        pass

    def mail(self, sender: str, params: dict[str, str | None]) -> Reply:
        self.reset()
        self._sender = sender
        return Reply(250, "2.1.0", "Sender OK")

    def rcpt(self, recipient: str, params: dict[str, str | None]) -> Reply:
        self._recipients.append(recipient)
        return Reply(250, "2.1.5", "Recipient OK")

    def data(self) -> Reply:
        self._paths = self.maildir.new_names()
        self._file = open(self._paths[0], "wb")
        header = (
            f"X-Envelope-From: <{self._sender}>\r\n"
            f"X-Envelope-To: {', '.join(f'<{r}>' for r in self._recipients)}\r\n"
        )
        self._file.write(header.encode("utf-8", "surrogateescape"))
        self._carry = b"\r\n"
        return START_DATA

    def data_chunk(self, data: bytes) -> None:
        if self._file is None:
            return
        # Undo dot-stuffing with one C-level replace per block. The last two
        # bytes of the previous block are carried in front, so a "\r\n."
        # split across blocks is seen; the carried bytes themselves are
        # never changed by the replace, so they are cut off again.
        block = self._carry + data
        self._file.write(block.replace(b"\r\n.", b"\r\n")[2:])
        self._carry = block[-2:]

    def data_end(self) -> Reply:
        if self._file is None or self._paths is None:
            return Reply(451, "4.3.0", "No message in progress")
        self._file.close()
        self._file = None
        os.rename(*self._paths)
        name = os.path.basename(self._paths[1])
        log.info("sink_stored", extra={"file": name, "recipients": len(self._recipients)})
        self._reset_envelope()
        return Reply(250, "2.0.0", f"Ok: stored as {name}")

    def data_abort(self, reply: Reply) -> None:
        self.reset()

    def reset(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._paths is not None:
            try:
                os.unlink(self._paths[0])
            except FileNotFoundError:
                pass
        self._reset_envelope()

    def _reset_envelope(self) -> None:
        self._paths = None
        self._sender = None
        self._recipients = []

    def close(self) -> None:
        self.reset()
