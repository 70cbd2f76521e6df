"""SMTP smuggling end to end: what a destination receives, byte for byte.

A raw client sends content holding a fake end of data (bare LF or CR
around a dot, NULs around a dot, ...) followed by a smuggled transaction.
The relay runs in this process; the primary and the backup are raw
upstream servers (tests/peers/raw_upstream.py) that keep the exact wire
bytes, since aiosmtpd would undo dot-stuffing and could hide a NUL or a
bare LF. In both `smtp.bare_newline` modes: no NUL and no bare CR/LF
reaches a destination, the data ends only at the client's real end, the
smuggled MAIL is never a command anywhere, each destination gets exactly
one message, and with `reject` the client hears 550 (5.6.0 for a NUL,
5.5.2 for a bare newline) and nothing of the refused message goes on.
"""

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MESSAGE, START_TIMEOUT, Upstream, wait_until
from test_cli import relay_variables
from test_relay import in_data, read_replies

from smtpdup import logs
from smtpdup.spool import BLANK_PREFIX

RAW_PEER = Path(__file__).resolve().parent / "peers" / "raw_upstream.py"

SMUGGLED = b"MAIL FROM:<smuggled@evil.example>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nSmuggled: yes\r\n"
BEFORE = b"Subject: smuggling\r\n\r\nbefore"
AFTER = b"after\r\n"

# (what the client sends, what every destination must get for it with
# bare_newline: normalize, the reply with bare_newline: reject)
NUL_REFUSED = "550 5.6.0"
BARE_REFUSED = "550 5.5.2"
VARIANTS = {
    "bare-lf": (b"\n", b"\r\n", BARE_REFUSED),
    "bare-cr": (b"\r", b"\r\n", BARE_REFUSED),
    "lf-dot-lf": (b"\n.\n", b"\r\n..\r\n", BARE_REFUSED),
    "cr-dot-cr": (b"\r.\r", b"\r\n..\r\n", BARE_REFUSED),
    "crlf-dot-lf": (b"\r\n.\n", b"\r\n..\r\n", BARE_REFUSED),
    "lf-dot-crlf": (b"\n.\r\n", b"\r\n..\r\n", BARE_REFUSED),
    "crlf-nul-dot-crlf": (b"\r\n\x00.\r\n", b"\r\n..\r\n", NUL_REFUSED),
    "crlf-dot-nul-crlf": (b"\r\n.\x00\r\n", b"\r\n..\r\n", NUL_REFUSED),
    "nul": (b"\x00", b"", NUL_REFUSED),
    # A second MAIL FROM after several fake ends in a row.
    "mail-after-fake-ends": (
        b"\r\n\x00.\r\n" + SMUGGLED + b"\r\n.\x00\r\n" + SMUGGLED,
        b"\r\n..\r\n" + SMUGGLED + b"\r\n..\r\n" + SMUGGLED,
        NUL_REFUSED,
    ),
}


class RawUpstream(Upstream):
    """conftest's Upstream, running the raw peer: messages() gives the wire
    bytes (still dot-stuffed) as ``content``."""

    def start(self) -> "RawUpstream":
        if self.port_file.exists():
            self.port_file.unlink()
        self._port = 0
        self.proc = subprocess.Popen(
            [sys.executable, str(RAW_PEER), "--store", str(self.store), "--port-file", str(self.port_file)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        return self

    def commands(self) -> list[bytes]:
        path = self.store / "commands.log"
        return path.read_bytes().splitlines(keepends=True) if path.exists() else []

    def mail_commands(self) -> list[bytes]:
        return [line for line in self.commands() if line[:5].upper() == b"MAIL "]


@pytest.fixture
def raw_upstreams(tmp_path):
    started: list[RawUpstream] = []

    def make(name: str) -> RawUpstream:
        upstream = RawUpstream(tmp_path, name)
        started.append(upstream)
        return upstream.start()

    yield make
    for upstream in started:
        upstream.stop()


def ends_only_at_the_end(wire: bytes) -> bool:
    """Whether a lenient destination (one that drops NULs and takes a bare
    CR or LF for a line end) finds the end of data in ``wire + b".\\r\\n"``
    only at that final dot."""
    relaxed = (b"\n" + wire + b".\r\n").replace(b"\x00", b"").replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return relaxed.find(b"\n.\n") == len(relaxed) - 3


def assert_clean_wire(wire: bytes) -> None:
    assert b"\x00" not in wire
    assert wire.count(b"\r") == wire.count(b"\n") == wire.count(b"\r\n"), wire
    assert b"\r\n.\r\n" not in b"\r\n" + wire
    assert ends_only_at_the_end(wire)
    assert wire.endswith(b"\r\n")


def spool_idle(service) -> bool:
    directory = Path(service.spool.directory)
    in_tmp = [name for name in os.listdir(directory / "tmp") if not name.startswith(BLANK_PREFIX)]
    return not os.listdir(directory / "msg") and not in_tmp


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level(logging.INFO, logger="smtpdup")


def transaction_lines(caplog) -> list[dict]:
    """The relay's `transaction` log lines, as the JSON it writes."""
    return [
        json.loads(logs._JsonLineFormatter().format(r))
        for r in caplog.records
        if r.name == "smtpdup.relay" and r.getMessage() == "transaction"
    ]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_normalize_sends_clean_wire_bytes_and_one_message(raw_upstreams, relay, variant, caplog):
    raw, normalized, _ = VARIANTS[variant]
    primary, backup = raw_upstreams("primary"), raw_upstreams("backup")
    service = relay(primary.address, [backup.address])
    with in_data(service) as sock:
        sock.sendall(BEFORE + raw + SMUGGLED + AFTER + b".\r\nQUIT\r\n")
        assert [r[:3] for r in read_replies(sock, 2)] == [b"250", b"221"]
    expected = BEFORE + normalized + SMUGGLED + AFTER
    wait_until(lambda: spool_idle(service), what="the backup copy to be delivered")
    for upstream in (primary, backup):
        [stored] = upstream.messages()
        assert (stored.mail_from, stored.rcpt_tos) == ("a@example.com", ["b@example.com"])
        assert_clean_wire(stored.content)
        assert stored.body_without_trace == expected
        assert upstream.mail_commands() == [b"MAIL FROM:<a@example.com>\r\n"]
    [line] = transaction_lines(caplog)
    assert (line["outcome"], line["reply"][:3]) == ("accepted", "250")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reject_refuses_and_nothing_goes_on(raw_upstreams, relay, variant, caplog):
    raw, _, refusal = VARIANTS[variant]
    primary, backup = raw_upstreams("primary"), raw_upstreams("backup")
    service = relay(primary.address, [backup.address], smtp_bare_newline="reject")
    with in_data(service) as sock:
        sock.sendall(BEFORE + raw + SMUGGLED + AFTER + b".\r\n")
        [reply] = read_replies(sock, 1)
        assert reply.decode()[:9] == refusal
        # The session goes on: a clean message after the refused one.
        sock.sendall(b"MAIL FROM:<next@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        assert [r[:3] for r in read_replies(sock, 3)] == [b"250", b"250", b"354"]
        sock.sendall(MESSAGE + b".\r\nQUIT\r\n")
        assert [r[:3] for r in read_replies(sock, 2)] == [b"250", b"221"]
    wait_until(lambda: spool_idle(service), what="the backup copy to be delivered")
    for upstream in (primary, backup):
        [stored] = upstream.messages()  # the clean one alone
        assert stored.mail_from == "next@example.com"
        assert_clean_wire(stored.content)
        assert b"before" not in stored.content and b"Smuggled" not in stored.content
        assert all(b"smuggled" not in line for line in upstream.mail_commands())
    # The primary saw the refused message's envelope (lockstep) but never
    # its end: the connection was dropped before a final dot.
    assert primary.mail_commands()[0] == b"MAIL FROM:<a@example.com>\r\n"
    assert backup.mail_commands() == [b"MAIL FROM:<next@example.com>\r\n"]
    refused, accepted = transaction_lines(caplog)
    assert (refused["outcome"], refused["reply"][:9]) == ("rejected", refusal)
    assert refused["sender"] == "a@example.com"
    assert (accepted["outcome"], accepted["sender"]) == ("accepted", "next@example.com")


def test_refusal_is_logged_as_the_client_heard_it(raw_upstreams, background, tmp_path):
    """The relay as a process: its JSON log on stderr says what the client
    was told (550 5.6.0, rejected), not "client gone"."""
    primary = raw_upstreams("primary")
    variables = relay_variables(
        tmp_path, SMTP_DUP_RELAY_DESTINATION_PRIMARY=primary.address, SMTP_DUP_SMTP_BARE_NEWLINE="reject"
    )
    process = background([], **variables)
    process.wait_for_event("started")
    host, _, port = variables["SMTP_DUP_SMTP_LISTEN"].rpartition(":")
    with socket.create_connection((host, int(port)), timeout=START_TIMEOUT) as sock:
        read_replies(sock, 1)
        sock.sendall(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        assert read_replies(sock, 4)[-1][:3] == b"354"
        sock.sendall(b"Subject: x\r\n\r\nnul\x00here\r\n.\r\n")
        assert read_replies(sock, 1)[0][:9] == b"550 5.6.0"
        sock.sendall(b"QUIT\r\n")
        read_replies(sock, 1)
    line = process.wait_for_event("transaction")
    assert line["outcome"] == "rejected"
    assert line["reply"] == "550 5.6.0 NUL byte in message content"
    assert "client gone" not in process.log()
    assert primary.count() == 0

