"""The relay backend: the primary in lockstep, the backup copy on disk.

For every client session a :class:`RelaySession` forwards MAIL, each RCPT
and DATA to the primary as the client sends them and answers with the
primary's own reply. While the content streams to the primary it is also
written to a spool file, and the order of the last steps is the product's
promise:

1. the spool file is fsynced (in gevent's threadpool: fsync blocks);
2. only then does the final dot go to the primary;
3. a 2xx from the primary commits the file (one rename) and waits for the
   directory fsync that makes the rename durable (shared by concurrent
   sessions: group commit);
4. only then does the client hear the primary's 2xx.

So a 2xx never outruns the spool. Any failure before step 2 drops the
primary connection without a final dot: nothing is delivered anywhere.
A session never touches the backup pool; it hands the committed message to
the delivery scheduler and returns.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import gevent

from . import logs, metrics
from .blocking import Batch, blocking
from .config import Config, Current
from .destination import Destination
from .reply import LOCAL_ERROR, PRIMARY_UNAVAILABLE, Reply
from .spool import Blank, Envelope, Message, Spool, SpoolFile, Target, new_queue_id
from .upstream import Upstream, UpstreamError

log = logs.get("relay")

# Spool files prepared ahead: a batch of this many when fewer than
# BLANKS_LOW are left.
BLANKS_BATCH = 64
BLANKS_LOW = 24

# Idle sessions to the primary kept for the next client session, as
# Postfix's connection cache does: at most POOL_MAX_IDLE, each at most
# POOL_IDLE_SECONDS (well below a server's idle timeout, 300 s in Postfix
# and 10 s under stress; a session the primary closed anyway is reopened).
POOL_MAX_IDLE = 32
POOL_IDLE_SECONDS = 5.0

# Content for the primary is held back and leaves in one write (sendmsg,
# no join) with the Received header before it and the final dot after it,
# unless it grows beyond this many bytes or pieces first.
HOLD_BYTES = 65536
HOLD_PIECES = 64

def _outcome(reply: Reply) -> str:
    """The transaction outcome (log line and metric) for the reply the client got."""
    if reply.is_completed:
        return "accepted"
    return "deferred" if reply.is_transient else "rejected"


# The counter of each outcome, bound once (labels() is a lookup under a lock).
_TRANSACTION_COUNTERS = {outcome: metrics.TRANSACTIONS.labels(outcome) for outcome in metrics.TRANSACTION_OUTCOMES}

# A HELO name goes into the Received header; keep it printable and short.
MAX_HELO_IN_HEADER = 255

# Crash tests kill the process at a named point of a transaction (see
# tests/test_durability.py); unset in production, where this is one dict
# lookup per message.
CRASH_POINT = os.environ.get("SMTPDUP_TEST_CRASH_AT", "")


def _crash_point(name: str) -> None:
    if CRASH_POINT == name:
        os.kill(os.getpid(), signal.SIGKILL)


def sampled(queue_id: str, destination: Destination) -> bool:
    """Whether this message is in ``destination``'s sample: decided by a
    hash of the queue id, so every attempt for a message agrees."""
    if destination.sample_percent >= 100:
        return True
    if destination.sample_percent <= 0:
        return False
    digest = hashlib.blake2b(f"{queue_id}/{destination.name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 10000 < destination.sample_percent * 100


def targets_for(queue_id: str, recipients: list[str], backups: tuple[Destination, ...]) -> list[Target]:
    """The backup copies for a message: one per backup that samples it and
    wants at least one of its recipients."""
    targets = []
    for backup in backups:
        if not sampled(queue_id, backup):
            continue
        wanted = tuple(r for r in recipients if backup.wants(r))
        if wanted:
            targets.append(Target(backup.name, wanted))
    return targets


_date_cache: tuple[int, str] = (0, "")


def _received_date() -> str:
    """RFC 5322 date of now in UTC, formatted once per second."""
    global _date_cache
    now = int(time.time())
    second, text = _date_cache
    if second != now:
        text = email.utils.formatdate(now, localtime=False, usegmt=False).replace("-0000", "+0000")
        _date_cache = (now, text)
    return text


def _printable(text: str, limit: int) -> str:
    cleaned = "".join(c if 32 < ord(c) < 127 else "?" for c in text[:limit])
    return cleaned or "unknown"


@dataclass(slots=True)
class _Transaction:
    queue_id: str
    sender: str
    params: dict[str, str | None]
    received: bytes
    started: float
    recipients: list[str]
    spool_file: SpoolFile | None = None
    size: int = 0
    tail: bytes = b"\r\n"  # last two bytes sent: does the content end a line?
    held: list[bytes] = field(default_factory=list)  # content not yet sent to the primary
    held_bytes: int = 0
    failure: Reply | None = None  # set when the primary or the spool broke mid-DATA


class BlankSupply:
    """Spool files opened ahead of time, in batches, in the threadpool: a
    new message takes one without a trip there. Holds at most
    BLANKS_BATCH + BLANKS_LOW open files."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self._stock: deque[Blank] = deque()
        self._refilling = False

    def take(self) -> Blank | None:
        """A prepared file, or None (the caller creates one itself)."""
        if len(self._stock) < BLANKS_LOW and not self._refilling:
            self._refilling = True
            gevent.spawn(self._refill)
        return self._stock.popleft() if self._stock else None

    def _refill(self) -> None:
        try:
            self._stock.extend(blocking(self._spool.prepare, BLANKS_BATCH))
        except OSError as exc:
            log.error("spool_prepare_failed", extra={"error": str(exc)})
        finally:
            self._refilling = False


def _primary_key(config: Config) -> tuple:
    """Upstream.key() of a session to ``config``'s primary."""
    primary = config.relay.destination_primary
    return Upstream.key_for(primary, config.relay, config.smtp.domain)  # type: ignore[arg-type]


class PrimaryPool:
    """Idle sessions to the primary, shared by the client sessions one at a
    time: a client session ``take``s one at its first MAIL and ``give``s it
    back when it ends, so a client that sends one message per connection
    does not cost a connect, greeting, EHLO (STARTTLS, AUTH) and QUIT
    upstream each time.

    A session is pooled only when no reply or content is owed (a
    transaction left open gets an RSET first; one in DATA is dropped
    without its final dot). No client-specific state travels with a
    session: it carries smtpdup's own EHLO name and the destination's own
    credentials only. The newest idle session is used first, so a pool
    larger than the load needs ages out (a sweeper QUITs sessions idle
    longer than POOL_IDLE_SECONDS).
    """

    def __init__(self, current: Current) -> None:
        self._current = current
        self.key = _primary_key(current.config)  # Upstream.key() of a session it pools
        self._idle: list[tuple[float, Upstream]] = []  # oldest first
        self._sweeper: gevent.Greenlet | None = None
        self.closed = False

    def __len__(self) -> int:
        return len(self._idle)

    def take(self) -> Upstream:
        """A pooled session to the configured primary (connected when it
        was idle), else a new one, not connected yet."""
        idle = self._idle
        if idle:
            since, upstream = idle.pop()
            if time.monotonic() - since < POOL_IDLE_SECONDS:
                return upstream
            # The newest has expired, so have all.
            idle.append((since, upstream))
            self._quit_all(idle)
            idle.clear()
        config = self._current.config
        assert config.relay.destination_primary is not None
        return Upstream.for_destination(config.relay.destination_primary, config.relay, config.smtp.domain)

    def give(self, upstream: Upstream) -> None:
        """Take ``upstream`` back from a client session that is done with
        it: pooled if reusable, else closed."""
        if not upstream.reusable:
            upstream.abort()
            return
        if self.closed or upstream.key() != self.key or len(self._idle) >= POOL_MAX_IDLE:
            upstream.quit()
            return
        if upstream.in_transaction:
            try:
                reply = upstream.rset()
            except UpstreamError:
                return  # closed by now
            if not reply.is_completed or not upstream.reusable:
                upstream.abort()
                return
            if self.closed or len(self._idle) >= POOL_MAX_IDLE:
                upstream.quit()
                return
        self._idle.append((time.monotonic(), upstream))
        if self._sweeper is None:
            self._sweeper = gevent.spawn(self._sweep)

    def reconfigure(self) -> None:
        """A reload has replaced the configuration: sessions to a primary no
        longer configured (or with other settings) are QUIT; those in use
        are closed when given back."""
        key = _primary_key(self._current.config)
        if key != self.key:
            self.key = key
            self._quit_all(self._idle)
            self._idle = []

    def close(self, timeout: float = 2.0) -> None:
        """Shutdown: QUIT every idle session (waiting at most ``timeout``);
        sessions given back later are QUIT too."""
        self.closed = True
        idle, self._idle = self._idle, []
        if self._sweeper is not None:
            self._sweeper.kill(block=False)
            self._sweeper = None
        gevent.joinall(self._quit_all(idle), timeout=timeout)

    def _retire_expired(self) -> None:
        idle = self._idle
        limit = time.monotonic() - POOL_IDLE_SECONDS
        expired = 0
        while expired < len(idle) and idle[expired][0] <= limit:
            expired += 1
        if expired:
            self._quit_all(idle[:expired])
            del idle[:expired]

    @staticmethod
    def _quit_all(sessions: list[tuple[float, Upstream]]) -> list[gevent.Greenlet]:
        # In the background: the caller may be a client session waiting.
        return [gevent.spawn(upstream.quit) for _, upstream in sessions]

    def _sweep(self) -> None:
        try:
            while self._idle:
                gevent.sleep(POOL_IDLE_SECONDS / 2)
                self._retire_expired()
        finally:
            self._sweeper = None


class Relay:
    """What every relay session shares: the configuration in force
    (``current.config``, replaced whole on reload), the spool, the group
    commit, the primary pool and the delivery hand-off."""

    def __init__(
        self, current: Current, spool: Spool, submit: Callable[[Message], None],
        flow_delay: Callable[[], None] = lambda: None,
    ) -> None:
        self.current = current
        self.spool = spool
        self.submit = submit
        self.flow_delay = flow_delay  # inflow control: may wait before a transaction
        # Group commit: one threadpool trip carries the fsyncs of every
        # session about to send its final dot and the renames + one
        # directory fsync of every session whose primary said 2xx; a second
        # trip may overlap it (the disk takes two flushes at once).
        work: Batch[tuple[SpoolFile, bool]] = Batch(spool.group_commit, concurrency=2)
        self.sync: Callable[[SpoolFile], None] = lambda spool_file: work((spool_file, False))
        self.commit_durable: Callable[[SpoolFile], None] = lambda spool_file: work((spool_file, True))
        self.blanks = BlankSupply(spool)
        self.pool = PrimaryPool(current)

    @property
    def config(self) -> Config:
        """The configuration in force."""
        return self.current.config

    def session(self, client_ip: str) -> RelaySession:
        return RelaySession(self, client_ip)


class RelaySession:
    """The backend of one client session (see ``session.Backend``)."""

    __slots__ = ("relay", "client_ip", "helo", "esmtp", "tls", "_primary", "_txn")

    def __init__(self, relay: Relay, client_ip: str) -> None:
        self.relay = relay
        self.client_ip = client_ip
        self.helo = ""
        self.esmtp = False
        self.tls = False
        self._primary: Upstream | None = None
        self._txn: _Transaction | None = None

    # -- session events -------------------------------------------------

    def hello(self, name: str, extended: bool) -> None:
        self.helo, self.esmtp = name, extended

    def tls_started(self) -> None:
        self.tls = True

    def reset(self) -> None:
        """RSET or an implicit reset: forget the envelope; the primary is
        reset too if it had one, so the connection stays reusable."""
        txn, self._txn = self._txn, None
        if txn is None:
            return
        self._discard(txn)
        if self._primary is not None and self._primary.connected:
            try:
                self._primary.rset()
            except UpstreamError:
                pass  # dropped; the next MAIL reconnects

    def close(self) -> None:
        txn, self._txn = self._txn, None
        primary, self._primary = self._primary, None
        if txn is not None:
            self._discard(txn)
            self._finish(txn, None, "aborted")
        if primary is not None:
            # Back to the pool; mid-DATA it is dropped (no final dot, ever),
            # mid-envelope it is RSET first.
            self.relay.pool.give(primary)

    # -- the transaction, in lockstep with the primary -------------------

    def mail(self, sender: str, params: dict[str, str | None]) -> Reply:
        self.reset()
        self.relay.flow_delay()
        config = self.relay.config
        queue_id = new_queue_id()
        received = self._received_header(queue_id) if config.smtp.received_header else b""
        forward = dict(params)
        if "SIZE" in forward and forward["SIZE"] is not None and forward["SIZE"].isdigit():
            forward["SIZE"] = str(int(forward["SIZE"]) + len(received))
        reply = self._primary_mail(sender, forward)
        if reply.is_completed:
            self._txn = _Transaction(queue_id, sender, forward, received, time.monotonic(), [])
        return reply

    def _primary_mail(self, sender: str, params: dict[str, str | None]) -> Reply:
        primary = self._primary_session()
        reused = primary.connected
        try:
            if not reused:
                primary.connect()
            reply = primary.mail(sender, params)
            if reused and reply.code == 421:
                raise UpstreamError(reply)
            return reply
        except UpstreamError as exc:
            if not reused:
                return self._primary_failed(exc)
        # A reused connection may have been closed by the primary while
        # idle: one fresh attempt before telling the client.
        primary.abort()
        try:
            primary.connect()
            return primary.mail(sender, params)
        except UpstreamError as exc:
            return self._primary_failed(exc)

    def _primary_session(self) -> Upstream:
        """This client session's primary session: its own while that is
        connected to the configured primary, else one from the pool."""
        relay = self.relay
        primary = self._primary
        if primary is not None:
            if primary.reusable and not primary.in_transaction and primary.key() == relay.pool.key:
                return primary
            relay.pool.give(primary)  # RSET, dropped or QUIT, as it must
        primary = self._primary = relay.pool.take()
        return primary

    def _primary_failed(self, exc: UpstreamError) -> Reply:
        log.warning("primary_unavailable", extra={"client": self.client_ip, "reply": str(exc.reply)})
        if exc.reply.is_permanent:
            return exc.reply
        return PRIMARY_UNAVAILABLE

    def rcpt(self, recipient: str, params: dict[str, str | None]) -> Reply:
        txn = self._txn
        if txn is None or self._primary is None or not self._primary.connected:
            return PRIMARY_UNAVAILABLE
        try:
            reply = self._primary.rcpt(recipient)
        except UpstreamError as exc:
            return self._primary_failed(exc)
        if reply.is_completed:
            txn.recipients.append(recipient)
        return reply

    def data(self) -> Reply:
        txn = self._txn
        if txn is None or self._primary is None or not self._primary.connected:
            return PRIMARY_UNAVAILABLE
        try:
            reply = self._primary.data()
        except UpstreamError as exc:
            return self._primary_failed(exc)
        if reply.code != 354:
            self.reset()  # the transaction is over; keep the primary reusable
            return reply
        config = self.relay.config
        targets = targets_for(txn.queue_id, txn.recipients, config.relay.destination_backups)
        if targets:
            envelope = Envelope(
                queue_id=txn.queue_id,
                sender=txn.sender,
                recipients=tuple(txn.recipients),
                client=self.client_ip,
                smtputf8="SMTPUTF8" in txn.params,
                body=txn.params.get("BODY"),
                received_at=time.time(),
            )
            try:
                blank = self.relay.blanks.take()
                if blank is not None:
                    txn.spool_file = self.relay.spool.create(envelope, targets, blank)
                else:
                    txn.spool_file = blocking(self.relay.spool.create, envelope, targets)
            except OSError as exc:
                self._txn = None
                self._spool_failed(txn, exc)
                self._finish(txn, LOCAL_ERROR, "aborted")
                return LOCAL_ERROR
        if txn.received:
            self.data_chunk(txn.received)
            txn.size = 0  # the limit counts what the client sent
        return reply

    def data_chunk(self, data: bytes) -> None:
        txn = self._txn
        if txn is None or txn.failure is not None:
            return
        txn.size += len(data)
        txn.tail = (txn.tail + data[-2:])[-2:]
        if txn.spool_file is not None:
            try:
                txn.spool_file.write(data)
            except OSError as exc:
                self._spool_failed(txn, exc)
                return
        # Held back to leave in one write with what follows (the final dot,
        # for a small message: one write for the whole content).
        held = txn.held
        held.append(data)
        txn.held_bytes += len(data)
        if txn.held_bytes >= HOLD_BYTES or len(held) >= HOLD_PIECES:
            txn.held, txn.held_bytes = [], 0
            try:
                assert self._primary is not None
                self._primary.send(held)
            except UpstreamError as exc:
                txn.failure = self._primary_failed(exc)

    def _spool_failed(self, txn: _Transaction, exc: OSError) -> None:
        # The primary must never hold a message the backups cannot get:
        # drop it before the final dot.
        log.error("spool_write_failed", extra={"queue_id": txn.queue_id, "error": str(exc)})
        txn.failure = LOCAL_ERROR
        self._discard(txn)
        if self._primary is not None:
            self._primary.abort()

    def data_abort(self, reply: Reply) -> None:
        """The client's content was refused by smtpdup (too big, bare
        newline, NUL): the primary never sees a final dot. `reply` is what
        the client is told once its final dot arrives, and what the log
        says."""
        txn, self._txn = self._txn, None
        if self._primary is not None:
            self._primary.abort()
        if txn is not None:
            self._discard(txn)
            self._finish(txn, reply, _outcome(reply))

    def data_end(self) -> Reply:
        txn, self._txn = self._txn, None
        if txn is None:
            return PRIMARY_UNAVAILABLE
        reply = self._complete(txn)
        outcome = _outcome(reply)
        if txn.failure is not None:
            outcome = "aborted"
        self._finish(txn, reply, outcome)
        return reply

    def _complete(self, txn: _Transaction) -> Reply:
        primary = self._primary
        if txn.failure is not None or primary is None or not primary.connected:
            if primary is not None:
                primary.abort()
            self._discard(txn)
            return txn.failure or PRIMARY_UNAVAILABLE
        spool_file = txn.spool_file
        if spool_file is not None:
            try:
                spool_file.flush()  # here, so the trip below is fsync only
                self.relay.sync(spool_file)
            except OSError as exc:
                self._spool_failed(txn, exc)
                return LOCAL_ERROR
        _crash_point("before_final_dot")
        started = time.monotonic()
        try:
            reply = primary.end_data(txn.tail == b"\r\n", txn.held)
        except UpstreamError as exc:
            self._discard(txn)
            return self._primary_failed(exc)
        finally:
            metrics.PRIMARY_LATENCY.observe(time.monotonic() - started)
        if not reply.is_completed or spool_file is None:
            self._discard(txn)
            return reply
        _crash_point("after_primary_reply")
        try:
            self.relay.commit_durable(spool_file)
        except OSError as exc:
            # The primary has it but its copy is not safe: the client must
            # retry (a duplicate at the primary beats a lost copy).
            log.error("spool_commit_failed", extra={"queue_id": txn.queue_id, "error": str(exc)})
            self._discard(txn)
            return LOCAL_ERROR
        _crash_point("after_commit")
        self.relay.submit(spool_file.message())
        return reply

    def _discard(self, txn: _Transaction) -> None:
        if txn.spool_file is not None:
            txn.spool_file.discard()
            txn.spool_file = None

    def _finish(self, txn: _Transaction, reply: Reply | None, outcome: str) -> None:
        counter = _TRANSACTION_COUNTERS.get(outcome)
        (counter or metrics.TRANSACTIONS.labels(outcome)).inc()
        if not log.isEnabledFor(logging.INFO):
            return
        log.info(
            "transaction",
            extra={
                "queue_id": txn.queue_id,
                "client": self.client_ip,
                "sender": txn.sender,
                "recipients": len(txn.recipients),
                "size": txn.size,
                "reply": str(reply) if reply is not None else "client gone",
                "outcome": outcome,
                "duration_ms": round((time.monotonic() - txn.started) * 1000, 1),
            },
        )

    def _received_header(self, queue_id: str) -> bytes:
        """RFC 5321 §4.4 trace line, folded; never more than one."""
        helo = _printable(self.helo, MAX_HELO_IN_HEADER)
        with_ = ("ESMTP" if self.esmtp else "SMTP") + ("S" if self.tls else "")
        ip = self.client_ip
        literal = f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"
        date = _received_date()
        return (
            f"Received: from {helo} ({literal})\r\n"
            f"\tby {self.relay.config.smtp.domain} (smtpdup) with {with_} id {queue_id};\r\n"
            f"\t{date}\r\n"
        ).encode("ascii", "replace")
