"""Spool: durable write/commit, state, dead letters, recovery, journal."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtpdup import spool as spool_module
from smtpdup.spool import (
    AttemptOutcome,
    Envelope,
    Message,
    Spool,
    SpoolError,
    Target,
    copy_id,
    new_queue_id,
    queue_id_time,
)

CONTENT = b"Subject: hi\r\n\r\nline one\r\n..dot-stuffed\r\n"
DAY = 86400.0


def make_envelope(**overrides: object) -> Envelope:
    fields: dict = {
        "queue_id": new_queue_id(),
        "sender": "alice@example.org",
        "recipients": ("bob@example.com", "carol@example.net"),
        "client": "192.0.2.7",
        "smtputf8": False,
        "body": "8BITMIME",
        "received_at": 1700000000.5,
    }
    fields.update(overrides)
    return Envelope(**fields)


TARGETS = (
    Target("backup1:25", ("bob@example.com", "carol@example.net")),
    Target("archive:25", ("bob@example.com",)),
)


def spool_message(
    spool: Spool,
    content: bytes = CONTENT,
    targets=TARGETS,
    **overrides: object,
) -> Envelope:
    envelope = make_envelope(**overrides)
    with spool.create(envelope, targets) as f:
        if content:
            f.write(content[:10])
            f.write(content[10:])
        f.sync()
        f.commit()
    spool.sync_directory()
    return envelope


def read_content(spool: Spool, message: Message) -> bytes:
    with spool.open_content(message) as f:
        return f.read(message.content_length)


@pytest.fixture
def spool(tmp_path) -> Spool:
    s = Spool(str(tmp_path / "spool"))
    yield s
    s.close()


def files_under(root) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names
    )


# --- ids ----------------------------------------------------------------------


def test_queue_ids_are_unique_hex_and_sort_by_time():
    ids = [new_queue_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(len(i) == 20 and int(i, 16) >= 0 for i in ids)
    assert abs(queue_id_time(ids[0]) - time.time()) < 5
    before = new_queue_id()
    time.sleep(0.002)
    assert new_queue_id() > before
    with pytest.raises(ValueError):
        queue_id_time("../etc/passwd")


# --- opening the spool -----------------------------------------------------------


def test_creates_private_directories_with_parents(tmp_path):
    root = tmp_path / "a" / "b" / "spool"
    Spool(str(root)).close()
    for sub in ("tmp", "msg", "dead", "journal"):
        assert stat.S_IMODE(os.stat(root / sub).st_mode) == 0o700
    assert os.listdir(root / "tmp") == []  # the probe is gone


def test_spool_on_a_regular_file_is_one_line_error(tmp_path):
    path = tmp_path / "not-a-dir"
    path.write_text("x")
    with pytest.raises(SpoolError) as info:
        Spool(str(path))
    message = str(info.value)
    assert message.startswith("spool: ") and str(path) in message and "\n" not in message


def test_spool_whose_subdirectory_is_a_file_is_an_error(tmp_path):
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "msg").write_text("x")
    with pytest.raises(SpoolError, match="cannot create"):
        Spool(str(tmp_path / "spool"))


def test_spool_under_a_file_is_an_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpoolError):
        Spool(str(tmp_path / "file" / "spool"))


def test_unwritable_disk_is_spool_error(tmp_path, monkeypatch):
    # Tests run as root, so simulate EROFS at the probe.
    def fail(fd):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(spool_module.os, "fsync", fail)
    with pytest.raises(SpoolError, match=r"is not writable: \[Errno 30\] Read-only file system"):
        Spool(str(tmp_path / "spool"))


# --- writing -----------------------------------------------------------------------


def test_commit_then_messages_sees_content_intact(spool):
    envelope = spool_message(spool)
    messages = list(spool.messages())
    assert len(messages) == 1
    message = messages[0]
    assert message.envelope == envelope
    assert [(c.index, c.destination, c.recipients, c.attempts, c.settled) for c in message.copies] == [
        (0, "backup1:25", ("bob@example.com", "carol@example.net"), 0, False),
        (1, "archive:25", ("bob@example.com",), 0, False),
    ]
    assert message.content_length == len(CONTENT)
    assert read_content(spool, message) == CONTENT
    path = os.path.join(spool.directory, "msg", envelope.queue_id)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(os.path.join(spool.directory, "tmp")) == []


def test_file_format_is_header_line_then_content(spool):
    envelope = spool_message(spool)
    with open(os.path.join(spool.directory, "msg", envelope.queue_id), "rb") as f:
        raw = f.read()
    header, _, content = raw.partition(b"\n")
    assert content == CONTENT
    obj = json.loads(header)
    assert obj["v"] == 1 and obj["id"] == envelope.queue_id
    assert obj["targets"][1] == {"destination": "archive:25", "recipients": ["bob@example.com"]}
    assert set(obj) == {
        "v", "id", "sender", "recipients", "client", "smtputf8", "body", "received_at", "targets"
    }


def test_empty_content_and_no_writes_still_commits_header(spool):
    envelope = spool_message(spool, content=b"")
    message = spool.load(envelope.queue_id)
    assert message is not None and message.content_length == 0
    assert read_content(spool, message) == b""


def test_memoryview_and_large_writes(spool):
    big = (b"x" * 998 + b"\r\n") * 5000
    envelope = make_envelope()
    with spool.create(envelope, TARGETS) as f:
        f.write(memoryview(big)[:3])
        f.write(bytearray(big[3:]))
        f.commit()
    assert read_content(spool, spool.load(envelope.queue_id)) == big


def test_short_writes_are_completed(spool, monkeypatch):
    real_write, real_writev = os.write, os.writev

    def short_write(fd, data):
        return real_write(fd, bytes(memoryview(data)[:7]))

    def short_writev(fd, buffers):
        return real_writev(fd, [bytes(memoryview(buffers[0])[:5])])

    monkeypatch.setattr(spool_module.os, "write", short_write)
    monkeypatch.setattr(spool_module.os, "writev", short_writev)
    envelope = make_envelope()
    with spool.create(envelope, TARGETS) as f:
        f.write(CONTENT)
        f.write(CONTENT)
        f.commit()
    monkeypatch.undo()
    assert read_content(spool, spool.load(envelope.queue_id)) == CONTENT * 2


def test_commit_fsyncs_content_written_after_sync(spool, monkeypatch):
    synced = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(spool_module.os, "fdatasync", lambda fd: (synced.append(fd), real_fdatasync(fd)))
    f = spool.create(make_envelope(), TARGETS)
    f.write(b"a\r\n")
    f.sync()
    assert len(synced) == 1
    f.commit()  # nothing new: no second fsync
    assert len(synced) == 1

    g = spool.create(make_envelope(), TARGETS)
    g.write(b"a\r\n")
    g.sync()
    g.write(b"b\r\n")  # written after sync: commit must fsync again
    g.commit()
    assert len(synced) == 3


def test_discard_leaves_nothing_and_is_idempotent(spool):
    f = spool.create(make_envelope(), TARGETS)
    f.write(CONTENT)
    f.discard()
    f.discard()
    assert files_under(spool.directory) == []
    with pytest.raises(ValueError):
        f.write(b"more")


def test_context_manager_discards_unless_committed(spool):
    with pytest.raises(RuntimeError):
        with spool.create(make_envelope(), TARGETS) as f:
            f.write(CONTENT)
            raise RuntimeError("client went away")
    assert files_under(spool.directory) == []
    with spool.create(make_envelope(), TARGETS) as f:
        f.write(CONTENT)
        f.commit()
    f.discard()  # after commit: no-op
    assert len(list(spool.messages())) == 1


def test_uncommitted_message_is_invisible(spool):
    f = spool.create(make_envelope(), TARGETS)
    f.write(CONTENT)
    f.sync()
    assert list(spool.messages()) == []
    f.discard()


def test_create_rejects_a_bad_queue_id(spool):
    with pytest.raises(ValueError):
        spool.create(make_envelope(queue_id="../../etc/x"), TARGETS)


def test_messages_in_queue_id_order_and_load(spool):
    ids = sorted(spool_message(spool).queue_id for _ in range(5))
    assert [m.queue_id for m in spool.messages()] == ids
    assert spool.load(ids[2]).queue_id == ids[2]
    assert spool.load("0" * 20) is None
    assert spool.load("../msg/x") is None


def test_open_content_after_delete_raises(spool):
    envelope = spool_message(spool)
    message = spool.load(envelope.queue_id)
    spool.delete(envelope.queue_id)
    with pytest.raises(FileNotFoundError):
        spool.open_content(message)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sender=st.text(max_size=40),
    recipients=st.lists(st.text(min_size=1, max_size=40), max_size=5),
    client=st.text(max_size=20),
    smtputf8=st.booleans(),
    body=st.none() | st.sampled_from(["7BIT", "8BITMIME"]),
    received_at=st.floats(min_value=0, max_value=4e9),
    destinations=st.lists(st.text(min_size=1, max_size=30), max_size=3),
    content=st.binary(max_size=300),
)
def test_header_roundtrip(spool, sender, recipients, client, smtputf8, body, received_at, destinations, content):
    # st.text includes newlines, NULs, non-BMP characters and lone surrogates
    # (what surrogateescape makes of bad bytes): all must round-trip.
    envelope = Envelope(new_queue_id(), sender, tuple(recipients), client, smtputf8, body, received_at)
    targets = [Target(d, tuple(recipients[: i + 1])) for i, d in enumerate(destinations)]
    with spool.create(envelope, targets) as f:
        f.write(content)
        f.commit()
    message = spool.load(envelope.queue_id)
    assert message is not None
    assert message.envelope == envelope
    assert [(c.destination, tuple(c.recipients)) for c in message.copies] == [
        (t.destination, t.recipients) for t in targets
    ]
    assert read_content(spool, message) == content
    spool.delete(envelope.queue_id)


def test_utf8_addresses_stored_as_utf8(spool):
    envelope = spool_message(spool, sender="jörg@bücher.example", recipients=("用户@例子.广告",), smtputf8=True)
    with open(os.path.join(spool.directory, "msg", envelope.queue_id), "rb") as f:
        header = f.readline()
    assert "jörg@bücher.example".encode() in header
    assert spool.load(envelope.queue_id).envelope.recipients == ("用户@例子.广告",)


# --- state -------------------------------------------------------------------------


def test_save_with_every_copy_settled_removes_the_message(spool):
    envelope = spool_message(spool)
    message = spool.load(envelope.queue_id)
    message.update(0, settled=True)
    spool.save(message)
    assert spool.load(envelope.queue_id) is not None
    message.update(1, settled=True)
    spool.save(message)
    assert spool.load(envelope.queue_id) is None
    assert files_under(os.path.join(spool.directory, "msg")) == []
    assert files_under(os.path.join(spool.directory, "tmp")) == []


def test_a_small_message_is_read_whole_with_its_header_a_large_one_is_not(spool):
    """A queued small message needs no second read to be delivered: its
    content comes with the header's read. A large one is read when sent."""
    small = spool.load(spool_message(spool).queue_id)
    assert small.content is not None and b"".join(small.content) == CONTENT
    large_content = b"x" * 8000 + b"\r\n"
    large = spool.load(spool_message(spool, content=large_content).queue_id)
    assert large.content is None
    with spool.open_content(large) as f:
        assert f.read(large.content_length) == large_content


def test_partial_state_is_persisted_and_reloaded(spool):
    envelope = spool_message(spool)
    message = spool.load(envelope.queue_id)
    message.update(0, recipients=("carol@example.net",), attempts=3, next_attempt=1700000240.0,
                   last_reply="451 4.3.0 try later")
    message.update(1, settled=True)
    spool.save(message)
    state_path = os.path.join(spool.directory, "msg", envelope.queue_id + ".state")
    assert stat.S_IMODE(os.stat(state_path).st_mode) == 0o600
    again = spool.load(envelope.queue_id)
    assert again.copies == message.copies
    assert [c.index for c in again.pending()] == [0]
    assert next(spool.messages()).copies == message.copies
    assert os.listdir(os.path.join(spool.directory, "tmp")) == []


def test_save_keeps_a_copy_settled_by_another_process(spool):
    envelope = spool_message(spool)
    in_relay = spool.load(envelope.queue_id)
    assert spool.delete(copy_id(envelope.queue_id, 1)) == 1  # `queue delete` meanwhile
    in_relay.update(0, attempts=1)
    spool.save(in_relay)  # must not resurrect copy 1
    assert in_relay.copies[1].settled
    assert [c.index for c in spool.load(envelope.queue_id).pending()] == [0]


def test_save_after_message_deleted_leaves_no_orphan_state(spool):
    envelope = spool_message(spool)
    in_relay = spool.load(envelope.queue_id)
    spool.delete(envelope.queue_id)
    in_relay.update(0, attempts=1)
    spool.save(in_relay)
    assert files_under(os.path.join(spool.directory, "msg")) == []


def test_corrupt_state_means_fresh_copies_not_loss(spool):
    envelope = spool_message(spool)
    state_path = os.path.join(spool.directory, "msg", envelope.queue_id + ".state")
    with open(state_path, "wb") as f:
        f.write(b"")  # what a crash can leave of a state file never fsynced
    message = spool.load(envelope.queue_id)
    assert [c.settled for c in message.copies] == [False, False]
    assert not os.path.exists(state_path)
    assert len(os.listdir(os.path.join(spool.directory, "corrupt"))) == 1


# --- corrupt messages ----------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json\r\nbody",
        b"no newline at all",
        b'{"v":2}\nbody',
        b"[1,2]\nbody",
        b'{"v":1,"id":"ffffffffffffffffffff","sender":"a","recipients":[],"client":"c",'
        b'"smtputf8":false,"body":null,"received_at":0,"targets":[]}\nbody',
        b"\xff\xfe\n",
    ],
)
def test_corrupt_header_is_quarantined(spool, raw):
    good = spool_message(spool)
    bad_id = new_queue_id()
    with open(os.path.join(spool.directory, "msg", bad_id), "wb") as f:
        f.write(raw)
    assert [m.queue_id for m in spool.messages()] == [good.queue_id]
    assert os.path.exists(os.path.join(spool.directory, "corrupt", bad_id))
    assert not os.path.exists(os.path.join(spool.directory, "msg", bad_id))


def test_wrong_field_types_are_corrupt(spool):
    envelope = spool_message(spool)
    path = os.path.join(spool.directory, "msg", envelope.queue_id)
    with open(path, "rb") as f:
        header, _, content = f.read().partition(b"\n")
    obj = json.loads(header)
    obj["recipients"] = "bob@example.com"
    with open(path, "wb") as f:
        f.write(json.dumps(obj).encode() + b"\n" + content)
    assert spool.load(envelope.queue_id) is None
    assert os.listdir(os.path.join(spool.directory, "corrupt")) == [envelope.queue_id]


def test_foreign_files_in_msg_are_ignored(spool):
    spool_message(spool)
    open(os.path.join(spool.directory, "msg", ".swp"), "w").close()
    assert len(list(spool.messages())) == 1
    assert os.path.exists(os.path.join(spool.directory, "msg", ".swp"))


# --- recovery ----------------------------------------------------------------------


def test_recover_removes_crash_leftovers_and_keeps_committed(spool):
    kept = spool_message(spool)
    # A crash mid-DATA: an uncommitted file left in tmp/ (its fd dies with the process).
    crashed = spool.create(make_envelope(), TARGETS)
    crashed.write(CONTENT[:5])
    os.close(crashed._fd)
    with open(os.path.join(spool.directory, "tmp", "x.state.abcd"), "wb") as f:
        f.write(b"{")
    # A message whose state says everything is settled (crash before removal).
    done = spool_message(spool)
    with open(os.path.join(spool.directory, "msg", done.queue_id + ".state"), "wb") as f:
        f.write(json.dumps({"v": 1, "copies": [
            {"index": i, "recipients": [], "attempts": 1, "next_attempt": 0, "last_reply": "", "settled": True}
            for i in range(2)
        ]}).encode())
    # Orphans: a state without message, a dead-letter record without link.
    open(os.path.join(spool.directory, "msg", new_queue_id() + ".state"), "w").close()
    open(os.path.join(spool.directory, "dead", new_queue_id() + ".0.json"), "w").close()

    restarted = Spool(spool.directory)
    assert restarted.recover() == 6
    assert [m.queue_id for m in restarted.messages()] == [kept.queue_id]
    assert files_under(os.path.join(spool.directory, "tmp")) == []
    assert files_under(os.path.join(spool.directory, "dead")) == []
    assert restarted.recover() == 0
    restarted.close()


# --- dead letters ------------------------------------------------------------------


def test_dead_letter_keeps_content_after_message_removed(spool):
    envelope = spool_message(spool)
    message = spool.load(envelope.queue_id)
    copy = message.update(1, attempts=4)
    letter = spool.dead_letter(message, copy, copy.recipients, "550 5.1.1 no such user", now=1700000100.0)
    assert letter.id == f"{envelope.queue_id}.1"
    assert letter.recipients == ("bob@example.com",)
    assert message.copies[1] == copy  # unchanged: settling is record_outcomes' job
    msg_path = os.path.join(spool.directory, "msg", envelope.queue_id)
    dead_path = os.path.join(spool.directory, "dead", letter.id)
    assert os.stat(msg_path).st_ino == os.stat(dead_path).st_ino  # linked, not copied
    assert stat.S_IMODE(os.stat(dead_path + ".json").st_mode) == 0o600

    for c in message.copies:
        message.update(c.index, settled=True)
    spool.save(message)
    assert spool.load(envelope.queue_id) is None

    letters = list(spool.dead_letters())
    assert letters == [letter]
    assert letters[0].envelope == envelope
    assert letters[0].attempts == 4 and letters[0].reason == "550 5.1.1 no such user"
    with open(dead_path, "rb") as f:
        assert f.read().partition(b"\n")[2] == CONTENT
    events = list(spool.journal_since(0))
    assert events == [
        {
            "t": 1700000100.0,
            "event": "dead",
            "id": letter.id,
            "destination": "archive:25",
            "recipients": ["bob@example.com"],
            "reply": "550 5.1.1 no such user",
        }
    ]


def test_record_outcomes_journals_then_dead_letters_then_saves_each_message_once(spool):
    """A batch: copy 0 delivered to bob and refused for carol, copy 1 dead
    (both settled), and a copy of another message deferred. The journal
    holds the lines in order, the dead letter keeps its content although
    the settled message file is gone, the deferred copy's state is saved."""
    envelope = spool_message(spool)
    other = spool_message(spool)
    now = time.time()  # journal lines go to the day file of their time: all of today
    message, second = spool.load(envelope.queue_id), spool.load(other.queue_id)
    first, dead_copy = (message.update(i, attempts=1, settled=True) for i in range(2))
    waiting = second.update(0, attempts=1, next_attempt=1700000200.0, recipients=("carol@example.net",))
    errors = spool.record_outcomes([
        AttemptOutcome(message, first, ["bob@example.com"], [], [("carol@example.net", "550 5.1.1 unknown")],
                       ["carol@example.net"], "250 2.0.0 ok", "550 5.1.1 unknown", now),
        AttemptOutcome(second, waiting, ["bob@example.com"], ["carol@example.net"], [], [], "451 4.3.0 later", "",
                       now),
        AttemptOutcome(message, dead_copy, [], [], [], ["bob@example.com"], "550 5.7.1 no", "550 5.7.1 no",
                       now),
    ])
    assert errors == [None, None, None]
    events = [(e["event"], e["id"]) for e in spool.journal_since(0)]
    assert events == [
        ("delivered", f"{envelope.queue_id}.0"), ("refused", f"{envelope.queue_id}.0"),
        ("dead", f"{envelope.queue_id}.0"),
        ("delivered", f"{other.queue_id}.0"), ("deferred", f"{other.queue_id}.0"),
        ("dead", f"{envelope.queue_id}.1"),
    ]
    assert spool.load(envelope.queue_id) is None  # every copy settled: the file went, last
    letters = {letter.id: letter for letter in spool.dead_letters()}
    assert sorted(letters) == [f"{envelope.queue_id}.0", f"{envelope.queue_id}.1"]
    with open(os.path.join(spool.directory, "dead", f"{envelope.queue_id}.1"), "rb") as f:
        assert f.read().partition(b"\n")[2] == CONTENT
    reloaded = spool.load(other.queue_id)
    assert reloaded.copies[0].recipients == ("carol@example.net",)
    assert reloaded.copies[0].next_attempt == 1700000200.0


def test_second_dead_letter_for_one_copy_merges(spool):
    envelope = spool_message(spool)
    message = spool.load(envelope.queue_id)
    copy = message.copies[0]
    spool.dead_letter(message, copy, ["bob@example.com"], "550 5.1.1 bob unknown", now=1.0)
    letter = spool.dead_letter(message, copy, ["carol@example.net"], "550 5.1.1 carol unknown", now=2.0)
    assert letter.recipients == ("bob@example.com", "carol@example.net")
    assert letter.reason == "550 5.1.1 bob unknown | 550 5.1.1 carol unknown"
    assert list(spool.dead_letters()) == [letter]
    assert len([e for e in spool.journal_since(0) if e["event"] == "dead"]) == 2


def test_dead_letter_without_record_is_still_listed(spool):
    envelope = spool_message(spool)
    message = spool.load(envelope.queue_id)
    letter = spool.dead_letter(message, message.copies[0], ["bob@example.com"], "554 no", now=5.0)
    os.unlink(os.path.join(spool.directory, "dead", letter.id + ".json"))  # crash before the record
    (listed,) = spool.dead_letters()
    assert listed.id == letter.id and listed.destination == "backup1:25"
    assert "unknown" in listed.reason


def test_dead_letter_of_deleted_message_raises(spool):
    envelope = spool_message(spool)
    message = spool.load(envelope.queue_id)
    spool.delete(envelope.queue_id)
    with pytest.raises(FileNotFoundError):
        spool.dead_letter(message, message.copies[0], ["bob@example.com"], "550", now=1.0)


# --- delete --------------------------------------------------------------------------


def test_delete_whole_message_with_its_dead_letters(spool):
    envelope = spool_message(spool)
    other = spool_message(spool)
    message = spool.load(envelope.queue_id)
    spool.dead_letter(message, message.copies[0], ["bob@example.com"], "550", now=1.0)
    assert spool.delete(envelope.queue_id) == 3  # two pending copies + one dead letter
    assert spool.load(envelope.queue_id) is None
    assert list(spool.dead_letters()) == []
    assert [m.queue_id for m in spool.messages()] == [other.queue_id]
    assert spool.delete(envelope.queue_id) == 0
    deleted = [e for e in spool.journal_since(0) if e["event"] == "deleted"]
    assert sorted(e["id"] for e in deleted) == [f"{envelope.queue_id}.0", f"{envelope.queue_id}.1"]


def test_delete_one_pending_copy(spool):
    envelope = spool_message(spool)
    assert spool.delete(f"{envelope.queue_id}.0") == 1
    message = spool.load(envelope.queue_id)
    assert [c.index for c in message.pending()] == [1]
    assert spool.delete(f"{envelope.queue_id}.0") == 0
    assert spool.delete(f"{envelope.queue_id}.1") == 1  # last copy: message gone
    assert spool.load(envelope.queue_id) is None
    assert files_under(os.path.join(spool.directory, "msg")) == []


def test_delete_one_dead_letter(spool):
    envelope = spool_message(spool)
    message = spool.load(envelope.queue_id)
    copy = message.copies[1]
    spool.dead_letter(message, copy, copy.recipients, "550", now=1.0)
    message.update(1, settled=True)
    spool.save(message)
    assert spool.delete(f"{envelope.queue_id}.1") == 1
    assert list(spool.dead_letters()) == []
    assert files_under(os.path.join(spool.directory, "dead")) == []
    assert [c.index for c in spool.load(envelope.queue_id).pending()] == [0]


@pytest.mark.parametrize("bad", ["", "nope", "../msg", "0" * 20 + ".x", "0" * 20 + "/../../x", "0" * 19])
def test_delete_malformed_or_unknown_id_removes_nothing(spool, bad):
    spool_message(spool)
    assert spool.delete(bad) == 0
    assert spool.delete("f" * 20) == 0
    assert spool.delete("f" * 20 + ".3") == 0
    assert len(list(spool.messages())) == 1


# --- flush trigger --------------------------------------------------------------------


def test_flush_trigger(spool, tmp_path):
    assert spool.take_flush_request() is False
    other = Spool(spool.directory)  # `smtpdup queue flush` in another process
    other.request_flush()
    other.request_flush()
    other.close()
    assert spool.take_flush_request() is True
    assert spool.take_flush_request() is False


# --- journal ----------------------------------------------------------------------------


def test_journal_appends_lines_and_adds_time(spool):
    before = time.time()
    spool.journal({"event": "delivered", "id": "x.0", "destination": "b:25", "recipients": ["ü@x"]})
    (event,) = spool.journal_since(before - 1)
    assert before <= event["t"] <= time.time()
    assert event["recipients"] == ["ü@x"]
    (path,) = [os.path.join(spool.directory, "journal", n) for n in os.listdir(os.path.join(spool.directory, "journal"))]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.path.basename(path) == time.strftime("%Y-%m-%d.jsonl", time.gmtime(event["t"]))
    with open(path, "rb") as f:
        assert f.read().count(b"\n") == 1


def test_journal_since_reads_only_relevant_days(spool):
    now = time.time()
    base = (now // DAY) * DAY
    times = [base - 3 * DAY + 10, base - DAY + 10, base - DAY + 20, base + 10]
    for i, t in enumerate(times):
        spool.journal({"t": t, "event": "delivered", "n": i})
    journal_dir = os.path.join(spool.directory, "journal")
    assert len(os.listdir(journal_dir)) == 3
    assert [e["n"] for e in spool.journal_since(base - DAY + 15)] == [2, 3]
    assert [e["n"] for e in spool.journal_since(0)] == [0, 1, 2, 3]
    # Only day files from the day of `since` on are opened: make the oldest
    # one unopenable as a file (IsADirectoryError if it were read).
    oldest = os.path.join(journal_dir, sorted(os.listdir(journal_dir))[0])
    os.unlink(oldest)
    os.mkdir(oldest)
    assert [e["n"] for e in spool.journal_since(base - 2 * DAY)] == [1, 2, 3]
    with pytest.raises(IsADirectoryError):
        list(spool.journal_since(0))


def test_journal_day_switches_and_earlier_days(spool):
    base = 1700000000 // DAY * DAY
    for day in range(5):
        spool.journal({"t": base + day * DAY + 1, "event": "delivered", "day": day})
    spool.journal({"t": base + 1 * DAY + 5, "event": "delivered", "day": 1})  # late event
    spool.journal({"t": base + 4 * DAY + 5, "event": "delivered", "day": 4})
    assert len(spool._journal_files.by_day) <= 2  # old days closed
    assert [e["day"] for e in spool.journal_since(0)] == [0, 1, 1, 2, 3, 4, 4]


def test_journal_write_appends_the_lines_of_a_day_in_one_write(spool, monkeypatch):
    """Lines in order; consecutive lines of one day go out in one write,
    a line of another day (a late one too) in its own."""
    base = 1700000000 // DAY * DAY
    days = [1, 1, 1, 2, 2, 1, 2]
    pending: list = []
    for n, day in enumerate(days):
        spool.journal({"t": base + day * DAY + n, "event": "delivered", "n": n}, pending)
    assert [e["n"] for e in spool.journal_since(0)] == []  # nothing written yet
    writes = []
    real_write = os.write
    monkeypatch.setattr(spool_module.os, "write", lambda fd, data: (writes.append(fd), real_write(fd, data))[1])
    spool.journal_write(pending)
    assert len(writes) == 4  # [1, 1, 1], [2, 2], [1], [2]
    assert [(e["n"], int(e["t"] - base) // DAY) for e in spool.journal_since(0)] == [
        (0, 1), (1, 1), (2, 1), (5, 1), (3, 2), (4, 2), (6, 2),
    ]


def test_record_outcomes_writes_the_journal_once_per_batch(spool, monkeypatch):
    messages = [spool.load(spool_message(spool).queue_id) for _ in range(5)]
    now = time.time()
    outcomes = [
        AttemptOutcome(m, m.update(0, attempts=1, settled=True), ["bob@example.com"], [], [], [], "250 2.0.0 ok", "",
                       now)
        for m in messages
    ]
    journal_dir = os.path.join(spool.directory, "journal")
    writes = []
    real_write = os.write
    monkeypatch.setattr(
        spool_module.os, "write",
        lambda fd, data: (writes.append(os.readlink(f"/proc/self/fd/{fd}")), real_write(fd, data))[1],
    )
    assert spool.record_outcomes(outcomes) == [None] * 5
    assert [w for w in writes if w.startswith(journal_dir)] == [writes[0]]  # one write to the journal
    assert [e["id"] for e in spool.journal_since(0)] == [f"{m.queue_id}.0" for m in messages]


def test_journal_skips_torn_lines(spool):
    spool.journal({"t": 100.0, "event": "delivered", "n": 1})
    path = os.path.join(spool.directory, "journal", "1970-01-01.jsonl")
    with open(path, "ab") as f:
        f.write(b'{"t": 100.5, "event": "deliv')  # a crash mid-line
    spool.journal({"t": 101.0, "event": "delivered", "n": 2})  # glued onto the torn line
    spool.journal({"t": 102.0, "event": "delivered", "n": 3})
    with open(path, "ab") as f:
        f.write(b"[1]\n\n")
    assert [e["n"] for e in spool.journal_since(0)] == [1, 3]


def test_prune_journal(spool):
    now = 1700000000.0
    base = now // DAY * DAY
    for age_days in (40, 36, 35, 34, 0):
        spool.journal({"t": base - age_days * DAY + 1, "event": "x"})
    assert spool.prune_journal(now) == 2
    names = sorted(os.listdir(os.path.join(spool.directory, "journal")))
    assert len(names) == 3
    assert spool.prune_journal(now) == 0
    assert spool.prune_journal(now, keep_days=0) == 2  # today's file is never old enough
    open(os.path.join(spool.directory, "journal", "README"), "w").close()
    assert spool.prune_journal(now + 365 * DAY) == 1


def test_journal_helpers_event_shapes(spool):
    envelope = spool_message(spool)
    message = spool.load(envelope.queue_id)
    spool.journal_delivered(message, message.copies[0], ["bob@example.com"])
    spool.journal_refused(message, message.copies[0], "carol@example.net", "550 5.1.1 unknown")
    delivered, refused = spool.journal_since(0)
    assert {k: v for k, v in delivered.items() if k != "t"} == {
        "event": "delivered",
        "id": f"{envelope.queue_id}.0",
        "destination": "backup1:25",
        "recipients": ["bob@example.com"],
    }
    assert {k: v for k, v in refused.items() if k != "t"} == {
        "event": "refused",
        "id": f"{envelope.queue_id}.0",
        "destination": "backup1:25",
        "recipient": "carol@example.net",
        "reply": "550 5.1.1 unknown",
    }


def test_spool_imports_only_stdlib():
    import ast
    import sys

    with open(spool_module.__file__) as f:
        tree = ast.parse(f.read())
    modules = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert modules <= set(sys.stdlib_module_names) | {"__future__"}


# --- reuse of settled files ---------------------------------------------------------


def _settle(spool, message):
    for copy in message.copies:
        message.update(copy.index, settled=True)
    spool.save(message)


def test_settled_files_are_reused_and_overwritten_to_the_exact_length(tmp_path):
    spool = Spool(tmp_path / "spool")
    first = spool.create(Envelope(new_queue_id(), "a@x", ("b@y",), "127.0.0.1"), [Target("d", ("b@y",))])
    first.write(b"x" * 5000 + b"\r\n")
    first.commit()
    _settle(spool, first.message())
    assert len(os.listdir(tmp_path / "spool" / "free")) == 1
    second = spool.create(Envelope(new_queue_id(), "c@x", ("d@y",), "127.0.0.1"), [Target("d", ("d@y",))])
    second.write(b"short\r\n")
    second.commit()
    assert os.listdir(tmp_path / "spool" / "free") == []
    [message] = list(spool.messages())
    with spool.open_content(message) as f:
        assert f.read() == b"short\r\n"  # nothing of the longer old content is left


def test_settling_renames_files_away_and_trim_free_removes_the_surplus(tmp_path, monkeypatch):
    """Settling a message costs renames, not unlinks: its file and its
    state file go to free/, past FREE_FILES_MAX up to FREE_FILES_SURPLUS
    more; trim_free (off the delivery's path) cuts free/ back, and beyond
    the surplus files are unlinked at once."""
    from smtpdup import spool as spool_module

    monkeypatch.setattr(spool_module, "FREE_FILES_MAX", 2)
    monkeypatch.setattr(spool_module, "FREE_FILES_SURPLUS", 4)
    spool = Spool(tmp_path / "spool")
    free = tmp_path / "spool" / "free"
    messages = [spool.load(spool_message(spool).queue_id) for _ in range(4)]
    for n, message in enumerate(messages):
        message.update(0, settled=True)
        spool.save(message)  # a state file now
        message.update(1, settled=True)
        spool.save(message)
        assert spool.load(message.queue_id) is None
        assert len(os.listdir(free)) == min(2 * (n + 1), 6)
    assert files_under(os.path.join(spool.directory, "msg")) == []
    assert spool.trim_free() == 4
    assert len(os.listdir(free)) == 2
    assert spool.trim_free() == 0


def test_large_or_linked_files_are_not_kept_for_reuse(tmp_path):
    from smtpdup.spool import FREE_FILE_MAX_BYTES

    spool = Spool(tmp_path / "spool")
    big = spool.create(Envelope(new_queue_id(), "a@x", ("b@y",), "127.0.0.1"), [Target("d", ("b@y",))])
    big.write(b"x" * FREE_FILE_MAX_BYTES + b"\r\n")
    big.commit()
    _settle(spool, big.message())
    dead = spool.create(Envelope(new_queue_id(), "a@x", ("b@y",), "127.0.0.1"), [Target("d", ("b@y",))])
    dead.write(b"dead\r\n")
    dead.commit()
    message = dead.message()
    spool.dead_letter(message, message.copies[0], ["b@y"], "550 5.1.1 no", time.time())
    _settle(spool, message)
    assert os.listdir(tmp_path / "spool" / "free") == []
    [letter] = list(spool.dead_letters())
    assert letter.reason == "550 5.1.1 no"


# --- gathered writes, content in memory, group commit ---------------------------------


def test_small_message_is_one_writev_and_its_content_is_kept_in_memory(spool, monkeypatch):
    calls = []
    real_write, real_writev = os.write, os.writev
    monkeypatch.setattr(spool_module.os, "write", lambda fd, b: (calls.append("write"), real_write(fd, b))[1])
    monkeypatch.setattr(spool_module.os, "writev", lambda fd, bs: (calls.append("writev"), real_writev(fd, bs))[1])
    f = spool.create(make_envelope(), TARGETS)
    chunk = bytes(CONTENT)
    f.write(chunk)
    assert calls == []  # gathered with the header
    f.sync()
    assert calls == ["writev"]
    f.commit()
    message = f.message()
    assert message.content is not None and message.content[0] is chunk  # the same object: no copy
    monkeypatch.undo()
    assert read_content(spool, spool.load(f.queue_id)) == CONTENT


def test_content_in_memory_only_when_small_and_immutable(spool):
    two = spool.create(make_envelope(), TARGETS)
    first, rest = CONTENT[:10], CONTENT[10:]
    two.write(first)
    two.write(rest)
    two.commit()
    assert two.message().content == (CONTENT,)  # joined once: the delivery rereads nothing
    big = spool.create(make_envelope(), TARGETS)
    big.write(b"x" * spool_module.MEMORY_CONTENT_BYTES + b"\r\n")
    big.commit()
    assert big.message().content is None
    mutable = spool.create(make_envelope(), TARGETS)
    buffer = bytearray(CONTENT)
    mutable.write(buffer)  # written at once: the caller may reuse its buffer
    buffer[:] = b"X" * len(buffer)
    mutable.commit()
    assert mutable.message().content is None
    assert read_content(spool, spool.load(mutable.queue_id)) == CONTENT


def test_group_commit_syncs_and_commits_with_one_directory_fsync(spool, monkeypatch):
    fsyncs, datasyncs = [], []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync
    monkeypatch.setattr(spool_module.os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    monkeypatch.setattr(spool_module.os, "fdatasync", lambda fd: (datasyncs.append(fd), real_fdatasync(fd))[1])
    to_commit = []
    for _ in range(3):
        f = spool.create(make_envelope(), TARGETS)
        f.write(CONTENT)
        f.sync()
        to_commit.append(f)
    to_sync = spool.create(make_envelope(), TARGETS)
    to_sync.write(CONTENT)
    broken = spool.create(make_envelope(), TARGETS)
    broken.write(CONTENT)
    broken.sync()
    os.unlink(broken._tmp_path)  # gone behind our back: its rename fails
    datasyncs.clear()
    items = [(f, True) for f in to_commit] + [(to_sync, False), (broken, True)]
    errors = spool.group_commit(items)
    assert errors[:4] == [None] * 4
    assert isinstance(errors[4], FileNotFoundError)
    assert len(fsyncs) == 1  # msg/, once for the three renames
    assert len(datasyncs) == 1  # the file to sync; the committed ones were synced before
    assert sorted(m.queue_id for m in spool.messages()) == sorted(f.queue_id for f in to_commit)
    to_sync.discard()
    broken.discard()
