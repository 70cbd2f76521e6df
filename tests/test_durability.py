"""Backup copies survive: retries, dead letters, crashes, a full disk.

Real peers on 127.0.0.1 throughout: aiosmtpd upstreams in their own
processes (``conftest.Upstream``), smtplib as the client, the relay either
in this process (``relay`` fixture) or as ``python -m smtpdup`` in a
subprocess where a test kills it (``kill -9`` or a named crash point, see
``SMTPDUP_TEST_CRASH_AT`` in ``smtpdup/relay.py``). ``smtpdup queue`` and
``smtpdup report`` run as subprocesses, as an operator would run them next
to a live relay. Every wait is a bounded poll; every process started here
is stopped by its PID at teardown.
"""

from __future__ import annotations

import gc
import heapq
import json
import logging
import os
import re
import resource
import shutil
import signal
import smtplib
import socket
import subprocess
import time
from pathlib import Path

import gevent
import pytest

from conftest import relay_environ, run_smtpdup, wait_until

from smtpdup import config as config_module
from smtpdup.spool import BLANK_PREFIX
from smtpdup import logs
from smtpdup.relay import sampled
from smtpdup.report import queue_entries

# Bound on a CLI run (`smtpdup queue ...`, `smtpdup report`).
CLI_TIMEOUT = 30.0
# `queue flush` is noticed within delivery.POLL_SECONDS (1 s); give it slack.
FLUSH_TIMEOUT = 8.0
# Retry settings under which only an operator (or nothing) can explain a delivery.
NEVER = {"relay_retry_initial_seconds": 3600, "relay_retry_max_interval_seconds": 3600}
DOWN = "451 4.3.2 down for maintenance"


# -- helpers ----------------------------------------------------------------


def content(subject: str) -> bytes:
    return f"From: alice@example.com\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n".encode()


def send(address, recipients, subject: str, sender: str = "alice@example.com") -> dict:
    """One message over a fresh session; returns smtplib's refused-recipients dict."""
    with smtplib.SMTP(*address, timeout=10) as smtp:
        return smtp.sendmail(sender, recipients, content(subject))


def subjects(upstream) -> list[str]:
    """Subjects of what ``upstream`` stored, sorted."""
    found = []
    for stored in upstream.messages():
        match = re.search(rb"^Subject: (.*?)\r$", stored.content, re.M)
        found.append(match.group(1).decode() if match else "?")
    return sorted(found)


def queue_id_of(stored) -> str:
    """The queue id from smtpdup's Received header."""
    match = re.search(rb"\(smtpdup\) with \w+ id ([0-9a-f]{20});", stored.content)
    assert match, stored.content[:300]
    return match.group(1).decode()


def cli(environ: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return run_smtpdup(args, environ, timeout=CLI_TIMEOUT)


def queue_list(environ: dict[str, str]) -> list[dict]:
    result = cli(environ, "queue", "list", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def spool_path(environ: dict[str, str]) -> Path:
    return Path(environ["SMTP_DUP_RELAY_SPOOL_DIR"])


def spool_idle(environ: dict[str, str]) -> bool:
    """No message left in msg/ (every copy delivered or dead) and nothing in
    tmp/ but blanks prepared for messages to come."""
    spool = spool_path(environ)
    in_tmp = [name for name in os.listdir(spool / "tmp") if not name.startswith(BLANK_PREFIX)]
    return not os.listdir(spool / "msg") and not in_tmp


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@pytest.fixture
def relay_process(smtpdup):
    """Factory: ``relay_process(environ)`` -> a relay subprocess
    (``harness.Smtpdup``) not yet started: ``start_on_free_port()``."""
    return smtpdup


@pytest.fixture
def late_listener(tmp_path):
    """A port that refuses connections (bound, not listening: the kernel
    answers RST) until ``open()`` makes a sink listen on that very socket.
    No window in which another process could take the port."""
    from smtpdup.server import SmtpServer
    from smtpdup.sink import Maildir, SinkSession

    class LateListener:
        def __init__(self) -> None:
            self.sock = socket.socket()
            self.sock.bind(("127.0.0.1", 0))
            self.port = self.sock.getsockname()[1]
            self.maildir = tmp_path / "late-sink"
            self.server = None

        def open(self) -> None:
            maildir = Maildir(str(self.maildir))
            config = config_module.load(None, relay_environ(tmp_path, "127.0.0.1:25"))
            self.sock.listen(16)
            self.server = SmtpServer(config_module.Current(config), lambda ip: SinkSession(maildir, ip),
                                     listener=self.sock)
            self.server.start()

        def stored(self) -> list[bytes]:
            new = self.maildir / "new"
            return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []

    listener = LateListener()
    yield listener
    if listener.server is not None:
        listener.server.drain(0)
    listener.sock.close()


# -- 1. a backup that is down comes back ------------------------------------


def test_copy_arrives_after_backup_answers_451_then_recovers(upstreams, relay, tmp_path):
    primary, backup = upstreams("primary"), upstreams("backup")
    backup.set_rules(mail=DOWN)
    service = relay(primary.address, [backup.address])
    environ = relay_environ(tmp_path, primary.address, [backup.address])
    assert send(service.address, ["bob@example.com"], "m1") == {}
    # Deferred, not lost: pending with the backup's reply.
    [entry] = wait_until(
        lambda: [e for e in queue_entries(service.spool) if e["attempts"] >= 1], what="a failed attempt"
    )
    assert entry["state"] == "pending"
    assert (entry["destination"], entry["recipients"]) == (backup.address, ["bob@example.com"])
    assert entry["last_reply"] == DOWN
    backup.set_rules()
    [stored] = backup.wait_for(1)
    assert stored.rcpt_tos == ["bob@example.com"]
    assert stored.content == primary.messages()[0].content
    wait_until(lambda: spool_idle(environ), what="the spool to empty")
    assert backup.count() == 1


def test_copy_arrives_after_connection_refused_then_listener_appears(upstreams, relay, late_listener):
    primary = upstreams("primary")
    backup_address = f"127.0.0.1:{late_listener.port}"
    service = relay(primary.address, [backup_address])
    assert send(service.address, ["bob@example.com"], "refused-first") == {}
    [entry] = wait_until(
        lambda: [e for e in queue_entries(service.spool) if e["attempts"] >= 2], what="two refused attempts"
    )
    assert entry["state"] == "pending"
    assert entry["last_reply"].startswith("451 4.4.1") and "refused" in entry["last_reply"].lower()
    late_listener.open()
    [stored] = wait_until(late_listener.stored, what="the copy at the late listener")
    assert b"X-Envelope-To: <bob@example.com>" in stored
    assert b"Subject: refused-first" in stored
    wait_until(lambda: not queue_entries(service.spool), what="the spool to empty")


# -- 2. 451 twice at the final dot, then 250 ----------------------------------


def test_451_twice_at_final_dot_then_delivered_exactly_once(upstreams, relay, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="smtpdup.delivery")
    primary, backup = upstreams("primary"), upstreams("backup")
    backup.set_rules(data=["451 4.3.0 try later (1)", "451 4.3.0 try later (2)"])
    keys = {"relay_retry_initial_seconds": 1.0, "relay_retry_max_interval_seconds": 1.0}
    service = relay(primary.address, [backup.address], **keys)
    environ = relay_environ(tmp_path, primary.address, [backup.address], **keys)
    assert send(service.address, ["bob@example.com"], "thrice") == {}
    # Watch the spool state while the copy is retried.
    seen: set[tuple[int, str]] = set()

    def delivered() -> bool:
        for entry in queue_entries(service.spool):
            seen.add((entry["attempts"], entry["last_reply"]))
        return backup.count() >= 1 and spool_idle(environ)

    def attempt_lines() -> list[dict]:
        return [
            json.loads(logs._JsonLineFormatter().format(r))
            for r in caplog.records
            if r.name == "smtpdup.delivery" and r.getMessage() == "backup_attempt"
        ]

    wait_until(delivered, what="the copy delivered on the third attempt")
    assert {(1, "451 4.3.0 try later (1)"), (2, "451 4.3.0 try later (2)")} <= seen
    assert backup.count() == 1
    qid = queue_id_of(backup.messages()[0])
    # An attempt is logged once its outcome is on disk: just after the spool empties.
    wait_until(lambda: len(attempt_lines()) >= 3, timeout=5, what="the third attempt logged")
    lines = attempt_lines()
    assert [(x["queue_id"], x["attempt"], x["outcome"], x["reply"]) for x in lines] == [
        (qid, 1, "deferred", "451 4.3.0 try later (1)"),
        (qid, 2, "deferred", "451 4.3.0 try later (2)"),
        (qid, 3, "delivered", "250 2.0.0 OK stored"),
    ]
    # The journal names the copy, as spool.py documents ("<qid>.<index>").
    journal = [e for e in service.spool.journal_since(0) if e.get("event") == "delivered"]
    assert [(e["id"], e["destination"], e["recipients"]) for e in journal] == [
        (f"{qid}.0", backup.address, ["bob@example.com"])
    ]


# -- 3. 550 from a backup: dead letter, client unaffected ---------------------


@pytest.mark.parametrize(
    "rules, reason",
    [
        ({"rcpt": {"bob@example.com": "550 5.1.1 no such user"}}, "550 5.1.1 no such user"),
        ({"data": ["550 5.7.1 content rejected"]}, "550 5.7.1 content rejected"),
    ],
    ids=["rcpt", "final-dot"],
)
def test_backup_550_dead_letters_the_copy(upstreams, relay, tmp_path, rules, reason):
    primary, backup = upstreams("primary"), upstreams("backup")
    backup.set_rules(**rules)
    service = relay(primary.address, [backup.address])
    environ = relay_environ(tmp_path, primary.address, [backup.address])
    assert send(service.address, ["bob@example.com"], "refused") == {}  # the client got 250
    primary.wait_for(1)
    # `queue list --json` in another process while the relay runs.
    [dead] = wait_until(
        lambda: [e for e in queue_list(environ) if e["state"] == "dead"], what="a dead letter in `queue list`"
    )
    qid = queue_id_of(primary.messages()[0])
    assert dead["id"] == f"{qid}.0"
    assert dead["queue_id"] == qid
    assert dead["destination"] == backup.address
    assert dead["sender"] == "alice@example.com"
    assert dead["recipients"] == ["bob@example.com"]
    assert dead["attempts"] == 1
    assert reason in dead["last_reply"]
    # Dead is final: nothing pending, never retried.
    assert [(e["id"], e["state"]) for e in queue_list(environ)] == [(dead["id"], "dead")]
    # The content stays with the dead letter.
    assert b"Subject: refused" in (spool_path(environ) / "dead" / dead["id"]).read_bytes()
    assert backup.count() == 0


# -- 4. kill -9 ---------------------------------------------------------------


def test_kill_9_loses_no_accepted_copy(upstreams, relay_process, tmp_path):
    primary, backup = upstreams("primary"), upstreams("backup")
    backup.set_rules(mail=DOWN)
    environ = relay_environ(tmp_path, primary.address, [backup.address], log_level="info")
    relay = relay_process(environ).start_on_free_port()
    for n in range(5):
        assert send(relay.address, ["bob@example.com", "carol@example.org"], f"m{n}") == {}
    # Committed before each 250: all five are on disk now (`queue list` next to the live relay).
    assert [e["state"] for e in queue_list(environ)] == ["pending"] * 5
    relay.kill()
    backup.set_rules()
    relay.start_on_free_port()
    backup.wait_for(5)
    wait_until(lambda: spool_idle(environ), what="the spool to empty")
    assert subjects(backup) == [f"m{n}" for n in range(5)]
    assert all(s.rcpt_tos == ["bob@example.com", "carol@example.org"] for s in backup.messages())
    assert sorted(s.content for s in backup.messages()) == sorted(s.content for s in primary.messages())
    loaded = [e for e in relay.events() if e.get("event") == "spool_loaded"]
    assert loaded and loaded[0]["pending_copies"] == 5


@pytest.mark.parametrize(
    "crash_at",
    ["before_final_dot", "after_primary_reply", "group_commit_before_directory_sync", "after_commit"],
)
def test_crash_points_keep_the_invariants(upstreams, relay_process, tmp_path, crash_at):
    """Message "accepted" got its 250 before any crash; message "cut" is in
    flight when the relay kills itself at ``crash_at``. After a restart:
    every message the client saw accepted reaches the backup; "cut" is at
    the primary only if the final dot went out, at the backup only if it
    was committed; no partial file is left in tmp/.

    ``group_commit_before_directory_sync``: renamed into msg/ but msg/ not
    fsynced yet, so the client got no 250. After kill -9 the rename is
    there (only a power loss could undo it): the copy is delivered, as
    after a commit; "cut" then is a message the client will retry (a
    duplicate, never a loss)."""
    committed_before_crash = crash_at in ("after_commit", "group_commit_before_directory_sync")
    primary, backup = upstreams("primary"), upstreams("backup")
    backup.set_rules(mail=DOWN)
    environ = relay_environ(tmp_path, primary.address, [backup.address], log_level="info")
    spool = spool_path(environ)
    relay = relay_process(environ).start_on_free_port()
    assert send(relay.address, ["bob@example.com"], "accepted") == {}
    relay.kill()

    relay.start_on_free_port(crash_at=crash_at)
    with pytest.raises((smtplib.SMTPException, OSError)):
        send(relay.address, ["bob@example.com"], "cut")
    assert relay.wait() == -signal.SIGKILL
    # Message files only: a state save cut by the kill may leave tmp/<qid>.state.*.
    partial = [n for n in os.listdir(spool / "tmp") if "." not in n and not n.startswith(BLANK_PREFIX)]
    committed = [n for n in os.listdir(spool / "msg") if "." not in n]
    if committed_before_crash:
        assert (len(partial), len(committed)) == (0, 2)
    else:
        assert (len(partial), len(committed)) == (1, 1)

    backup.set_rules()
    relay.start_on_free_port()
    wait_until(lambda: backup.count() >= 1 and spool_idle(environ), what="pending copies delivered")
    at_primary = subjects(primary)
    at_backup = subjects(backup)
    assert "accepted" in at_backup
    if crash_at == "before_final_dot":
        assert at_primary == ["accepted"]
    else:
        assert at_primary == ["accepted", "cut"]
    if committed_before_crash:
        assert at_backup == ["accepted", "cut"]
    else:
        assert at_backup == ["accepted"]
    assert os.listdir(spool / "dead") == []


# -- 5. the spool fails -------------------------------------------------------


def test_spool_write_failure_mid_data_gives_451_and_primary_gets_nothing(upstreams, relay_process, tmp_path):
    """A full disk, made with RLIMIT_FSIZE (root ignores permissions):
    write() fails with EFBIG once a spool file reaches the limit."""
    limit = 64 * 1024

    def small_files() -> None:  # in the child, before exec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    primary, backup = upstreams("primary"), upstreams("backup")
    environ = relay_environ(tmp_path, primary.address, [backup.address], log_level="info")
    relay = relay_process(environ).start_on_free_port(preexec_fn=small_files)
    big = content("big") + b"x" * 998 + b"\r\n"
    big += (b"y" * 78 + b"\r\n") * (4 * limit // 80)
    with smtplib.SMTP(*relay.address, timeout=10) as smtp:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            smtp.sendmail("alice@example.com", ["bob@example.com"], big)
        assert (refused.value.smtp_code, refused.value.smtp_error[:5]) == (451, b"4.3.0")
        # The session and the relay go on.
        assert smtp.sendmail("alice@example.com", ["bob@example.com"], content("small")) == {}
    backup.wait_for(1)
    assert subjects(backup) == ["small"]
    assert subjects(primary) == ["small"]  # the big one never got its final dot
    wait_until(lambda: spool_idle(environ), what="the spool to empty")
    assert any(e.get("event") == "spool_write_failed" for e in relay.events())


def test_spool_tmp_unusable_gives_451_and_primary_gets_nothing(upstreams, relay, tmp_path):
    primary, backup = upstreams("primary"), upstreams("backup")
    service = relay(primary.address, [backup.address])
    tmp_dir = Path(service.spool.directory) / "tmp"
    shutil.rmtree(tmp_dir)
    tmp_dir.write_bytes(b"not a directory\n")
    try:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            send(service.address, ["bob@example.com"], "lost")
        assert (refused.value.smtp_code, refused.value.smtp_error[:5]) == (451, b"4.3.0")
    finally:
        tmp_dir.unlink()
        tmp_dir.mkdir(mode=0o700)
    assert send(service.address, ["bob@example.com"], "kept") == {}
    backup.wait_for(1)
    assert subjects(primary) == ["kept"]
    assert subjects(backup) == ["kept"]


# -- 6. a long backlog does not grow memory ------------------------------------


def test_1000_copies_for_a_dead_backup_keep_memory_flat(upstreams, relay, late_listener):
    primary = upstreams("primary")
    # late_listener never opened: every connection to the backup is refused.
    backup_address = f"127.0.0.1:{late_listener.port}"
    service = relay(primary.address, [backup_address], log_level="warning", **NEVER)
    small = content("s")

    def sender(count: int) -> None:
        with smtplib.SMTP(*service.address, timeout=30) as smtp:
            for _ in range(count):
                smtp.sendmail("alice@example.com", ["bob@example.com"], small)

    sender(20)  # warm up: imports, caches, pools
    wait_until(lambda: service.scheduler.pending_count() == 20, what="20 deferred copies")
    gc.collect()
    before = rss_bytes()
    gevent.joinall([gevent.spawn(sender, 98) for _ in range(10)], raise_error=True)
    wait_until(lambda: service.scheduler.pending_count() == 1000, what="1000 deferred copies")
    gc.collect()
    growth = rss_bytes() - before
    assert growth < 50 * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MiB"
    # Deferred copies are index entries; no message stays loaded once the
    # last fresh copy has had its (failed) attempt.
    wait_until(lambda: service.scheduler.held_count() == 0, what="no message held in memory")
    assert len(queue_entries(service.spool)) == 1000
    assert primary.count() == 1000


# -- 7. domains and sample_percent -------------------------------------------


def test_domains_limit_recipients_and_no_match_means_no_copy(upstreams, relay, tmp_path):
    primary, backup = upstreams("primary"), upstreams("backup")
    url = f"smtp://{backup.address}?domains=a.example+b.example"
    service = relay(primary.address, [url])
    environ = relay_environ(tmp_path, primary.address, [url])
    assert send(service.address, ["x@a.example", "y@c.example", "z@B.example"], "mixed") == {}
    assert send(service.address, ["y@c.example"], "none") == {}
    assert send(service.address, ["w@b.example"], "only-b") == {}
    primary.wait_for(3)
    wait_until(lambda: backup.count() >= 2 and spool_idle(environ), what="two copies delivered")
    stored = {s.content.split(b"Subject: ")[1].split(b"\r\n")[0]: s.rcpt_tos for s in backup.messages()}
    assert stored == {b"mixed": ["x@a.example", "z@B.example"], b"only-b": ["w@b.example"]}
    assert queue_list(environ) == []


def test_sample_percent_0_100_and_50(upstreams, relay, tmp_path):
    primary, b0, b50, b100 = (upstreams(n) for n in ("primary", "b0", "b50", "b100"))
    backups = [
        f"smtp://{b0.address}?sample_percent=0",
        f"smtp://{b50.address}?sample_percent=50",
        f"smtp://{b100.address}?sample_percent=100",
    ]
    service = relay(primary.address, backups, log_level="warning")
    environ = relay_environ(tmp_path, primary.address, backups)
    total = 200
    with smtplib.SMTP(*service.address, timeout=10) as smtp:
        for n in range(total):
            smtp.sendmail("alice@example.com", ["bob@example.com"], content(f"s{n}"))
    b100.wait_for(total, timeout=20)
    wait_until(lambda: spool_idle(environ), timeout=20, what="every sampled copy delivered")
    assert b0.count() == 0
    assert 60 <= b50.count() <= 140, b50.count()
    # Deterministic per queue id: exactly the messages the hash picks.
    [destination] = [d for d in service.config.relay.destination_backups if d.port == b50.port]
    expected = {queue_id_of(s) for s in primary.messages() if sampled(queue_id_of(s), destination)}
    assert {queue_id_of(s) for s in b50.messages()} == expected


# -- 8. report: a recipient the backup refuses --------------------------------


def test_report_names_a_recipient_the_backup_refused(upstreams, relay, tmp_path):
    primary, backup = upstreams("primary"), upstreams("backup")
    refusal = "550 5.1.1 <y@b.example>: unknown user"
    backup.set_rules(rcpt={"y@b.example": refusal})
    service = relay(primary.address, [backup.address])
    environ = relay_environ(tmp_path, primary.address, [backup.address])
    assert send(service.address, ["x@a.example", "y@b.example"], "two") == {}
    [stored] = backup.wait_for(1)
    assert stored.rcpt_tos == ["x@a.example"]
    assert primary.messages()[0].rcpt_tos == ["x@a.example", "y@b.example"]
    wait_until(lambda: spool_idle(environ), what="the copy settled")

    result = cli(environ, "report", "--json")
    assert result.returncode == 1, result.stderr  # NOT READY
    [entry] = json.loads(result.stdout)["backups"]
    assert entry["destination"] == backup.address
    assert (entry["delivered"], entry["pending"], entry["ready"]) == (1, 0, False)
    assert entry["refused_recipients"] == [
        {"recipient": "y@b.example", "domain": "b.example", "count": 1, "last_reply": refusal, "resolved": False}
    ]
    assert entry["refused_domains"] == [{"domain": "b.example", "count": 1}]

    text = cli(environ, "report")
    assert text.returncode == 1, text.stderr
    assert "y@b.example" in text.stdout and refusal in text.stdout
    assert re.search(r"^\s+b\.example\s+1$", text.stdout, re.M), text.stdout
    assert "NOT READY" in text.stdout


# -- 9. queue flush and queue delete against a running relay -------------------


def test_queue_flush_makes_a_pending_copy_due_now(upstreams, relay, tmp_path):
    primary, backup = upstreams("primary"), upstreams("backup")
    backup.set_rules(mail=DOWN)
    service = relay(primary.address, [backup.address], **NEVER)
    environ = relay_environ(tmp_path, primary.address, [backup.address], **NEVER)
    assert send(service.address, ["bob@example.com"], "flushed") == {}
    [entry] = wait_until(lambda: [e for e in queue_list(environ) if e["attempts"] == 1], what="a failed attempt")
    assert entry["next_attempt"] > time.time() + 3000  # only the flush can explain a delivery
    backup.set_rules()
    result = cli(environ, "queue", "flush")
    assert result.returncode == 0, result.stderr
    backup.wait_for(1, timeout=FLUSH_TIMEOUT)
    assert subjects(backup) == ["flushed"]
    wait_until(lambda: spool_idle(environ), what="the spool to empty")


def test_queue_delete_removes_a_pending_copy_for_good(upstreams, relay, tmp_path):
    primary, backup = upstreams("primary"), upstreams("backup")
    backup.set_rules(mail=DOWN)
    service = relay(primary.address, [backup.address], **NEVER)
    environ = relay_environ(tmp_path, primary.address, [backup.address], **NEVER)
    assert send(service.address, ["bob@example.com"], "deleted") == {}
    [entry] = wait_until(lambda: [e for e in queue_list(environ) if e["attempts"] == 1], what="a failed attempt")
    result = cli(environ, "queue", "delete", entry["id"])
    assert result.returncode == 0, result.stderr
    assert queue_list(environ) == []
    backup.set_rules()
    # A flush would make the deleted copy due if it were still there.
    flushes = service.scheduler.flushes
    assert cli(environ, "queue", "flush").returncode == 0
    wait_until(lambda: service.scheduler.flushes > flushes, timeout=FLUSH_TIMEOUT,
               what="the relay to take the flush")
    assert send(service.address, ["bob@example.com"], "later") == {}
    backup.wait_for(1)
    wait_until(lambda: spool_idle(environ), what="the spool to empty")
    assert subjects(backup) == ["later"]
    assert subjects(primary) == ["deleted", "later"]


# -- 10. expiry ----------------------------------------------------------------


def test_copy_expires_after_retry_max_age(upstreams, relay, tmp_path):
    primary, backup = upstreams("primary"), upstreams("backup")
    backup.set_rules(mail=DOWN)
    keys = {"relay_retry_max_age_seconds": 1}
    service = relay(primary.address, [backup.address], **keys)
    environ = relay_environ(tmp_path, primary.address, [backup.address], **keys)
    assert send(service.address, ["bob@example.com"], "expiring") == {}
    [dead] = wait_until(
        lambda: [e for e in queue_entries(service.spool) if e["state"] == "dead"], what="the copy to expire"
    )
    assert dead["last_reply"].startswith("expired after ")
    assert DOWN in dead["last_reply"]
    assert dead["attempts"] >= 2
    assert dead["recipients"] == ["bob@example.com"]
    assert [e["state"] for e in queue_list(environ)] == ["dead"]
    assert backup.count() == 0


def test_spool_gauges_count_pending_and_dead_copies(upstreams, relay):
    from smtpdup import metrics

    primary, backup = upstreams("primary"), upstreams("backup")
    backup.set_rules(rcpt={"gone@example.com": "550 5.1.1 no such user"}, mail=None)
    service = relay(primary.address, [backup.address], **NEVER)
    assert send(service.address, ["gone@example.com"], "dead") == {}
    wait_until(lambda: metrics.SPOOL_COPIES.labels("dead")._value.get() >= 1, what="the dead gauge")
    backup.set_rules(mail=DOWN)
    assert send(service.address, ["bob@example.com"], "pending") == {}
    wait_until(lambda: metrics.SPOOL_COPIES.labels("pending")._value.get() == 1, what="the pending gauge")
    wait_until(lambda: metrics.SPOOL_OLDEST_AGE._value.get() > 0, what="the oldest-age gauge")


# -- 11. the spool drains after an outage ----------------------------------------


def test_copy_delivered_on_a_retry_is_settled_and_never_sent_again(upstreams, relay_process, tmp_path):
    """Backup 2 is down while three messages arrive, then comes back: every
    copy reaches it on a retry, the spool empties, and a clean restart
    finds nothing to send again."""
    primary, backup1, backup2 = upstreams("primary"), upstreams("backup1"), upstreams("backup2")
    backup2.set_rules(mail=DOWN)
    environ = relay_environ(
        tmp_path, primary.address, [backup1.address, backup2.address],
        relay_retry_initial_seconds=0.5, relay_retry_max_interval_seconds=1, log_level="info",
    )
    relay = relay_process(environ).start_on_free_port()
    for n in range(3):
        assert send(relay.address, ["bob@example.com"], f"m{n}") == {}
    backup1.wait_for(3)
    wait_until(lambda: any(e.get("outcome") == "deferred" for e in relay.events()), what="a deferral")
    backup2.set_rules()
    backup2.wait_for(3, timeout=15)
    wait_until(lambda: spool_idle(environ), what="the spool to empty")
    assert queue_list(environ) == []

    def delivered() -> list[dict]:
        return [e for e in relay.events() if e.get("event") == "backup_attempt" and e["outcome"] == "delivered"]

    # Each attempt is logged just after its outcome is on disk.
    wait_until(lambda: len(delivered()) >= 6, timeout=5, what="six delivered attempts logged")
    assert len(delivered()) == 6
    relay.signal(signal.SIGTERM)
    assert relay.wait() == 0
    relay.start_on_free_port()
    [loaded] = wait_until(lambda: [e for e in relay.events() if e.get("event") == "spool_loaded"],
                          what="the spool to be indexed")
    assert loaded["pending_copies"] == 0
    assert (backup1.count(), backup2.count(), primary.count()) == (3, 3, 3)
    assert subjects(backup2) == ["m0", "m1", "m2"]


def _backlog(upstreams, relay, tmp_path, count: int, backups: int = 2, **keys):
    """``count`` messages accepted while every backup refuses MAIL, the relay
    stopped: a spool of ``count`` pending copies per backup. Returns the
    primary, the backups (now accepting) and their addresses."""
    primary = upstreams("primary")
    peers = [upstreams(f"backup{n}") for n in range(1, backups + 1)]
    for peer in peers:
        peer.set_rules(mail=DOWN)
    addresses = [peer.address for peer in peers]
    service = relay(primary.address, addresses, log_level="warning", **NEVER, **keys)

    def sender(n: int) -> None:
        with smtplib.SMTP(*service.address, timeout=30) as smtp:
            for _ in range(n):
                smtp.sendmail("alice@example.com", ["bob@example.com"], content("backlog"))

    gevent.joinall([gevent.spawn(sender, count // 4) for _ in range(4)], raise_error=True)
    wait_until(lambda: service.scheduler.pending_count() == count * backups, what="the backlog to be deferred")
    service.stop(grace_seconds=0)
    for peer in peers:
        peer.set_rules()
    return primary, peers, addresses


def _restart_due(relay, primary, addresses, **keys):
    """A relay on the backlog's spool, every copy made due at once (as after
    an outage that outlasted the retry delay)."""
    service = relay(primary.address, addresses, **NEVER, **keys)
    service.spool.request_flush()
    return service


def test_backlog_larger_than_the_ready_queues_drains_and_stays_drained(upstreams, relay, tmp_path, monkeypatch):
    """More messages at start than the ready queues hold: each copy is
    loaded from disk on its own, yet every delivery is recorded, so the
    spool empties and a second restart sends nothing."""
    from smtpdup import delivery

    monkeypatch.setattr(delivery, "READY_PER_DESTINATION", 5)
    primary, (backup1, backup2), addresses = _backlog(upstreams, relay, tmp_path, 40)
    service = _restart_due(relay, primary, addresses)
    backup1.wait_for(40, timeout=20)
    backup2.wait_for(40, timeout=20)
    environ = relay_environ(tmp_path, primary.address, addresses)
    wait_until(lambda: spool_idle(environ), what="the spool to empty")
    assert service.scheduler.pending_count() == 0
    service.stop(grace_seconds=0)
    again = relay(primary.address, addresses, **NEVER)
    assert again.scheduler.loaded.wait(10)
    assert again.scheduler.loaded_count == 0
    assert (backup1.count(), backup2.count()) == (40, 40)


def test_ready_queues_are_refilled_as_they_drain_not_once_per_poll(upstreams, relay, tmp_path, monkeypatch):
    """A backlog far larger than the ready queues (10 copies each here):
    a queue running low wakes the scheduler to refill it from the index.
    Refilled only at the scheduler's poll (30 s here) or when an idle worker
    quit (after a second), 200 copies per backup would take 20 s or more."""
    from smtpdup import delivery

    monkeypatch.setattr(delivery, "READY_PER_DESTINATION", 10)
    monkeypatch.setattr(delivery, "POLL_SECONDS", 30.0)
    primary, (backup1, backup2), addresses = _backlog(upstreams, relay, tmp_path, 200)
    _restart_due(relay, primary, addresses)
    backup1.wait_for(200, timeout=8)
    backup2.wait_for(200, timeout=8)

def test_backups_share_the_pool_from_the_first_second_of_a_restart(upstreams, relay, tmp_path):
    """A backlog recovered at start, both backups up, four workers: both
    backups receive copies from the start, not one after the other."""
    primary, (backup1, backup2), addresses = _backlog(upstreams, relay, tmp_path, 200)
    _restart_due(relay, primary, addresses, relay_backup_concurrency=4)
    counts = wait_until(
        lambda: (lambda c: c if sum(c) >= 100 else None)((backup1.count(), backup2.count())),
        timeout=30, interval=0.01, what="100 copies delivered",
    )
    assert min(counts) >= 25, f"one backup starved: {counts}"
    backup1.wait_for(200, timeout=30)
    backup2.wait_for(200, timeout=30)


def test_a_slow_backup_does_not_hold_the_others_back(upstreams, relay, tmp_path):
    """Backup 1 takes 2 s per message; backup 2 drains its whole backlog
    meanwhile with its share of the pool."""
    primary, (backup1, backup2), addresses = _backlog(upstreams, relay, tmp_path, 100)
    backup1.set_rules(data_delay_seconds=2)
    _restart_due(relay, primary, addresses, relay_backup_concurrency=4)
    backup2.wait_for(100, timeout=20)
    assert backup1.count() < 50


def test_a_reload_resizes_the_backup_pool(upstreams, relay, tmp_path):
    """relay.backup_concurrency applies at a reload: a slow backup holds
    one copy at a time in DATA from a pool of 1, three once a reload makes
    the pool 3, and one again after another makes it 1; every copy arrives."""
    primary, backup = upstreams("primary"), upstreams("backup")
    backup.set_rules(data_delay_seconds=0.3)
    service = relay(primary.address, [backup.address], relay_backup_concurrency=1)
    with smtplib.SMTP(*service.address, timeout=30) as smtp:
        for n in range(40):
            smtp.sendmail("alice@example.com", ["bob@example.com"], content(f"resize-{n}"))

    def in_data() -> int:
        """Copies between their DATA command and being stored, at the backup."""
        commands = backup.commands()  # first: a copy stored after this is not counted at all
        return commands.count("DATA") - backup.count()

    def highest(probe, seconds: float) -> int:
        """The largest value ``probe()`` takes over ``seconds``, polled."""
        found, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = max(found, probe())
            gevent.sleep(0.02)
        return found

    def reload(concurrency: int) -> None:
        environ = relay_environ(tmp_path, primary.address, [backup.address], relay_backup_concurrency=concurrency)
        service.reload(config_module.load(None, environ))

    wait_until(lambda: backup.count() >= 1, what="the first copy at the backup")
    assert highest(in_data, 1.0) == 1
    assert len(service.scheduler.pool) == 1

    reload(3)
    wait_until(lambda: in_data() == 3, timeout=10, what="three copies in DATA at once")
    assert highest(lambda: len(service.scheduler.pool), 0.5) <= 3

    reload(1)
    wait_until(lambda: len(service.scheduler.pool) == 1, timeout=10, what="the pool back to one worker")
    assert highest(in_data, 1.0) <= 1
    assert backup.count() < 40, "the backlog ran out before the pool shrank: a weaker test"

    backup.set_rules()
    backup.wait_for(40, timeout=30)
    assert sorted(subjects(backup)) == sorted(f"resize-{n}" for n in range(40))


def test_an_outage_costs_one_attempt_per_back_off_not_one_per_copy(upstreams, relay, tmp_path):
    """A backup that answers 451 to MAIL is backed off as a whole: while it
    is down only one copy probes it per back-off interval; the other copies
    wait without an attempt or a save each. When it answers again, every
    copy goes and the spool empties."""
    from smtpdup import metrics

    primary, backup = upstreams("primary"), upstreams("backup")
    backup.set_rules(mail=DOWN)
    keys = {"relay_retry_initial_seconds": 0.5, "relay_retry_max_interval_seconds": 1,
            "relay_backup_concurrency": 2}
    service = relay(primary.address, [backup.address], **keys)
    started = time.monotonic()
    with smtplib.SMTP(*service.address, timeout=30) as smtp:
        for n in range(30):
            smtp.sendmail("alice@example.com", ["bob@example.com"], content(f"outage-{n}"))

    def attempts() -> int:
        return sum(e["attempts"] for e in queue_entries(service.spool))

    wait_until(lambda: attempts() >= 3, timeout=15, what="three probes of the backed-off backup")
    elapsed = time.monotonic() - started
    # At most one probe per back-off interval (0.5 s, then 1 s), plus the
    # copies in flight when the first 451 came back.
    bound = elapsed / 0.5 + 1 + service.config.relay.backup_concurrency
    total = attempts()
    assert total <= bound < 30, f"{total} attempts in {elapsed:.1f}s for 30 copies of one outage"
    assert len(queue_entries(service.spool)) == 30
    # The gauges agree with the queue: 30 waiting for this backup.
    pending = metrics.BACKUP_PENDING_COPIES.labels(backup.address)
    wait_until(lambda: pending._value.get() == 30, timeout=5, what="30 pending copies in the gauge")
    assert metrics.BACKUP_OLDEST_PENDING_AGE.labels(backup.address)._value.get() > 0
    backup.set_rules()
    backup.wait_for(30, timeout=20)
    environ = relay_environ(tmp_path, primary.address, [backup.address])
    wait_until(lambda: spool_idle(environ), what="the spool to empty")
    assert sorted(subjects(backup)) == sorted(f"outage-{n}" for n in range(30))
    wait_until(lambda: pending._value.get() == 0, timeout=5, what="the gauge to reach 0")


def test_a_backup_removed_from_the_configuration_is_backed_off_not_retried_per_copy(upstreams, relay, tmp_path):
    """Copies left for a backup no longer configured wait like those of a
    backup that is down: one attempt per back-off interval, not one per
    copy (a backlog of them would otherwise be retried, saved and
    journalled copy by copy, forever); the other backup is unaffected."""
    primary, (gone, kept), addresses = _backlog(upstreams, relay, tmp_path, 40)
    keys = {"relay_retry_initial_seconds": 0.5, "relay_retry_max_interval_seconds": 1}
    started = time.monotonic()
    service = relay(primary.address, [kept.address], **{**NEVER, **keys})
    service.spool.request_flush()
    kept.wait_for(40, timeout=20)

    def attempts() -> int:
        return sum(e["attempts"] for e in queue_entries(service.spool) if e["destination"] == gone.address)

    wait_until(lambda: attempts() >= 2, timeout=15, what="two attempts for the removed backup")
    elapsed = time.monotonic() - started
    bound = elapsed / 0.5 + 1 + service.config.relay.backup_concurrency
    total = attempts()
    assert total <= bound < 40 and total < 40, f"{total} attempts in {elapsed:.1f}s for 40 copies"
    assert gone.count() == 0
    # The kept backup's copies settle once its answers are recorded; the
    # removed backup's 40 stay.
    wait_until(
        lambda: all(e["destination"] == gone.address for e in queue_entries(service.spool)),
        timeout=10,
        what="the kept backup's copies to settle",
    )
    assert len(queue_entries(service.spool)) == 40


def test_copies_waiting_out_a_back_off_still_expire(upstreams, relay, tmp_path):
    """The backup is backed off for an hour after its first 451; copies that
    reach retry_max_age_seconds meanwhile are dead-lettered, not left to
    wait for the probe."""
    primary, backup = upstreams("primary"), upstreams("backup")
    backup.set_rules(mail=DOWN)
    service = relay(primary.address, [backup.address], relay_retry_max_age_seconds=2, **NEVER)
    for n in range(5):
        assert send(service.address, ["bob@example.com"], f"expiring-{n}") == {}
    dead = wait_until(
        lambda: (lambda d: d if len(d) == 5 else None)(
            [e for e in queue_entries(service.spool) if e["state"] == "dead"]),
        timeout=15, what="every copy to expire",
    )
    assert all(e["last_reply"].startswith("expired after ") and DOWN in e["last_reply"] for e in dead)
    assert backup.count() == 0


def test_inflow_control_delays_mail_only_when_short_of_cpu(upstreams, relay, tmp_path, monkeypatch):
    """A backlog for a reachable but slow backup: while the relay has CPU to
    spare, MAIL is answered at once (a slow backup never slows the primary
    path); while the event loop runs late (a greenlet burns CPU here, as a
    CPU-bound relay would), new transactions wait before MAIL and the
    inflow metric counts the wait."""
    from smtpdup import delivery, metrics

    monkeypatch.setattr(delivery, "CONGESTED_READY", 50)  # a ready queue this long is "behind"
    primary, (backup1,), addresses = _backlog(upstreams, relay, tmp_path, 120, backups=1)
    backup1.set_rules(data_delay_seconds=1)
    service = _restart_due(relay, primary, addresses, relay_backup_concurrency=2)
    wait_until(lambda: service.scheduler.pending_count() >= 100 and service.scheduler.loaded.is_set(),
               what="the backlog indexed")

    def mail_seconds() -> float:
        with smtplib.SMTP(*service.address, timeout=30) as smtp:
            smtp.ehlo()
            started = time.monotonic()
            code, _ = smtp.mail("alice@example.com")
            assert code == 250
            return time.monotonic() - started

    waited_before = metrics.INFLOW_DELAY._value.get()
    assert mail_seconds() < 0.5
    assert metrics.INFLOW_DELAY._value.get() == waited_before

    burning = True

    def burn() -> None:  # 10 ms of CPU between yields: the loop runs late
        while burning:
            until = time.monotonic() + 0.01
            while time.monotonic() < until:
                pass
            gevent.sleep(0.001)

    monkeypatch.setattr(delivery, "CONGESTED_LAG_SECONDS", 0.002)

    burner = gevent.spawn(burn)
    try:
        wait_until(lambda: service.scheduler.congested(), timeout=10, what="the relay to see itself short of CPU")
        assert mail_seconds() >= 0.3
        assert metrics.INFLOW_DELAY._value.get() > waited_before
    finally:
        burning = False
        burner.join(5)


def test_a_copy_read_from_disk_while_its_sibling_finishes_still_goes(upstreams, relay, tmp_path, monkeypatch):
    """Backup 1's next copies are read from disk in one threadpool trip;
    meanwhile backup 2's copy of one of those messages, already in memory,
    finishes and drops the message from memory. Backup 1's copy of it must
    still be queued (a 100,000-copy drain lost a few hundred this way: they
    stayed pending, unattempted, until a restart)."""
    from smtpdup import delivery
    from smtpdup.spool import Spool

    primary, (backup1, backup2), addresses = _backlog(upstreams, relay, tmp_path, 4)
    config = config_module.load(None, relay_environ(tmp_path, primary.address, addresses, **NEVER))
    spool = Spool(config.relay.spool_dir)
    scheduler = delivery.Scheduler(config_module.Current(config), spool)
    scheduler.loaded.set()
    first, second = sorted(m.queue_id for m in spool.messages())[:2]
    held = spool.load(first)
    scheduler._queue(held, held.copies[1])  # backup 2's copy of `first`, in memory
    for queue_id in (first, second):
        heapq.heappush(scheduler._delayed[addresses[0]], (0.0, f"{queue_id}/0"))
    read_from_disk = delivery.blocking

    def meanwhile_backup2_finishes(fn, *args):
        result = read_from_disk(fn, *args)
        scheduler._ready[addresses[1]].popleft()
        scheduler._release(first)
        return result

    monkeypatch.setattr(delivery, "blocking", meanwhile_backup2_finishes)
    try:
        scheduler._promote(time.time())
        assert list(scheduler._ready[addresses[0]]) == [f"{first}/0", f"{second}/0"]
    finally:
        scheduler.pool.kill()
        spool.close()
