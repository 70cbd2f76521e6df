"""Postfix's smtp-source through the relay to smtp-sinks: exactly-once delivery.

The issue: "With Postfix's ``smtp-source -d`` (connection reuse, as Postfix's
own connection cache does) 2,000 messages through the relay to smtp-sinks:
every message arrives exactly once at the primary and at each backup."

The relay runs as ``python -m smtpdup`` in its own process, configured by the
environment alone; three ``smtp-sink`` processes (primary and two backups)
dump every transaction to its own file. smtpdup's ``Received:`` header names
each message's queue id, so a message lost or delivered twice shows as a
missing or repeated queue id at a sink.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest

import postfix_tools
from conftest import wait_until
from postfix_tools import SMTPDUP_QUEUE_ID, Sink

pytestmark = [
    pytest.mark.postfix,
    pytest.mark.slow,
    pytest.mark.skipif(not postfix_tools.available(),
                       reason=f"Postfix test programs not installed ({postfix_tools.SMTP_SOURCE}, "
                              f"{postfix_tools.SMTP_SINK}): apt-get install postfix"),
]

# Bounds, to detect a hang (not performance assertions): the relay must
# listen within START, smtp-source must finish within SOURCE, and every copy
# must arrive (spool drained) within DRAIN after that.
START_TIMEOUT_SECONDS = 15.0
SOURCE_TIMEOUT_SECONDS = 120.0
DRAIN_TIMEOUT_SECONDS = 60.0

# smtp-source's fixed body ends with this line; smtp-sink writes an empty
# line after the content at the final dot, so a dump ending in both is a
# whole transaction, not one still being written (or cut off).
COMPLETE_DUMP_TAIL = b"La de da de da 4.\n\n"

SENDER = "sender@example.com"
RECIPIENT = "rcpt@example.com"


class Relay:
    """``python -m smtpdup`` as a subprocess; stderr (its log) kept in a file."""

    def __init__(self, tmp_path: Path, primary: Sink, backups: list[Sink]) -> None:
        self.port = postfix_tools.free_port()
        self.spool_dir = tmp_path / "spool"
        self.log_path = tmp_path / "relay.log"
        config_path = tmp_path / "empty-config.yaml"
        config_path.write_text("{}\n")
        self.environ = {
            **os.environ,
            "SMTP_DUP_CONFIG": str(config_path),
            "SMTP_DUP_SMTP_LISTEN": f"127.0.0.1:{self.port}",
            "SMTP_DUP_METRICS_LISTEN": "",
            "SMTP_DUP_RELAY_DESTINATION_PRIMARY": primary.address,
            "SMTP_DUP_RELAY_DESTINATION_BACKUPS": ",".join(b.address for b in backups),
            "SMTP_DUP_RELAY_SPOOL_DIR": str(self.spool_dir),
            "SMTP_DUP_LOG_LEVEL": "warning",
            # Stop promptly at teardown: nothing is in flight by then.
            "SMTP_DUP_SMTP_SHUTDOWN_GRACE_SECONDS": "2",
        }
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Relay":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "smtpdup"], env=self.environ,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        postfix_tools.wait_listening(self.proc, self.port, START_TIMEOUT_SECONDS)
        return self

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def spooled(self) -> list[str]:
        """Names left under spool/msg/ (committed messages with copies not yet settled)."""
        directory = self.spool_dir / "msg"
        return sorted(os.listdir(directory)) if directory.exists() else []

    def dead(self) -> list[str]:
        directory = self.spool_dir / "dead"
        return sorted(os.listdir(directory)) if directory.exists() else []


@pytest.fixture
def sinks(tmp_path):
    """Primary, backup1, backup2: smtp-sinks dumping each transaction; stopped by PID."""
    started: list[Sink] = []
    try:
        for name in ("primary", "backup1", "backup2"):
            started.append(postfix_tools.start_sink(tmp_path / "dumps" / name))
        yield started
    finally:
        for sink in started:
            sink.stop()


@pytest.fixture
def relay(tmp_path, sinks):
    """The relay in front of ``sinks``; stopped by PID (SIGTERM, then SIGKILL)."""
    relay = Relay(tmp_path, sinks[0], sinks[1:])
    try:
        yield relay.start()
    finally:
        status = postfix_tools.stop(relay.proc)
    # SPEC §5: SIGTERM ends the relay with status 0 (-9: it needed SIGKILL).
    assert status == 0, f"relay exited {status} on SIGTERM; log:\n{relay.log_tail()}"


def queue_ids(dumps: list[bytes]) -> list[str]:
    """The smtpdup queue id of every complete dump (one per transaction)."""
    result = []
    for dump in dumps:
        if dump.endswith(COMPLETE_DUMP_TAIL):
            match = SMTPDUP_QUEUE_ID.search(dump)
            result.append(match.group(1).decode() if match else "<no smtpdup Received header>")
    return result


def assert_exactly_once(relay: Relay, sinks: list[Sink], messages: int) -> None:
    """Every sink holds ``messages`` whole transactions, one per queue id, the
    same queue ids at the primary and at each backup; the spool drained."""

    def arrived() -> bool:
        return all(len(queue_ids(sink.dumps())) >= messages for sink in sinks) and not relay.spooled()

    try:
        wait_until(arrived, DRAIN_TIMEOUT_SECONDS, interval=0.2,
                   what=f"{messages} messages at every sink and an empty spool")
    except AssertionError:
        counts = {sink.dump_dir.name: len(queue_ids(sink.dumps())) for sink in sinks}
        pytest.fail(f"not delivered: complete dumps {counts}, spool/msg holds {len(relay.spooled())} "
                    f"files; relay log:\n{relay.log_tail()}")

    per_sink = {}
    for sink in sinks:
        dumps = sink.dumps()
        partial = [dump[:200] for dump in dumps if not dump.endswith(COMPLETE_DUMP_TAIL)]
        assert not partial, f"{sink.dump_dir.name}: {len(partial)} cut-off transaction(s), e.g. {partial[0]!r}"
        ids = queue_ids(dumps)
        repeated = {qid: n for qid, n in collections.Counter(ids).items() if n > 1}
        assert not repeated, f"{sink.dump_dir.name}: delivered more than once: {dict(list(repeated.items())[:10])}"
        assert len(ids) == messages, f"{sink.dump_dir.name}: {len(ids)} messages, expected {messages}"
        assert all(f"X-Mail-Args: <{SENDER}>".encode() in d and f"X-Rcpt-Args: <{RECIPIENT}>".encode() in d
                   for d in dumps), f"{sink.dump_dir.name}: an envelope changed on the way"
        per_sink[sink.dump_dir.name] = set(ids)

    primary = per_sink["primary"]
    for name in ("backup1", "backup2"):
        assert per_sink[name] == primary, (
            f"{name} differs from the primary: {len(primary - per_sink[name])} missing, "
            f"{len(per_sink[name] - primary)} extra")
    assert not relay.dead(), f"dead-lettered copies: {relay.dead()[:10]}"


def send(relay: Relay, messages: int, sessions: int, reuse_connections: bool) -> postfix_tools.SourceRun:
    run = postfix_tools.run_source(relay.port, messages, sessions=sessions, reuse_connections=reuse_connections,
                                   sender=SENDER, recipient=RECIPIENT, timeout=SOURCE_TIMEOUT_SECONDS)
    assert run.returncode == 0, (f"smtp-source exited {run.returncode}: {run.output[-2000:]}\n"
                                 f"relay log:\n{relay.log_tail()}")
    print(f"smtp-source {'-d ' if reuse_connections else ''}-s {sessions} -m {messages}: "
          f"{run.duration_seconds:.2f}s, {messages / run.duration_seconds:.0f} msg/s")
    return run


def test_connection_reuse_2000_messages_arrive_exactly_once_everywhere(relay, sinks):
    """smtp-source -d: many transactions per session, as Postfix's connection cache sends them."""
    send(relay, 2000, sessions=10, reuse_connections=True)
    assert_exactly_once(relay, sinks, 2000)


def test_one_message_per_connection_arrives_exactly_once_everywhere(relay, sinks):
    """Without -d: a new session (and primary connection) per message."""
    send(relay, 300, sessions=10, reuse_connections=False)
    assert_exactly_once(relay, sinks, 300)
