"""Durable spool of backup copies: write, fsync, commit, list, dead-letter, journal.

This module owns everything under ``relay.spool_dir`` and nothing else. It is
blocking, stdlib-only code (no gevent, sockets or log handlers): the caller
runs its blocking calls (``fsync``, directory scans) in a threadpool.

Layout (directories 0700, files 0600)::

    tmp/<qid>                 message being written: JSON header line + content
                              (by the relay, or by ``requeue`` from a dead letter)
    tmp/_<tag>-<n>            blank kept open ahead for a message to come (``prepare``;
                              a file taken from free/ where there is one)
    tmp/<qid>.state.<tag>-<n> state file being written (tag: pid + random, per process)
    tmp/<qid>.<index>.json.<r>  dead-letter record being written
    tmp/flush.<r>             flush request being written
    tmp/.probe-<pid>-<r>      start-up check that tmp/ takes files
    msg/<qid>                 committed message, immutable (msg/ stays open for its fsyncs)
    msg/<qid>.state           mutable per-copy state; absent = every copy fresh
    free/<name>               settled message file kept for reuse (see _retire), at
                              most FREE_FILES_MAX per process
    dead/<qid>.<index>        dead-lettered copy: hard link to the message file
    dead/<qid>.<index>.json   its record (destination, recipients, reason ...)
    journal/<YYYY-MM-DD>.jsonl  outcome log (UTC days) read by ``report``
    corrupt/                  quarantined files that could not be parsed
    flush                     the latest ``queue flush`` request, replaced by each new
                              one: {"t", "destinations": [...] or null for all}; it
                              stays, every relay process acts once per new file
    requeue/<qid>             marker: ``queue requeue`` made msg/<qid> (``take_requeued``)

Everything in ``tmp/`` is a leftover at start: ``recover`` removes it.

Why "a copy the sender was told is delivered is never lost" holds:

* The content is on disk before the final dot goes to the primary
  (``SpoolFile.sync``: the gathered writes, a cut to length if the file held
  a longer old message, then ``fdatasync``, which also makes durable the
  size and block map needed to read the data back; only timestamps may be
  lost). ``commit`` syncs again itself if anything was written after that,
  so a committed name always points at complete content.
* Commit is one ``rename(tmp/<qid>, msg/<qid>)``: a message is either wholly
  in ``msg/`` or not there at all, never half-written. ``sync_directory``
  (fsync of ``msg/``, through a descriptor kept open) then makes the new
  name durable; one call covers every commit before it, and the 250 goes
  to the client only after.
* Group commit (``group_commit``, one threadpool trip): the renames of every
  message whose primary said 2xx, the syncs of every message about to send
  its final dot, then ONE fsync of ``msg/``. No caller is answered before
  the call returns, so the order inside it is free; crash analysis per
  step: killed before a rename, that message is still in ``tmp/`` (removed
  by ``recover``; its client got no 250, the primary has it: the client
  retries, a duplicate at the primary, never a lost copy); killed between
  the renames and the directory fsync (crash point
  ``group_commit_before_directory_sync``), the renamed messages are in
  ``msg/`` after a kill -9 and delivered, though their clients got no 250
  (a duplicate on retry), and after a power loss either there or not, with
  the same answer to the client; a sync that fails fails only its own
  message (dropped before its final dot), a failed directory fsync fails
  every commit of the trip (each client hears 451 and retries).
* A crash before the rename leaves only ``tmp/`` leftovers, which
  ``recover`` removes: those clients never got a 2xx.
* A message file is removed only by ``save`` once every copy is settled
  (delivered to every recipient, or dead-lettered), or by an operator's
  ``delete``. Dead letters hard-link the content into ``dead/`` and fsync
  ``dead/`` before ``record_outcomes`` saves the settled copy, so content
  survives the removal of ``msg/<qid>`` without being copied.
* Small content is also handed to the delivery in memory
  (``Message.content``): the same bytes as on disk, used only while the
  message is queued; nothing about durability depends on it.
* The state file is replaced atomically but not fsynced: losing it after a
  crash only makes copies due again (an earlier retry, at worst a duplicate
  delivery of recipients already delivered): at-least-once, never zero.
  ``settled`` is monotonic: ``save`` keeps a copy settled when another process
  (``queue delete``) settled it on disk meanwhile.

Journal events (one JSON object per line, ``t`` = epoch seconds; ``id`` is
always the copy id ``<qid>.<index>``)::

    {"t", "event": "delivered", "id", "destination", "recipients": [...]}
    {"t", "event": "dead",      "id", "destination", "recipients": [...], "reply"}
    {"t", "event": "refused",   "id", "destination", "recipient", "reply"}
    {"t", "event": "deleted",   "id", "destination", "recipients": [...]}
    {"t", "event": "deferred",  "id", "destination", "recipients": [...], "reply"}
    {"t", "event": "requeued",  "id", "destination", "recipients": [...], "new_id"}

``delivered``: one per successful delivery transaction (``journal_delivered``).
``dead``: written by ``dead_letter``. ``refused``: a backup permanently
refused one recipient the primary accepted (``journal_refused``, by the
delivery code). ``deleted``: an operator removed a pending copy.
``deferred``: an attempt that left recipients to retry (``journal_deferred``).
``requeued``: ``queue requeue`` made dead letter ``id`` the pending copy
``new_id`` (``requeue``).

Requeue: a dead letter becomes a new message ``msg/<new qid>`` carrying
that one copy (its destination, its dead recipients), with the content of
the dead letter, a fresh ``received_at`` (so retries and expiry start
again) and ``requeued_from`` / ``first_received_at`` in its header. A new
message, not a change to the old one, because the old one may still be in
a running relay's memory, whose next ``save`` would undo any change made
to its state behind its back. A running relay finds it through
``requeue/`` (``take_requeued``) within its poll interval.
"""

from __future__ import annotations

import calendar
import errno
import itertools
import json
import os
import posix
import re
import secrets
import signal
import time
import weakref
from collections import deque
from dataclasses import dataclass, replace
from typing import BinaryIO, Iterator, Mapping, NamedTuple, Sequence

__all__ = [
    "AttemptOutcome",
    "Copy",
    "DeadLetter",
    "Entry",
    "Envelope",
    "FlushRequest",
    "Message",
    "Spool",
    "SpoolError",
    "SpoolFile",
    "Target",
    "copy_id",
    "new_queue_id",
    "queue_id_time",
]

HEADER_VERSION = 1

# First read of a message file: headers are a few hundred bytes; a message
# this small comes whole with its header, and the delivery needs no second
# read (a larger first read would copy content a startup scan discards).
HEADER_FIRST_READ_BYTES = 4096
# Bound on a header line: smtp.max_recipients (1000) x 256-octet addresses
# (RFC 5321 path limit), once for the envelope and once per backup target,
# is well under this; anything longer is corrupt.
MAX_HEADER_BYTES = 16 * 1024 * 1024
# Bound on a state or dead-letter record read (same arithmetic as above).
MAX_RECORD_BYTES = MAX_HEADER_BYTES

DIR_MODE = 0o700
FILE_MODE = 0o600
_SECONDS_PER_DAY = 86400

_QID_RE = re.compile(r"[0-9a-f]{20}")
_COPY_ID_RE = re.compile(r"([0-9a-f]{20})\.([0-9]{1,6})")
_JOURNAL_RE = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2})\.jsonl")

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

# close(2) itself. Under gevent's monkey-patching os.close first checks the
# descriptor and stats it (two more syscalls, each a GIL round trip when
# run in the threadpool) so as to cancel any watcher of the event loop on
# it; the spool's descriptors are regular files the loop never watches.
_close = posix.close

# Files in tmp/ opened ahead of time for messages to come (Spool.prepare).
BLANK_PREFIX = "_"

# Settled message files kept under free/ for reuse by new messages: at most
# this many per process, none larger than FREE_FILE_MAX_BYTES (a large one
# would hold its disk space until reused).
FREE_FILES_MAX = 4096
FREE_FILE_MAX_BYTES = 1024 * 1024
# Beyond FREE_FILES_MAX, files of settled messages (and their state files)
# are still renamed into free/, up to this many more, and unlinked later by
# ``trim_free`` off the delivery's path: an unlink frees the file's blocks
# (~80 µs of wall time on ext4, mostly waiting), a rename costs ~15 µs.
FREE_FILES_SURPLUS = 8192
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)

# Requeue markers older than this are removed by the next requeue: every
# running relay has seen them (it polls each second), and one that starts
# later finds the messages themselves in msg/.
REQUEUE_MARKER_KEEP_SECONDS = 86400.0
# A flush request newer than this is merged into the next one (another
# destination, or all): a relay that has not polled yet sees both.
FLUSH_MERGE_SECONDS = 5.0
# A message file's writes are gathered up to this many bytes (or buffers)
# and go out in one writev (see SpoolFile).
WRITE_GATHER_BYTES = 64 * 1024
WRITE_GATHER_BUFFERS = 64
# Content up to this size is handed to the delivery in memory with the
# message (Message.content), as the chunks already received: no reread.
MEMORY_CONTENT_BYTES = 16 * 1024
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC
_APPEND_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | _O_CLOEXEC


# Crash tests kill the process at a named point (tests/test_durability.py,
# SMTPDUP_TEST_CRASH_AT as in relay.py); unset in production.
_CRASH_POINT = os.environ.get("SMTPDUP_TEST_CRASH_AT", "")


def _crash_point(name: str) -> None:
    if _CRASH_POINT == name:
        os.kill(os.getpid(), signal.SIGKILL)


class SpoolError(Exception):
    """The spool directory is unusable; the message is one line for the operator."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the primary accepted: the envelope every backup copy carries."""

    queue_id: str
    sender: str
    recipients: tuple[str, ...]  # recipients the primary accepted
    client: str  # client IP
    smtputf8: bool = False
    body: str | None = None  # MAIL BODY= value, e.g. "8BITMIME"
    received_at: float = 0.0  # epoch seconds


@dataclass(frozen=True, slots=True)
class Target:
    """One backup copy, decided at DATA start."""

    destination: str  # Destination.name (never contains a password)
    recipients: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Copy:
    """Delivery state of one copy (one target of one message), a value:
    an attempt's outcome replaces it whole (``Message.update``), so a
    thread saving the message never sees it half-changed."""

    index: int
    destination: str
    recipients: tuple[str, ...]  # still to deliver
    attempts: int = 0
    next_attempt: float = 0.0  # epoch seconds
    last_reply: str = ""
    settled: bool = False  # delivered to every recipient, or dead


@dataclass(slots=True)
class Message:
    """A committed message: its envelope, copies, and where its content lies.

    ``copies`` holds the latest state of each copy, by index; only
    ``update`` changes it, one whole Copy at a time."""

    envelope: Envelope
    copies: list[Copy]
    content_offset: int  # byte offset of content in the file
    content_length: int
    # The content itself while the message is small and queued (handed
    # over by the writer, read with the header, or read once and shared by
    # every copy); None: read it from the file. Dropped with the Message
    # once no copy is queued.
    content: tuple[bytes, ...] | None = None

    @property
    def queue_id(self) -> str:
        return self.envelope.queue_id

    def pending(self) -> list[Copy]:
        """Copies not settled yet."""
        return [c for c in self.copies if not c.settled]

    def update(self, index: int, **changes: object) -> Copy:
        """Replace copy ``index`` with one with ``changes``; returns it."""
        copy = self.copies[index] = replace(self.copies[index], **changes)
        return copy


class AttemptOutcome(NamedTuple):
    """One delivery attempt at a copy, as ``record_outcomes`` records it
    (a tuple: built per attempt on the event loop). ``copy`` is the
    copy's state after the attempt (attempts, recipients still to deliver,
    next attempt, settled), already in ``message.copies``."""

    message: Message
    copy: Copy
    delivered: Sequence[str]  # recipients this attempt delivered
    deferred: Sequence[str]  # recipients left to retry, journalled with ``reply``
    refused: Sequence[tuple[str, str]]  # (recipient, reply) refused at RCPT: journalled
    dead: Sequence[str]  # recipients to dead-letter now, with ``reason``
    reply: str  # the reply that decided the attempt
    reason: str
    now: float


@dataclass(frozen=True, slots=True)
class Blank:
    """An open file in ``tmp/``, ready to become a message (see ``prepare``)."""

    fd: int
    path: str
    old_size: int  # bytes of an old message it holds (overwritten, cut at sync); < 0 unknown


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A dead-lettered copy, kept with its content until an operator deletes it."""

    id: str  # "<qid>.<index>"
    envelope: Envelope
    destination: str
    recipients: tuple[str, ...]
    attempts: int
    reason: str  # the destination's reply, or "expired after N attempts: <last reply>"
    dead_at: float


@dataclass(frozen=True, slots=True)
class Entry:
    """One copy as ``queue show`` and the admin commands see it: a pending
    copy (``msg/``) or a dead letter (``dead/``)."""

    id: str  # "<qid>.<index>"
    state: str  # "pending" or "dead"
    envelope: Envelope
    destination: str
    recipients: tuple[str, ...]  # still to deliver (pending) or dead (dead)
    attempts: int
    next_attempt: float | None  # epoch seconds; None for a dead letter
    last_reply: str
    origin: Mapping[str, object]  # header extras: requeued_from, first_received_at
    path: str  # the file holding the content (msg/<qid> or dead/<id>)
    content_offset: int
    content_length: int


@dataclass(frozen=True, slots=True)
class FlushRequest:
    """A ``queue flush`` seen by ``take_flush``."""

    destinations: frozenset[str] | None  # None: every destination


class _IdSource:
    """Per-process part of queue ids: the pid and a counter that starts at
    a random value; renewed in a forked child."""

    def __init__(self) -> None:
        self.renew()

    def renew(self) -> None:
        pid = os.getpid()
        self.pid = pid & 0xFFFF
        self.counter = itertools.count(secrets.randbits(20))
        # Names of temporary files (blanks, state files being written):
        # unique per process without a getrandom() each.
        self.tmp_tag = f"{pid:x}-{secrets.token_hex(3)}"
        self.tmp_counter = itertools.count()


_ids = _IdSource()
os.register_at_fork(after_in_child=_ids.renew)


def new_queue_id() -> str:
    """A unique, filename-safe queue id that sorts by time.

    11 hex digits of milliseconds since the epoch (good until the year
    2527), 4 of the process id and 5 of a per-process counter: unique by
    construction (a commit renames onto this name, so it must be), and no
    syscall for randomness per message.
    """
    return f"{time.time_ns() // 1_000_000:011x}{_ids.pid:04x}{next(_ids.counter) & 0xFFFFF:05x}"


def _tmp_name() -> str:
    """A name unique among this spool's temporary files (no syscall)."""
    return f"{_ids.tmp_tag}-{next(_ids.tmp_counter)}"


def queue_id_time(queue_id: str) -> float:
    """Epoch seconds encoded in a queue id (ms precision); ValueError if malformed."""
    if not _QID_RE.fullmatch(queue_id):
        raise ValueError(f"not a queue id: {queue_id!r}")
    return int(queue_id[:11], 16) / 1000.0


def copy_id(queue_id: str, index: int) -> str:
    """The id of one copy as shown by ``queue list``: ``<qid>.<index>``."""
    return f"{queue_id}.{index}"


# --- low-level helpers -------------------------------------------------------


def _dumps(obj: object) -> bytes:
    # surrogatepass: an address decoded with surrogateescape still round-trips.
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8", "surrogatepass"
    )


def _loads(data: bytes) -> object:
    return json.loads(data.decode("utf-8", "surrogatepass"))


def _write_all(fd: int, buffers: list[bytes | bytearray | memoryview]) -> None:
    """Write every buffer in order, without joining them (no content copy)."""
    if len(buffers) == 1:
        data = buffers[0]
        n = os.write(fd, data)
        if n == len(data):
            return
        buffers = [memoryview(data)[n:]]
    else:
        total = sum(len(b) for b in buffers)
        n = os.writev(fd, buffers)
        if n == total:
            return
        views = [memoryview(b) for b in buffers]
        while n:  # drop what was written
            if n >= len(views[0]):
                n -= len(views.pop(0))
            else:
                views[0] = views[0][n:]
                n = 0
        buffers = views  # type: ignore[assignment]
    for buf in buffers:  # rare: a short write (signal, nearly full disk)
        view = memoryview(buf)
        while view:
            view = view[os.write(fd, view) :]


def _read_small(path: str, limit: int = MAX_RECORD_BYTES) -> bytes:
    """Whole small file (state or record); raises OSError, ValueError if over limit."""
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    try:
        chunks = []
        size = 0
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                raise ValueError(f"{path}: longer than {limit} bytes")
            chunks.append(chunk)
    finally:
        _close(fd)


def _unlink(path: str) -> bool:
    """Remove a file; False if it was already gone."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        _close(fd)


def _day_of(t: float) -> tuple[str, float]:
    """UTC day name (YYYY-MM-DD) of epoch seconds, and that day's start."""
    start = (int(t) // _SECONDS_PER_DAY) * _SECONDS_PER_DAY
    return time.strftime("%Y-%m-%d", time.gmtime(start)), float(start)


def _day_start(name: str) -> float:
    return float(calendar.timegm(time.strptime(name, "%Y-%m-%d")))


class _Corrupt(ValueError):
    """A spool file whose content cannot be parsed."""


def _str(obj: Mapping[str, object], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise _Corrupt(f"{key}: expected a string")
    return value


def _strs(obj: Mapping[str, object], key: str) -> tuple[str, ...]:
    value = obj.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Corrupt(f"{key}: expected a list of strings")
    return tuple(value)


def _num(obj: Mapping[str, object], key: str) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Corrupt(f"{key}: expected a number")
    return float(value)


def _int(obj: Mapping[str, object], key: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Corrupt(f"{key}: expected an integer")
    return value


def _encode_header(envelope: Envelope, targets: Sequence[Target]) -> bytes:
    return _dumps(
        {
            "v": HEADER_VERSION,
            "id": envelope.queue_id,
            "sender": envelope.sender,
            "recipients": list(envelope.recipients),
            "client": envelope.client,
            "smtputf8": envelope.smtputf8,
            "body": envelope.body,
            "received_at": envelope.received_at,
            "targets": [
                {"destination": t.destination, "recipients": list(t.recipients)}
                for t in targets
            ],
        }
    )


def _decode_header(line: bytes, queue_id: str) -> tuple[Envelope, tuple[Target, ...]]:
    try:
        obj = _loads(line)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise _Corrupt(f"header is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _Corrupt("header is not a JSON object")
    if obj.get("v") != HEADER_VERSION:
        raise _Corrupt(f"unknown header version {obj.get('v')!r}")
    if obj.get("id") != queue_id:
        raise _Corrupt(f"header id {obj.get('id')!r} does not match the file name")
    body = obj.get("body")
    if body is not None and not isinstance(body, str):
        raise _Corrupt("body: expected a string or null")
    smtputf8 = obj.get("smtputf8")
    if not isinstance(smtputf8, bool):
        raise _Corrupt("smtputf8: expected a boolean")
    raw_targets = obj.get("targets")
    if not isinstance(raw_targets, list):
        raise _Corrupt("targets: expected a list")
    targets = []
    for raw in raw_targets:
        if not isinstance(raw, dict):
            raise _Corrupt("targets: expected objects")
        targets.append(Target(_str(raw, "destination"), _strs(raw, "recipients")))
    envelope = Envelope(
        queue_id=queue_id,
        sender=_str(obj, "sender"),
        recipients=_strs(obj, "recipients"),
        client=_str(obj, "client"),
        smtputf8=smtputf8,
        body=body,
        received_at=_num(obj, "received_at"),
    )
    return envelope, tuple(targets)


def _read_header(path: str, queue_id: str) -> tuple[Envelope, tuple[Target, ...], int, int]:
    """Envelope, targets, content offset and content length of a message file.

    Reads only the header line. Raises OSError (FileNotFoundError if gone)
    or _Corrupt.
    """
    return _read_head(path, queue_id)[:4]  # type: ignore[return-value]


def _read_head(path: str, queue_id: str) -> tuple[Envelope, tuple[Target, ...], int, int, bytes | None]:
    """``_read_header``, and the content too when the first read holds the
    whole file (a small message: no second read to deliver it), else None."""
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    try:
        chunk = os.read(fd, HEADER_FIRST_READ_BYTES)
        newline = chunk.find(b"\n")
        if newline < 0:
            chunks = [chunk]
            size = len(chunk)
            while newline < 0:
                if size > MAX_HEADER_BYTES:
                    raise _Corrupt(f"no header line in the first {MAX_HEADER_BYTES} bytes")
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise _Corrupt("truncated header")
                newline = chunk.find(b"\n")
                if newline >= 0:
                    newline += size
                chunks.append(chunk)
                size += len(chunk)
            chunk = b"".join(chunks)
        file_size = os.fstat(fd).st_size
    finally:
        _close(fd)
    envelope, targets = _decode_header(chunk[:newline], queue_id)
    offset = newline + 1
    content = chunk[offset:] if len(chunk) == file_size else None
    return envelope, targets, offset, file_size - offset, content


def _read_header_extras(path: str) -> dict[str, object]:
    """``requeued_from`` and ``first_received_at`` of a message file's
    header, where present (admin path only: reads the header line again)."""
    try:
        with open(path, "rb") as f:
            obj = _loads(f.readline(MAX_HEADER_BYTES))
    except (OSError, ValueError):
        return {}
    if not isinstance(obj, dict):
        return {}
    return {k: obj[k] for k in ("requeued_from", "first_received_at") if k in obj}


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    """Copy ``length`` bytes of ``src`` from ``offset`` to the current end
    of ``dst``: in the kernel where it can (copy_file_range), else by blocks."""
    copy_file_range = getattr(os, "copy_file_range", None)
    while length > 0 and copy_file_range is not None:
        try:
            n = copy_file_range(src, dst, min(length, 1 << 30), offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            break
        if n == 0:
            raise OSError(errno.EIO, "dead letter is truncated")
        offset += n
        length -= n
    while length > 0:
        block = os.pread(src, min(length, 1 << 20), offset)
        if not block:
            raise OSError(errno.EIO, "dead letter is truncated")
        _write_all(dst, [block])
        offset += len(block)
        length -= len(block)


def _decode_state(data: bytes, targets: Sequence[Target]) -> dict[int, Copy]:
    """Copies recorded in a state file, by index; raises _Corrupt."""
    try:
        obj = _loads(data)
    except ValueError as exc:
        raise _Corrupt(f"state is not JSON: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("copies"), list):
        raise _Corrupt("state: expected an object with a copies list")
    copies: dict[int, Copy] = {}
    for raw in obj["copies"]:
        if not isinstance(raw, dict):
            raise _Corrupt("state: expected copy objects")
        index = _int(raw, "index")
        if not 0 <= index < len(targets):
            raise _Corrupt(f"state: copy index {index} out of range")
        settled = raw.get("settled")
        if not isinstance(settled, bool):
            raise _Corrupt("settled: expected a boolean")
        copies[index] = Copy(
            index=index,
            destination=targets[index].destination,  # the header is authoritative
            recipients=_strs(raw, "recipients"),
            attempts=_int(raw, "attempts"),
            next_attempt=_num(raw, "next_attempt"),
            last_reply=_str(raw, "last_reply"),
            settled=settled,
        )
    return copies


def _encode_state(copies: Sequence[Copy]) -> bytes:
    return _dumps(
        {
            "v": HEADER_VERSION,
            "copies": [
                {
                    "index": c.index,
                    "recipients": c.recipients,
                    "attempts": c.attempts,
                    "next_attempt": c.next_attempt,
                    "last_reply": c.last_reply,
                    "settled": c.settled,
                }
                for c in copies
            ],
        }
    )


def _state_all_settled(data: bytes) -> bool:
    """True if a state file records every copy settled (and at least one copy)."""
    try:
        obj = _loads(data)
    except ValueError:
        return False
    if not isinstance(obj, dict) or not isinstance(obj.get("copies"), list):
        return False
    copies = obj["copies"]
    return bool(copies) and all(isinstance(c, dict) and c.get("settled") is True for c in copies)


# --- writing a message -------------------------------------------------------


class SpoolFile:
    """A message being written to ``tmp/<qid>``; ``commit`` moves it to ``msg/``.

    Usage::

        with spool.create(envelope, targets) as f:
            for chunk in content: f.write(chunk)
            f.flush()           # optional: write what is gathered, here
            f.sync()            # before the final dot goes to the primary
            ...                 # primary answers 2xx
            f.commit()
        spool.sync_directory()  # before the 250 goes to the client

    ``Spool.group_commit`` runs ``sync`` and ``commit`` of many files in
    one call. Leaving the ``with`` block without ``commit`` discards the
    file. Not thread-safe: one writer per file.

    ``bytes`` written are gathered (references, not copies) and go out in
    one ``writev`` with the header once WRITE_GATHER_BYTES wait, or at
    ``flush``/``sync``: a small message costs one write syscall. Content of
    at most MEMORY_CONTENT_BYTES in ``bytes`` chunks is also kept (the
    chunks, joined once by ``message()``) for ``message().content``.
    """

    __slots__ = (
        "queue_id", "envelope", "targets", "content_length", "_header_length",
        "_fd", "_tmp_path", "_msg_path", "_pending", "_pending_bytes", "_kept",
        "_dirty", "_committed", "_old_size",
    )

    def __init__(
        self,
        envelope: Envelope,
        targets: Sequence[Target],
        fd: int,
        tmp_path: str,
        msg_path: str,
        header: bytes,
        old_size: int = 0,
    ) -> None:
        self.queue_id = envelope.queue_id
        self.envelope = envelope
        self.targets = tuple(targets)
        self.content_length = 0
        self._header_length = len(header)
        self._fd: int | None = fd
        self._tmp_path = tmp_path
        self._msg_path = msg_path
        # Buffers not written yet, header first: one writev for them all.
        self._pending: list[bytes | bytearray | memoryview] = [header]
        self._pending_bytes = len(header)
        self._kept: list[bytes] | None = []
        self._dirty = True
        self._committed = False
        # A reused file is overwritten from its start and cut to length at
        # sync when its old content was longer (< 0: length unknown).
        self._old_size = old_size

    def _require_open(self) -> int:
        if self._fd is None:
            raise ValueError(f"spool file {self.queue_id} is closed")
        return self._fd

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append content bytes (wire form). ``bytes`` are gathered (the
        caller cannot change them), other buffers are written at once.
        Raises OSError (a write error may also surface at the next write,
        ``flush`` or ``sync``)."""
        self._require_open()
        if not data:
            return
        length = len(data)
        kept = self._kept
        if kept is not None:
            if type(data) is bytes and self.content_length + length <= MEMORY_CONTENT_BYTES:
                kept.append(data)
            else:
                self._kept = None
        self.content_length += length
        self._dirty = True
        self._pending.append(data)
        self._pending_bytes += length
        if (
            type(data) is not bytes
            or self._pending_bytes >= WRITE_GATHER_BYTES
            or len(self._pending) >= WRITE_GATHER_BUFFERS
        ):
            self.flush()

    def flush(self) -> None:
        """Write what is gathered (page cache only, no fsync). Raises OSError."""
        pending = self._pending
        if pending:
            fd = self._require_open()
            self._pending, self._pending_bytes = [], 0
            _write_all(fd, pending)

    def message(self) -> Message:
        """The committed message as ``Spool.load`` would read it back, built
        from what this writer already knows (no read from disk), with its
        content in memory when small."""
        copies = [
            Copy(index=i, destination=t.destination, recipients=t.recipients)
            for i, t in enumerate(self.targets)
        ]
        # The chunks as received (the Received: line, then the client's),
        # joined once: each backup gets content and final dot in one send,
        # and no copy rereads the file.
        kept = self._kept
        return Message(
            self.envelope, copies, self._header_length, self.content_length, (b"".join(kept),) if kept else None,
        )

    def sync(self) -> None:
        """Write what is gathered and fdatasync the file (blocking): content
        is on disk, with the metadata needed to read it back (its size,
        its blocks), not its timestamps. Raises OSError."""
        fd = self._require_open()
        self.flush()
        length = self._header_length + self.content_length
        if self._old_size < 0 or self._old_size > length:
            os.ftruncate(fd, length)
            self._old_size = length
        os.fdatasync(fd)
        if os.fstat(fd).st_nlink == 0:
            # Removed behind our back (tmp/ deleted?): the commit would fail
            # after the primary's 2xx; say so now, before the final dot.
            raise FileNotFoundError(errno.ENOENT, "spool file removed", self._tmp_path)
        self._dirty = False

    def commit(self) -> None:
        """Close and rename to ``msg/<qid>``; durable after ``Spool.sync_directory``.

        fsyncs first if anything was written since ``sync`` (so a committed
        name never points at content that is not on disk). Raises OSError;
        on failure the file stays in ``tmp/`` (``discard`` removes it).
        """
        if self._committed:
            return
        if self._dirty or self._pending:
            self.sync()
        fd = self._require_open()
        self._fd = None
        _close(fd)
        os.rename(self._tmp_path, self._msg_path)
        self._committed = True

    def discard(self) -> None:
        """Close and remove the uncommitted file. Idempotent; never raises."""
        self._pending = []
        self._kept = None
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                _close(fd)
            except OSError:
                pass
        if not self._committed:
            try:
                os.unlink(self._tmp_path)
            except OSError:
                pass

    def __enter__(self) -> SpoolFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()


# --- the spool -----------------------------------------------------------------


class _JournalFiles:
    """Open append descriptors of the newest journal days, shared without a lock.

    No lock, because the caller's threads may be gevent-patched; instead every
    step is one atomic dict/attribute operation under the GIL:
    ``setdefault`` publishes a descriptor exactly once (a loser closes its
    own, never-published one) and ``pop`` hands each one to exactly one
    closer. A day is closed only once a day two days newer is opened, so a
    writer that fetched a descriptor just before a switch never writes to a
    closed, or reused, descriptor.
    """

    __slots__ = ("by_day", "current", "__weakref__")

    def __init__(self) -> None:
        self.by_day: dict[float, int] = {}  # day start -> fd
        self.current: tuple[float, float, int] | None = None  # (day start, day end, fd)

    def close(self) -> None:
        self.current = None
        for day in list(self.by_day):
            fd = self.by_day.pop(day, None)
            if fd is not None:
                try:
                    _close(fd)
                except OSError:
                    pass


class _DirFd:
    """An open descriptor of a directory, for fsync without an open/close
    per call; closed once (explicitly or when the Spool is collected)."""

    __slots__ = ("fd", "__weakref__")

    def __init__(self, path: str) -> None:
        self.fd: int | None = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            try:
                _close(fd)
            except OSError:
                pass


class Spool:
    """The spool directory. Methods are blocking; safe to share between threads
    and with other processes (``smtpdup queue`` while the relay runs)."""

    def __init__(self, directory: str | os.PathLike[str], *, create: bool = True) -> None:
        """Create the directories (parents too) and probe that the disk takes
        an fsynced file. Raises SpoolError (one line) on any failure.

        ``create=False`` (the admin commands): the spool must exist already
        (a directory with ``msg/`` in it); missing subdirectories of it are
        made, nothing else is created and nothing is probed."""
        self.directory = os.fspath(directory)
        self._tmp = os.path.join(self.directory, "tmp")
        self._msg = os.path.join(self.directory, "msg")
        self._dead = os.path.join(self.directory, "dead")
        self._journal_dir = os.path.join(self.directory, "journal")
        self._corrupt = os.path.join(self.directory, "corrupt")
        self._flush = os.path.join(self.directory, "flush")
        self._free_dir = os.path.join(self.directory, "free")
        self._requeue_dir = os.path.join(self.directory, "requeue")
        self._journal_files = _JournalFiles()
        weakref.finalize(self, self._journal_files.close)
        where = self.directory
        if not create:
            if not os.path.isdir(self.directory):
                raise SpoolError(f"spool: {self.directory} does not exist or is not a directory")
            if not os.path.isdir(self._msg):
                raise SpoolError(f"spool: {self.directory} is not a smtpdup spool (no msg/ in it)")
        try:
            if os.path.exists(where) and not os.path.isdir(where):
                raise SpoolError(f"spool: {where} exists and is not a directory")
            for path in (self.directory, self._tmp, self._msg, self._dead, self._journal_dir, self._free_dir):
                where = path
                os.makedirs(path, mode=DIR_MODE, exist_ok=True)
            # rename (commit) and link (dead letters) need one filesystem.
            devices = {os.stat(p).st_dev for p in (self._tmp, self._msg, self._dead)}
            if len(devices) != 1:
                raise SpoolError(f"spool: {self.directory}: tmp/, msg/ and dead/ must be on one filesystem")
        except OSError as exc:
            raise SpoolError(f"spool: cannot create {where}: {exc}") from None
        if create:
            probe = os.path.join(self._tmp, f".probe-{os.getpid()}-{secrets.token_hex(4)}")
            try:
                fd = os.open(probe, _NEW_FILE_FLAGS, FILE_MODE)
                try:
                    os.write(fd, b"probe\n")
                    os.fsync(fd)
                finally:
                    _close(fd)
                    _unlink(probe)
            except OSError as exc:
                raise SpoolError(f"spool: {self.directory} is not writable: {exc}") from None
        self._flush_seen = self._flush_stamp()  # requests before we started are not ours
        # Requeues before we started are found in msg/ by a scan (messages()).
        self._requeue_seen = self._requeue_markers()
        # Files of settled messages, kept for reuse (see _retire), with
        # their sizes when known (-1: left by an earlier run).
        self._free: deque[tuple[str, int]] = deque(
            (name, -1) for name in sorted(os.listdir(self._free_dir))[:FREE_FILES_MAX]
        )
        try:
            self._msg_dir = _DirFd(self._msg)
        except OSError as exc:
            raise SpoolError(f"spool: cannot open {self._msg}: {exc}") from None
        weakref.finalize(self, self._msg_dir.close)

    def close(self) -> None:
        """Close journal and directory descriptors (also done when the
        Spool is collected)."""
        self._journal_files.close()
        self._msg_dir.close()

    def __repr__(self) -> str:
        return f"Spool({self.directory!r})"

    # -- paths and ids --

    def _msg_path(self, queue_id: str) -> str:
        return os.path.join(self._msg, queue_id)

    def _state_path(self, queue_id: str) -> str:
        return os.path.join(self._msg, queue_id + ".state")

    def _dead_path(self, dead_id: str) -> str:
        return os.path.join(self._dead, dead_id)

    # -- writing --

    def prepare(self, count: int) -> list[Blank]:
        """Open ``count`` files in ``tmp/`` for messages to come, reusing
        files from ``free/`` where there are any. Blocking: meant for a
        worker thread, so that ``create`` costs a message no trip there.
        Leftovers are removed by ``recover`` like any ``tmp/`` file."""
        blanks = []
        for _ in range(count):
            path = os.path.join(self._tmp, BLANK_PREFIX + _tmp_name())
            reused = self._reuse(path)
            if reused is None:
                reused = os.open(path, _NEW_FILE_FLAGS, FILE_MODE), 0
            blanks.append(Blank(reused[0], path, reused[1]))
        return blanks

    def create(self, envelope: Envelope, targets: Sequence[Target], blank: Blank | None = None) -> SpoolFile:
        """Start ``tmp/<qid>`` with the header (written with the first content).

        Raises OSError on disk errors, ValueError on a malformed queue id.
        """
        queue_id = envelope.queue_id
        if not _QID_RE.fullmatch(queue_id):
            raise ValueError(f"not a queue id: {queue_id!r}")
        header = _encode_header(envelope, targets) + b"\n"
        if blank is not None:
            msg_path = self._msg_path(queue_id)
            return SpoolFile(envelope, targets, blank.fd, blank.path, msg_path, header, blank.old_size)
        tmp_path = os.path.join(self._tmp, queue_id)
        reused = self._reuse(tmp_path)
        if reused is None:
            reused = os.open(tmp_path, _NEW_FILE_FLAGS, FILE_MODE), 0
        return SpoolFile(envelope, targets, reused[0], tmp_path, self._msg_path(queue_id), header, reused[1])

    def _reuse(self, path: str) -> tuple[int, int] | None:
        """A recycled file moved to ``path`` and opened for overwriting, with
        the size of what it holds (-1: unknown), or None when there is none
        (another process may have taken it)."""
        while True:
            try:
                name, size = self._free.popleft()
            except IndexError:
                return None
            try:
                os.rename(os.path.join(self._free_dir, name), path)
                return os.open(path, os.O_WRONLY | _O_CLOEXEC), size
            except FileNotFoundError:
                continue

    def _retire(self, path: str, state: bool = False) -> None:
        """Done with a message file (or, with ``state``, a state file): keep
        it for reuse, or remove it.

        Creating and deleting thousands of files a second makes ext4 search
        ever longer for a free inode (it skips recently deleted ones), which
        costs more CPU than the rest of a delivery; a file that is renamed
        away and overwritten later keeps its inode. A file with another link
        (a dead letter shares its content) is never reused. A state file is
        small and never linked, and most messages never had one (every copy
        settled on its first attempt): no stat, the rename that finds none
        is the only syscall.

        Beyond FREE_FILES_MAX a file still goes to ``free/`` (at most
        FREE_FILES_SURPLUS more), for ``trim_free`` to remove later.
        """
        if len(self._free) < FREE_FILES_MAX + FREE_FILES_SURPLUS:
            try:
                size = -1  # a state file's: unknown, cut at reuse
                if not state:
                    st = os.stat(path)
                    if st.st_nlink != 1 or st.st_size > FREE_FILE_MAX_BYTES:
                        _unlink(path)
                        return
                    size = st.st_size
                name = os.path.basename(path)
                os.rename(path, os.path.join(self._free_dir, name))
            except FileNotFoundError:
                return
            self._free.append((name, size))
            return
        _unlink(path)

    def trim_free(self) -> int:
        """Blocking: unlink the files kept in ``free/`` beyond
        FREE_FILES_MAX (see ``_retire``), the last kept first. Returns how
        many were removed."""
        removed = 0
        while len(self._free) > FREE_FILES_MAX:
            try:
                name, _ = self._free.pop()
            except IndexError:
                break
            removed += _unlink(os.path.join(self._free_dir, name))
        return removed

    def sync_directory(self) -> None:
        """fsync ``msg/``: every commit before this call is durable (group commit)."""
        fd = self._msg_dir.fd
        if fd is None:
            raise ValueError(f"{self!r} is closed")
        os.fsync(fd)

    def group_commit(self, items: Sequence[tuple[SpoolFile, bool]]) -> list[BaseException | None]:
        """Blocking: the file-system work of many messages in one call (one
        threadpool trip). ``items`` are (file, commit): commit=False syncs
        the file (its content is on disk: the final dot may go out),
        commit=True commits it (rename into ``msg/``). One fsync of
        ``msg/`` after every rename makes them durable. Returns one entry
        per item: None, or the OSError it failed with (a failed directory
        fsync fails every commit of the call).

        Renames come first: on ext4 the fsyncs that follow commit the
        journal transaction holding them, and the directory fsync then has
        little left to wait for. Order does not matter for correctness:
        no caller is answered before the whole call returned.
        """
        errors: list[BaseException | None] = [None] * len(items)
        committed = False
        for i, (spool_file, commit) in enumerate(items):
            if commit:
                try:
                    spool_file.commit()
                    committed = True
                except OSError as exc:
                    errors[i] = exc
        for i, (spool_file, commit) in enumerate(items):
            if not commit:
                try:
                    spool_file.sync()
                except OSError as exc:
                    errors[i] = exc
        if committed:
            _crash_point("group_commit_before_directory_sync")
            try:
                self.sync_directory()
            except OSError as exc:
                for i, (_, commit) in enumerate(items):
                    if commit and errors[i] is None:
                        errors[i] = exc
        return errors

    # -- reading --

    def _quarantine(self, queue_id: str) -> None:
        """Move a corrupt message (and its state) to ``corrupt/``; never raises."""
        try:
            os.makedirs(self._corrupt, mode=DIR_MODE, exist_ok=True)
            for name in (queue_id, queue_id + ".state"):
                try:
                    os.rename(os.path.join(self._msg, name), os.path.join(self._corrupt, name))
                except FileNotFoundError:
                    pass
        except OSError:
            pass

    def _read_message(self, queue_id: str, has_state: bool = True) -> Message | None:
        """Message with state, None if gone; quarantines it if corrupt."""
        try:
            envelope, targets, offset, length, content = _read_head(self._msg_path(queue_id), queue_id)
        except FileNotFoundError:
            return None
        except _Corrupt:
            self._quarantine(queue_id)
            return None
        recorded: dict[int, Copy] = {}
        if has_state:
            try:
                recorded = _decode_state(_read_small(self._state_path(queue_id)), targets)
            except FileNotFoundError:
                pass
            except (_Corrupt, ValueError):
                # Written without fsync: a crash can leave it empty. Treat
                # every copy as fresh (a retry, never a loss) and keep the
                # evidence.
                try:
                    os.makedirs(self._corrupt, mode=DIR_MODE, exist_ok=True)
                    os.rename(
                        self._state_path(queue_id),
                        os.path.join(self._corrupt, f"{queue_id}.state.{secrets.token_hex(4)}"),
                    )
                except OSError:
                    pass
        copies = [
            recorded.get(i) or Copy(index=i, destination=t.destination, recipients=t.recipients)
            for i, t in enumerate(targets)
        ]
        return Message(envelope, copies, offset, length, None if content is None else (content,))

    def messages(self) -> Iterator[Message]:
        """Every committed message with its state, in queue-id order.

        Reads only headers and state files. Corrupt messages are moved to
        ``corrupt/`` and skipped; messages removed meanwhile are skipped.
        The directory listing is taken once, at the first ``next()``.
        """
        names: list[str] = []
        states: set[str] = set()
        with os.scandir(self._msg) as entries:
            for entry in entries:
                name = entry.name
                if name.endswith(".state"):
                    states.add(name[:-6])
                elif _QID_RE.fullmatch(name):
                    names.append(name)
        names.sort()
        for queue_id in names:
            message = self._read_message(queue_id, queue_id in states)
            if message is not None:
                yield message

    def load(self, queue_id: str) -> Message | None:
        """One message with its state; None if gone (done, deleted, corrupt) or
        if ``queue_id`` is not a queue id."""
        if not _QID_RE.fullmatch(queue_id):
            return None
        return self._read_message(queue_id)

    def open_content(self, message: Message) -> BinaryIO:
        """Unbuffered binary file seeked to the content; the caller reads
        ``message.content_length`` bytes and closes it. Raises
        FileNotFoundError if the message was deleted meanwhile."""
        f = open(self._msg_path(message.queue_id), "rb", buffering=0)
        try:
            f.seek(message.content_offset)
        except BaseException:
            f.close()
            raise
        return f  # type: ignore[return-value]

    # -- state --

    def save(self, message: Message) -> None:
        """Persist the copies' state atomically; if every copy is settled,
        remove ``msg/<qid>`` and its state instead. Raises OSError.

        A copy already settled on disk (``queue delete`` from another
        process) stays settled, and ``message`` is updated to match.
        """
        queue_id = message.queue_id
        state_path = self._state_path(queue_id)
        settled_elsewhere = False
        if not all(c.settled for c in message.copies):
            try:
                on_disk = _decode_state(_read_small(state_path), [
                    Target(c.destination, ()) for c in message.copies
                ])
            except (OSError, ValueError):
                on_disk = {}
            for c in message.copies:
                recorded = on_disk.get(c.index)
                if recorded is not None and recorded.settled and not c.settled:
                    message.update(c.index, settled=True)
                    settled_elsewhere = True
        if all(c.settled for c in message.copies):
            # Message first: if we crash in between, an orphan state file is
            # harmless and recover() removes it.
            if settled_elsewhere:
                # A copy deleted by `queue delete` may be in flight still,
                # reading this file: it must not be reused (overwritten).
                _unlink(self._msg_path(queue_id))
            else:
                self._retire(self._msg_path(queue_id))
            self._retire(state_path, state=True)
            return
        tmp_path = os.path.join(self._tmp, f"{queue_id}.state.{_tmp_name()}")
        fd = os.open(tmp_path, _NEW_FILE_FLAGS, FILE_MODE)
        try:
            try:
                _write_all(fd, [_encode_state(message.copies)])
            finally:
                _close(fd)
            os.rename(tmp_path, state_path)
        except BaseException:
            _unlink(tmp_path)
            raise
        if not os.path.exists(self._msg_path(queue_id)):
            # Deleted while we worked (queue delete): do not leave an orphan.
            _unlink(state_path)

    def record_outcomes(self, outcomes: Sequence[AttemptOutcome]) -> list[BaseException | None]:
        """Blocking: record delivery attempts (one threadpool trip for a
        batch), in the order that keeps the guarantee: per outcome, its
        journal lines (delivered, deferred, refused; those of consecutive
        outcomes in one write), then the dead letter of its dead recipients
        (content linked, ``dead/`` fsynced); then
        every message touched is saved once, after its last outcome in the
        batch (state is cumulative, so one save records them all, and a
        message file whose copies are all settled goes only after their
        dead letters are safe). Returns one entry per outcome: None, or the
        OSError it failed with; an error fails the outcomes of its message
        only."""
        errors: list[BaseException | None] = [None] * len(outcomes)
        last: dict[int, int] = {}  # id(message) -> index of its last outcome
        # Journal lines wait here (``waiting``: the outcomes they are of) and
        # go out in one write: before a dead letter, and before the saves.
        pending: list[tuple[float, bytes]] = []
        waiting: list[int] = []

        def write_pending() -> None:
            if pending:
                try:
                    self.journal_write(pending)
                except OSError as exc:
                    for j in waiting:
                        errors[j] = errors[j] or exc
                pending.clear()
                waiting.clear()

        for i, outcome in enumerate(outcomes):
            message, copy = outcome.message, outcome.copy
            last[id(message)] = i
            lines_before = len(pending)
            if outcome.delivered:
                self.journal_delivered(message, copy, outcome.delivered, pending)
            if outcome.deferred:
                self.journal_deferred(message, copy, outcome.deferred, outcome.reply, pending)
            for recipient, reply in outcome.refused:
                self.journal_refused(message, copy, recipient, reply, pending)
            if len(pending) > lines_before:
                waiting.append(i)
            if outcome.dead:
                write_pending()
                if errors[i] is not None:
                    continue  # its journal lines failed: no dead letter either
                try:
                    self.dead_letter(message, copy, outcome.dead, outcome.reason, outcome.now)
                except FileNotFoundError:
                    pass  # deleted with `queue delete` meanwhile
                except OSError as exc:
                    errors[i] = exc
        write_pending()
        for i in sorted(last.values()):
            message = outcomes[i].message
            try:
                self.save(message)
            except OSError as exc:
                for j, outcome in enumerate(outcomes):
                    if outcome.message is message and errors[j] is None:
                        errors[j] = exc
        return errors

    # -- dead letters --

    def dead_letter(
        self, message: Message, copy: Copy, recipients: Sequence[str], reason: str, now: float
    ) -> DeadLetter:
        """Keep ``recipients`` of ``copy`` as dead: content hard-linked into
        ``dead/<qid>.<index>``, then the record ``.json``, then ``dead/`` is
        fsynced, then a "dead" journal event. Returns the dead letter.

        Does NOT change ``copy`` or ``message``, nor save them:
        ``record_outcomes`` calls it before ``save``, so the content is safe
        before the message file can go.

        A second call for the same copy (another recipient refused later)
        merges into the same dead letter: recipients are added, distinct
        reasons joined with " | ". Raises FileNotFoundError if the message
        was deleted meanwhile, OSError on disk errors.
        """
        queue_id = message.queue_id
        dead_id = copy_id(queue_id, copy.index)
        link_path = self._dead_path(dead_id)
        record_path = link_path + ".json"
        merged_recipients = list(dict.fromkeys(recipients))
        merged_reason = reason
        try:
            os.link(self._msg_path(queue_id), link_path)
        except FileExistsError:
            previous = self._read_dead_record(record_path)
            if previous is not None:
                old_recipients = previous.get("recipients")
                if isinstance(old_recipients, list):
                    merged_recipients = list(
                        dict.fromkeys([r for r in old_recipients if isinstance(r, str)] + merged_recipients)
                    )
                old_reason = previous.get("reason")
                if isinstance(old_reason, str) and old_reason and old_reason != reason:
                    merged_reason = f"{old_reason} | {reason}"
        record = {
            "v": HEADER_VERSION,
            "id": dead_id,
            "destination": copy.destination,
            "recipients": merged_recipients,
            "attempts": copy.attempts,
            "reason": merged_reason,
            "dead_at": now,
        }
        tmp_path = os.path.join(self._tmp, f"{dead_id}.json.{secrets.token_hex(4)}")
        fd = os.open(tmp_path, _NEW_FILE_FLAGS, FILE_MODE)
        try:
            try:
                _write_all(fd, [_dumps(record)])
            finally:
                _close(fd)
            os.rename(tmp_path, record_path)
        except BaseException:
            _unlink(tmp_path)
            raise
        # The link must be durable before the caller may settle the copy and
        # let save() remove msg/<qid>. Dead letters are rare: one fsync each.
        _fsync_dir(self._dead)
        self.journal(
            {
                "t": now,
                "event": "dead",
                "id": dead_id,
                "destination": copy.destination,
                "recipients": list(recipients),
                "reply": reason,
            }
        )
        return DeadLetter(
            id=dead_id,
            envelope=message.envelope,
            destination=copy.destination,
            recipients=tuple(merged_recipients),
            attempts=copy.attempts,
            reason=merged_reason,
            dead_at=now,
        )

    @staticmethod
    def _read_dead_record(path: str) -> dict | None:
        try:
            obj = _loads(_read_small(path))
        except (OSError, ValueError):
            return None
        return obj if isinstance(obj, dict) else None

    def _read_dead_letter(self, dead_id: str, queue_id: str, index: int) -> DeadLetter | None:
        link_path = self._dead_path(dead_id)
        try:
            envelope, targets, _, _ = _read_header(link_path, queue_id)
        except FileNotFoundError:
            return None
        except _Corrupt:
            try:
                os.makedirs(self._corrupt, mode=DIR_MODE, exist_ok=True)
                for suffix in ("", ".json"):
                    try:
                        os.rename(link_path + suffix, os.path.join(self._corrupt, dead_id + suffix))
                    except FileNotFoundError:
                        pass
            except OSError:
                pass
            return None
        target = targets[index] if index < len(targets) else Target("", ())
        record = self._read_dead_record(link_path + ".json")
        try:
            if record is None:
                raise _Corrupt("no record")
            return DeadLetter(
                id=dead_id,
                envelope=envelope,
                destination=_str(record, "destination"),
                recipients=_strs(record, "recipients"),
                attempts=_int(record, "attempts"),
                reason=_str(record, "reason"),
                dead_at=_num(record, "dead_at"),
            )
        except _Corrupt:
            # A crash between link and record: the content is safe; say so.
            try:
                dead_at = os.stat(link_path).st_ctime
            except OSError:
                dead_at = 0.0
            return DeadLetter(
                id=dead_id,
                envelope=envelope,
                destination=target.destination,
                recipients=target.recipients,
                attempts=0,
                reason="unknown (dead-letter record missing or unreadable)",
                dead_at=dead_at,
            )

    def _dead_ids(self, queue_id: str | None = None) -> list[tuple[str, str, int]]:
        found = []
        with os.scandir(self._dead) as entries:
            for entry in entries:
                match = _COPY_ID_RE.fullmatch(entry.name)
                if match and (queue_id is None or match.group(1) == queue_id):
                    found.append((entry.name, match.group(1), int(match.group(2))))
        found.sort(key=lambda item: (item[1], item[2]))
        return found

    def dead_count(self) -> int:
        """How many dead letters there are (one directory listing)."""
        try:
            with os.scandir(self._dead) as entries:
                return sum(1 for entry in entries if entry.name.endswith(".json"))
        except FileNotFoundError:
            return 0

    def dead_letters(self) -> Iterator[DeadLetter]:
        """Every dead letter, in id order (a directory scan: not for hot paths)."""
        for dead_id, queue_id, index in self._dead_ids():
            letter = self._read_dead_letter(dead_id, queue_id, index)
            if letter is not None:
                yield letter

    # -- operator actions --

    def delete(self, id: str) -> int:
        """Delete ``<qid>`` (the message: its pending copies and dead letters)
        or ``<qid>.<index>`` (that pending copy, marked settled via ``save``,
        and/or that dead letter). Returns how many entries (pending copies,
        dead letters) were removed; 0 if none or ``id`` is malformed."""
        removed = 0
        match = _COPY_ID_RE.fullmatch(id)
        if match:
            queue_id, index = match.group(1), int(match.group(2))
            message = self.load(queue_id)
            if message is not None and index < len(message.copies):
                copy = message.copies[index]
                if not copy.settled:
                    message.update(index, settled=True)
                    self.save(message)
                    self._journal_deleted(queue_id, copy)
                    removed += 1
            removed += self._delete_dead(id)
            return removed
        if not _QID_RE.fullmatch(id):
            return 0
        message = self.load(id)
        if message is not None:
            pending = message.pending()
            _unlink(self._msg_path(id))
            _unlink(self._state_path(id))
            for copy in pending:
                self._journal_deleted(id, copy)
            removed += len(pending)
        for dead_id, _, _ in self._dead_ids(id):
            removed += self._delete_dead(dead_id)
        return removed

    def _delete_dead(self, dead_id: str) -> int:
        link_path = self._dead_path(dead_id)
        # Link first: a leftover record without its link is ignored (recover removes it).
        existed = _unlink(link_path)
        existed = _unlink(link_path + ".json") or existed
        return int(existed)

    def _journal_deleted(self, queue_id: str, copy: Copy) -> None:
        self.journal(
            {
                "event": "deleted",
                "id": copy_id(queue_id, copy.index),
                "destination": copy.destination,
                "recipients": list(copy.recipients),
            }
        )

    def request_flush(self, destination: str | None = None) -> None:
        """Ask the running relay (every worker process of it) to make every
        pending copy due now, or those for ``destination``: the flush file
        is replaced by a new one. A request for one destination merges a
        request made less than FLUSH_MERGE_SECONDS before, which a relay
        may not have seen yet."""
        destinations: set[str] | None = None
        if destination is not None:
            destinations = {destination}
            try:
                recent = time.time() - os.stat(self._flush).st_mtime < FLUSH_MERGE_SECONDS
            except FileNotFoundError:
                recent = False
            if recent:
                previous = self._read_flush()
                destinations = None if previous is None else destinations | previous
        record = {"t": time.time_ns(), "destinations": None if destinations is None else sorted(destinations)}
        tmp_path = os.path.join(self._tmp, f"flush.{secrets.token_hex(4)}")
        fd = os.open(tmp_path, _NEW_FILE_FLAGS, FILE_MODE)
        try:
            _write_all(fd, [_dumps(record) + b"\n"])
        finally:
            _close(fd)
        os.rename(tmp_path, self._flush)

    def _read_flush(self) -> frozenset[str] | None:
        """Destinations of the current flush file; None (every destination)
        when it names none, is in the old format or cannot be read: a flush
        of more than was asked, never less."""
        try:
            obj = _loads(_read_small(self._flush, 1 << 20))
        except (OSError, ValueError):
            return None
        names = obj.get("destinations") if isinstance(obj, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return None
        return frozenset(names)

    def _flush_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self._flush)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def take_flush_request(self) -> bool:
        """True once per flush requested since this Spool was made (or
        since the last True). The file stays, so that every process that
        watches it sees each request. One stat."""
        stamp = self._flush_stamp()
        if stamp is None or stamp == self._flush_seen:
            return False
        self._flush_seen = stamp
        return True

    def take_flush(self) -> FlushRequest | None:
        """Like ``take_flush_request``, with what to flush: None when no
        flush was requested since the last call, else a FlushRequest whose
        ``destinations`` is None for every destination. One stat, and one
        small read when there is a request."""
        if not self.take_flush_request():
            return None
        return FlushRequest(self._read_flush())

    # -- requeue --

    def _requeue_markers(self) -> set[str]:
        try:
            return set(os.listdir(self._requeue_dir))
        except FileNotFoundError:
            return set()

    def requeue(self, dead_id: str, now: float | None = None) -> str | None:
        """Make the dead letter ``dead_id`` pending again, due now: a new
        message ``msg/<new qid>`` carrying that one copy (its destination and
        its dead recipients, attempts 0) and the dead letter's content; then
        a marker in ``requeue/`` for a running relay (``take_requeued``), a
        "requeued" journal event, and the dead letter is removed. Returns the
        new copy id, or None when there is no such dead letter.

        The new message is committed (fsynced, ``msg/`` fsynced) before the
        dead letter goes: a crash in between leaves both, never neither.
        Raises OSError on disk errors."""
        match = _COPY_ID_RE.fullmatch(dead_id)
        if not match:
            return None
        letter = self._read_dead_letter(dead_id, match.group(1), int(match.group(2)))
        if letter is None:
            return None
        now = time.time() if now is None else now
        link_path = self._dead_path(dead_id)
        try:
            _, _, offset, length = _read_header(link_path, letter.envelope.queue_id)
        except (FileNotFoundError, _Corrupt):
            return None  # deleted, or quarantined, meanwhile
        old = letter.envelope
        extras = _read_header_extras(link_path)
        first_received_at = extras.get("first_received_at", old.received_at)
        envelope = Envelope(
            queue_id=new_queue_id(), sender=old.sender, recipients=old.recipients,
            client=old.client, smtputf8=old.smtputf8, body=old.body, received_at=now,
        )
        header = _loads(_encode_header(envelope, [Target(letter.destination, letter.recipients)]))
        assert isinstance(header, dict)
        header["requeued_from"] = dead_id
        header["first_received_at"] = first_received_at
        queue_id = envelope.queue_id
        tmp_path = os.path.join(self._tmp, queue_id)
        src = os.open(link_path, os.O_RDONLY | _O_CLOEXEC)
        try:
            dst = os.open(tmp_path, _NEW_FILE_FLAGS, FILE_MODE)
            try:
                try:
                    _write_all(dst, [_dumps(header) + b"\n"])
                    _copy_range(src, dst, offset, length)
                    os.fsync(dst)
                finally:
                    _close(dst)
                os.rename(tmp_path, self._msg_path(queue_id))
            except BaseException:
                _unlink(tmp_path)
                raise
        finally:
            _close(src)
        self.sync_directory()
        os.makedirs(self._requeue_dir, mode=DIR_MODE, exist_ok=True)
        _close(os.open(os.path.join(self._requeue_dir, queue_id), _NEW_FILE_FLAGS, FILE_MODE))
        new_id = copy_id(queue_id, 0)
        self.journal(
            {
                "t": now,
                "event": "requeued",
                "id": dead_id,
                "destination": letter.destination,
                "recipients": list(letter.recipients),
                "new_id": new_id,
            }
        )
        self._delete_dead(dead_id)
        for name in self._requeue_markers():
            try:
                if queue_id_time(name) < now - REQUEUE_MARKER_KEEP_SECONDS:
                    _unlink(os.path.join(self._requeue_dir, name))
            except ValueError:
                pass
        return new_id

    def take_requeued(self) -> list[Message]:
        """Messages that ``queue requeue`` made since this Spool was made
        (or since the last call), with their state, in queue-id order: for a
        running relay to index, as ``Scheduler.load`` does at start. One
        listing of ``requeue/`` (a few entries at most), then one header
        read per new message. Blocking: call it in the threadpool."""
        markers = self._requeue_markers()
        new = sorted(name for name in markers - self._requeue_seen if _QID_RE.fullmatch(name))
        self._requeue_seen = markers
        found = []
        for queue_id in new:
            message = self.load(queue_id)
            if message is not None and message.pending():
                found.append(message)
        return found

    # -- the admin view --

    def entries(self, id: str | None = None) -> list[Entry]:
        """Pending copies and dead letters, sorted by id (pending before dead
        for one id); only those of ``id`` (a queue id or a copy id) when
        given: [] when there are none. A directory scan: not for hot paths."""
        queue_id, index = id, None
        if id is not None:
            match = _COPY_ID_RE.fullmatch(id)
            if match:
                queue_id, index = match.group(1), int(match.group(2))
            elif not _QID_RE.fullmatch(id):
                return []
        found = []
        messages = self.messages() if queue_id is None else filter(None, [self.load(queue_id)])
        for message in messages:
            path = self._msg_path(message.queue_id)
            extras = _read_header_extras(path) if queue_id is not None else {}
            for copy in message.pending():
                if index is None or copy.index == index:
                    found.append(Entry(
                        copy_id(message.queue_id, copy.index), "pending", message.envelope,
                        copy.destination, tuple(copy.recipients), copy.attempts, copy.next_attempt,
                        copy.last_reply, extras, path, message.content_offset, message.content_length,
                    ))
        for dead_id, qid, i in self._dead_ids(queue_id):
            if index is not None and i != index:
                continue
            letter = self._read_dead_letter(dead_id, qid, i)
            if letter is None:
                continue
            path = self._dead_path(dead_id)
            try:
                _, _, offset, length = _read_header(path, qid)
            except (OSError, _Corrupt):
                continue
            extras = _read_header_extras(path) if queue_id is not None else {}
            found.append(Entry(
                dead_id, "dead", letter.envelope, letter.destination, letter.recipients,
                letter.attempts, None, letter.reason, extras, path, offset, length,
            ))
        found.sort(key=lambda e: (e.envelope.queue_id, int(e.id.rpartition(".")[2]), e.state != "pending"))
        return found

    def open_entry(self, entry: Entry) -> BinaryIO:
        """Unbuffered binary file seeked to the entry's content; the caller
        reads ``entry.content_length`` bytes and closes it. Raises
        FileNotFoundError if it went meanwhile."""
        f = open(entry.path, "rb", buffering=0)
        try:
            f.seek(entry.content_offset)
        except BaseException:
            f.close()
            raise
        return f  # type: ignore[return-value]

    def delete_dead(self, dead_id: str) -> int:
        """Remove the dead letter ``dead_id`` (content link and record);
        1 if it existed, else 0."""
        if not _COPY_ID_RE.fullmatch(dead_id):
            return 0
        return self._delete_dead(dead_id)

    def history(self, ids: Sequence[str], since: float) -> list[dict]:
        """Journal events since ``since`` of the copies ``ids`` ("<qid>.<index>"),
        oldest first. Reads the journal days from ``since`` on."""
        wanted = set(ids)
        events = [e for e in self.journal_since(since) if e.get("id") in wanted]
        events.sort(key=lambda e: e["t"])
        return events

    # -- recovery --

    def recover(self) -> int:
        """At start, before delivering: remove ``tmp/`` leftovers (partial
        writes from a crash: those clients never got a 2xx), messages whose
        state says every copy is settled, state files without a message and
        dead-letter records without their link. Returns files removed.

        Reads state files only, not message headers: ``save`` always records
        every copy, so "all settled" is visible there.
        """
        removed = 0
        with os.scandir(self._tmp) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False) and _unlink(entry.path):
                    removed += 1
        # Several worker processes may have kept more free files than one
        # process reuses: the rest would never be reused nor removed.
        for name in sorted(os.listdir(self._free_dir))[FREE_FILES_MAX:]:
            removed += _unlink(os.path.join(self._free_dir, name))
        self._free = deque((name, -1) for name in sorted(os.listdir(self._free_dir)))
        messages: set[str] = set()
        states: list[str] = []
        with os.scandir(self._msg) as entries:
            for entry in entries:
                if entry.name.endswith(".state"):
                    states.append(entry.name[:-6])
                else:
                    messages.add(entry.name)
        for queue_id in states:
            state_path = self._state_path(queue_id)
            if queue_id not in messages:
                removed += _unlink(state_path)
                continue
            try:
                data = _read_small(state_path)
            except (OSError, ValueError):
                continue
            if _state_all_settled(data):
                removed += _unlink(self._msg_path(queue_id))
                removed += _unlink(state_path)
        with os.scandir(self._dead) as entries:
            names = {entry.name for entry in entries}
        for name in names:
            if name.endswith(".json") and name[:-5] not in names:
                removed += _unlink(self._dead_path(name))
        return removed

    # -- journal --

    def _journal_fd(self, t: float) -> tuple[int, bool]:
        """Descriptor for the UTC day of ``t``; True if the caller must close it."""
        files = self._journal_files
        current = files.current
        if current is not None and current[0] <= t < current[1]:
            return current[2], False  # the per-event path: no syscall
        name, start = _day_of(t)
        path = os.path.join(self._journal_dir, name + ".jsonl")
        if (current is not None and start < current[0]) or t > time.time() + 3600:
            # Stamped for an earlier day (never republish a closed day) or
            # far in the future (must not close today's descriptor): private.
            return os.open(path, _APPEND_FLAGS, FILE_MODE), True
        fd = files.by_day.get(start)
        if fd is None:
            new = os.open(path, _APPEND_FLAGS, FILE_MODE)
            fd = files.by_day.setdefault(start, new)
            if fd != new:
                _close(new)  # another thread published first
        files.current = (start, start + _SECONDS_PER_DAY, fd)
        for day in list(files.by_day):
            if day < start - _SECONDS_PER_DAY:
                old = files.by_day.pop(day, None)
                if old is not None:
                    _close(old)
        return fd, False

    def journal(self, event: Mapping[str, object], pending: list[tuple[float, bytes]] | None = None) -> None:
        """Append one JSON line (one O_APPEND write) to the journal of the UTC
        day of ``event["t"]`` (set to now if absent). Raises OSError.

        With ``pending``, the line is added there instead, for one
        ``journal_write`` of many lines."""
        record = dict(event)
        t = record.get("t")
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            t = time.time()
            record = {"t": t, **record}
        line = (float(t), _dumps(record) + b"\n")
        if pending is not None:
            pending.append(line)
        else:
            self.journal_write([line])

    def journal_write(self, lines: Sequence[tuple[float, bytes]]) -> None:
        """Append (t, line) pairs in order, the lines of one day joined in
        one O_APPEND write (whole, beside other processes' appends; no
        iovec limit). Raises OSError."""
        i = 0
        while i < len(lines):
            fd, close = self._journal_fd(lines[i][0])
            j = i + 1
            if not close:
                start, end, _ = self._journal_files.current  # set by _journal_fd
                while j < len(lines) and start <= lines[j][0] < end:
                    j += 1
            try:
                _write_all(fd, [b"".join([line for _, line in lines[i:j]])])
            finally:
                if close:
                    _close(fd)
            i = j

    def journal_delivered(
        self, message: Message, copy: Copy, recipients: Sequence[str], pending: list | None = None
    ) -> None:
        """Journal a successful delivery transaction of ``recipients`` of ``copy``."""
        self.journal(
            {
                "event": "delivered",
                "id": copy_id(message.queue_id, copy.index),
                "destination": copy.destination,
                "recipients": list(recipients),
            },
            pending,
        )

    def journal_refused(
        self, message: Message, copy: Copy, recipient: str, reply: str, pending: list | None = None
    ) -> None:
        """Journal that the backup permanently refused a recipient the primary accepted."""
        self.journal(
            {
                "event": "refused",
                "id": copy_id(message.queue_id, copy.index),
                "destination": copy.destination,
                "recipient": recipient,
                "reply": reply,
            },
            pending,
        )

    def journal_deferred(
        self, message: Message, copy: Copy, recipients: Sequence[str], reply: str, pending: list | None = None
    ) -> None:
        """Journal an attempt that left ``recipients`` of ``copy`` to retry
        (4xx, timeout, connection error), with its reply: ``queue show``
        lists every attempt."""
        self.journal(
            {
                "event": "deferred",
                "id": copy_id(message.queue_id, copy.index),
                "destination": copy.destination,
                "recipients": list(recipients),
                "reply": reply,
            },
            pending,
        )

    def _journal_days(self) -> list[tuple[str, str]]:
        try:
            with os.scandir(self._journal_dir) as entries:
                days = [
                    (m.group(1), entry.path)
                    for entry in entries
                    if (m := _JOURNAL_RE.fullmatch(entry.name))
                ]
        except FileNotFoundError:
            return []
        days.sort()
        return days

    def journal_since(self, since: float) -> Iterator[dict]:
        """Events with ``t >= since``, oldest day first, reading only the day
        files from the day of ``since`` on. Torn or malformed lines (a crash
        mid-write) are skipped."""
        first_day, _ = _day_of(max(since, 0.0))
        for day, path in self._journal_days():
            if day < first_day:
                continue
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                continue  # pruned meanwhile
            with f:
                for line in f:
                    try:
                        event = _loads(line)
                    except ValueError:
                        continue
                    if not isinstance(event, dict):
                        continue
                    t = event.get("t")
                    if isinstance(t, (int, float)) and not isinstance(t, bool) and t >= since:
                        yield event

    def prune_journal(self, now: float, keep_days: int = 35) -> int:
        """Remove journal days that ended more than ``keep_days`` days before
        ``now``. Returns how many files were removed."""
        removed = 0
        cutoff = now - keep_days * _SECONDS_PER_DAY
        for day, path in self._journal_days():
            try:
                end = _day_start(day) + _SECONDS_PER_DAY
            except ValueError:
                continue
            if end <= cutoff:
                removed += _unlink(path)
        return removed
