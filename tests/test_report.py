"""report: readiness counts, refused recipients/domains, durations, queue list."""

from __future__ import annotations

import json
import time

import pytest

from smtpdup.report import (
    BackupReport,
    RefusedRecipient,
    build_report,
    format_queue,
    format_text,
    parse_duration,
    queue_entries,
    to_json,
)
from smtpdup.spool import Envelope, Spool, Target, new_queue_id

NOW = time.time()


@pytest.fixture
def spool(tmp_path) -> Spool:
    s = Spool(str(tmp_path / "spool"))
    yield s
    s.close()


def spool_message(spool: Spool, targets, sender="alice@example.org", received_at=NOW - 90):
    recipients = tuple(dict.fromkeys(r for t in targets for r in t.recipients))
    envelope = Envelope(new_queue_id(), sender, recipients, "192.0.2.1", received_at=received_at)
    with spool.create(envelope, targets) as f:
        f.write(b"Subject: x\r\n\r\nhello\r\n")
        f.commit()
    return spool.load(envelope.queue_id)


def event(spool: Spool, kind: str, destination: str, t: float, **fields):
    spool.journal({"t": t, "event": kind, "id": "x.0", "destination": destination, **fields})


# --- parse_duration -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [("30m", 1800), ("24h", 86400), ("7d", 604800), ("1.5h", 5400), (" 2H ", 7200)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "24", "h", "10s", "-1h", "1w", "0m", "1 day", "1h30m", "nan"])
def test_parse_duration_errors_are_clear(text):
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert repr(text) in str(info.value)
    assert "m, h or d" in str(info.value) or "more than zero" in str(info.value)


# --- build_report -----------------------------------------------------------------------


def test_build_report_counts_and_refusals(spool):
    since = NOW - 3600
    event(spool, "delivered", "new:25", NOW - 7200, recipients=["a@x"])  # before the window
    for _ in range(3):
        event(spool, "delivered", "new:25", NOW - 60, recipients=["a@x"])
    event(spool, "delivered", "archive:25", NOW - 60, recipients=["a@x"])
    event(spool, "dead", "new:25", NOW - 50, recipients=["b@y"], reply="550 5.1.1 no")  # the letter counts
    event(spool, "refused", "new:25", NOW - 40, recipient="b@Example.COM", reply="550 5.1.1 old reply")
    event(spool, "refused", "new:25", NOW - 30, recipient="b@Example.COM", reply="550 5.1.1 last reply")
    event(spool, "refused", "new:25", NOW - 35, recipient="c@example.com", reply="550 5.7.1 c")
    event(spool, "refused", "new:25", NOW - 35, recipient="d@other.org", reply="550 5.7.1 d")
    event(spool, "refused", "new:25", NOW - 7200, recipient="old@gone.org", reply="too old")
    event(spool, "deleted", "new:25", NOW - 20, recipients=["z@z"])  # not counted
    message = spool_message(spool, [Target("new:25", ("a@x",)), Target("archive:25", ("a@x",))])
    message.update(1, settled=True)
    spool.save(message)
    retrying = spool_message(spool, [Target("new:25", ("q@x",))])
    retrying.update(0, attempts=1)
    spool.save(retrying)
    dead = spool_message(spool, [Target("new:25", ("b@y",))])
    spool.dead_letter(dead, dead.copies[0], ["b@y"], "550 5.1.1 no", NOW - 50)
    dead.update(0, settled=True)
    spool.save(dead)

    reports = build_report(spool, since, destinations=["new:25", "archive:25", "idle:25"])
    assert [r.destination for r in reports] == ["new:25", "archive:25", "idle:25"]
    new, archive, idle = reports
    assert (new.delivered, new.pending, new.retrying, new.dead) == (3, 2, 1, 1)
    assert [(r.recipient, r.domain, r.count, r.last_reply) for r in new.refused_recipients] == [
        ("b@Example.COM", "example.com", 2, "550 5.1.1 last reply"),
        ("c@example.com", "example.com", 1, "550 5.7.1 c"),
        ("d@other.org", "other.org", 1, "550 5.7.1 d"),
    ]
    assert new.refused_domains == [("example.com", 3), ("other.org", 1)]
    assert (archive.delivered, archive.pending, archive.dead, archive.refused_recipients) == (1, 0, 0, [])
    assert (idle.delivered, idle.pending, idle.dead, idle.refused_domains) == (0, 0, 0, [])


def test_destinations_seen_but_not_configured_are_included(spool):
    event(spool, "delivered", "zeta:25", NOW - 10)
    event(spool, "delivered", "alpha:25", NOW - 10)
    spool_message(spool, [Target("pending-only:25", ("a@x",))])
    reports = build_report(spool, NOW - 60, destinations=["conf:25"])
    assert [r.destination for r in reports] == ["conf:25", "alpha:25", "pending-only:25", "zeta:25"]


def test_verdicts():
    def report(**kw):
        fields = dict(destination="b", delivered=5, pending=0, dead=0, refused_recipients=[], refused_domains=[])
        fields.update(kw)
        return BackupReport(**fields)

    assert report().verdict == "READY: backup took everything the primary accepted"
    assert report(delivered=0).verdict.startswith("NO DATA")
    # Copies on their first attempt do not count; those that failed one do.
    assert report(pending=2).verdict == "READY: backup took everything the primary accepted"
    assert report(pending=2, retrying=1).verdict == "NOT READY: 1 copy failed an attempt and wait for a retry"
    assert report(dead=1).verdict == "NOT READY: 1 copy dead-lettered"
    resolved = RefusedRecipient("a@x", "x", 1, "550 no", resolved=True)
    assert report(refused_recipients=[resolved]).verdict.startswith("READY")
    refused = RefusedRecipient("b@x", "x", 2, "550 no")
    assert report(refused_recipients=[resolved, refused]).verdict == "NOT READY: 1 recipient refused"
    assert report(refused_recipients=[refused]).not_ready and not report(delivered=0).not_ready


def test_a_refused_recipient_delivered_later_is_resolved(spool):
    event(spool, "refused", "new:25", NOW - 300, recipient="fixed@x.org", reply="550 5.1.1 no such user")
    event(spool, "refused", "new:25", NOW - 300, recipient="still@x.org", reply="550 5.1.1 no such user")
    event(spool, "delivered", "new:25", NOW - 400, recipients=["still@x.org"])  # before: no fix
    event(spool, "delivered", "other:25", NOW - 100, recipients=["still@x.org"])  # another backup
    event(spool, "delivered", "new:25", NOW - 100, recipients=["a@x.org", "fixed@x.org"])
    (report,) = build_report(spool, NOW - 3600, ["new:25"])[:1]
    assert [(r.recipient, r.resolved) for r in report.refused_recipients] == [
        ("still@x.org", False), ("fixed@x.org", True),
    ]
    assert report.refused_domains == [("x.org", 1)]
    assert report.verdict == "NOT READY: 1 recipient refused"
    text = format_text([report], "1h")
    assert any(line.split()[:2] == ["fixed@x.org", "resolved"] for line in text.splitlines())
    assert any(line.split()[:2] == ["still@x.org", "refused"] for line in text.splitlines())
    # Refused again after the delivery: unresolved again.
    event(spool, "refused", "new:25", NOW - 50, recipient="fixed@x.org", reply="550 5.1.1 gone again")
    (report,) = build_report(spool, NOW - 3600, ["new:25"])[:1]
    assert not any(r.resolved for r in report.refused_recipients)


def test_format_text_clean_and_dirty(spool):
    event(spool, "delivered", "clean:25", NOW - 10)
    for r in ("x@a.org", "y@a.org", "z@b.org"):
        event(spool, "refused", "dirty:25", NOW - 10, recipient=r, reply="550 5.1.1\nmulti-line")
    reports = build_report(spool, NOW - 3600, ["clean:25", "dirty:25"])
    text = format_text(reports, "1h")
    assert "last 1h" in text
    assert "no refused recipients" in text
    assert "a.org" in text and "z@b.org" in text and "550 5.1.1 multi-line" in text
    last_lines = text.rstrip("\n").splitlines()[-2:]
    assert last_lines == [
        "  clean:25: READY: backup took everything the primary accepted",
        "  dirty:25: NOT READY: 3 recipients refused",
    ]


def test_to_json_shape(spool):
    event(spool, "refused", "b:25", NOW - 10, recipient="x@a.org", reply="550 no")
    since = 1700000000.0
    obj = to_json(build_report(spool, since, ["b:25"]), since)
    json.dumps(obj)  # serialisable
    assert obj["since"] == "2023-11-14T22:13:20Z"
    (backup,) = obj["backups"]
    assert {k: backup[k] for k in ("destination", "delivered", "pending", "retrying", "dead")} == {
        "destination": "b:25",
        "delivered": 0,
        "pending": 0,
        "retrying": 0,
        "dead": 0,
    }
    assert backup["refused_recipients"] == [
        {"recipient": "x@a.org", "domain": "a.org", "count": 1, "last_reply": "550 no", "resolved": False}
    ]
    assert backup["refused_domains"] == [{"domain": "a.org", "count": 1}]
    assert backup["ready"] is False


# --- queue list -----------------------------------------------------------------------------


def test_queue_entries_pending_and_dead(spool):
    message = spool_message(
        spool, [Target("new:25", ("a@x", "b@x")), Target("archive:25", ("a@x",))], received_at=NOW - 120
    )
    qid = message.queue_id
    copy = message.update(0, recipients=("a@x",), attempts=2, last_reply="451 4.3.0 later", next_attempt=NOW + 60)
    spool.dead_letter(message, copy, ["b@x"], "550 5.1.1 b unknown", now=NOW - 5)
    message.update(1, settled=True)
    spool.save(message)

    entries = queue_entries(spool, now=NOW)
    assert [(e["id"], e["state"]) for e in entries] == [(f"{qid}.0", "dead"), (f"{qid}.0", "pending")]
    dead, pending = entries
    assert pending == {
        "id": f"{qid}.0",
        "queue_id": qid,
        "age_seconds": pytest.approx(120),
        "sender": "alice@example.org",
        "recipients": ["a@x"],
        "destination": "new:25",
        "state": "pending",
        "attempts": 2,
        "last_reply": "451 4.3.0 later",
        "next_attempt": NOW + 60,
    }
    assert dead["recipients"] == ["b@x"] and dead["last_reply"] == "550 5.1.1 b unknown"
    assert dead["next_attempt"] is None and dead["attempts"] == 2
    json.dumps(entries)

    text = format_queue(entries)
    assert text.splitlines()[0].split()[:3] == ["ID", "AGE", "STATE"]
    assert f"{qid}.0" in text and "2m" in text and "new:25" in text
    assert text.endswith("1 pending, 1 dead\n")


def test_format_queue_empty_and_many_recipients():
    assert format_queue([]) == "0 pending, 0 dead\n"
    entry = {
        "id": "q.1", "queue_id": "q", "age_seconds": 3 * 86400 + 7200, "sender": "", "recipients": ["a@x", "b@x", "c@x"],
        "destination": "d:25", "state": "pending", "attempts": 0, "last_reply": "", "next_attempt": 0.0,
    }
    text = format_queue([entry])
    assert "a@x (+2)" in text and "<>" in text and "3d02h" in text
    assert text.endswith("1 pending, 0 dead\n")
