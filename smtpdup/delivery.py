"""Backup delivery: due copies from the spool -> a bounded pool -> backups.

One :class:`Scheduler` per process owns the in-memory index of pending
copies (a queue id, a copy index and a due time each: the backlog itself
lives on disk) and is the only code that spawns into the backup pool, so a
slow backup pushes back on the scheduler, never on a client.

Per destination it keeps a short queue of copies that are due now; workers
in the pool take copies from it and carry as many as they can over one
SMTP session (envelope pipelined where the backup offers PIPELINING, RSET
after failures), lingering briefly for more.

A destination that fails as a whole (connection refused or lost, timeout,
421, or a 4xx to MAIL: a site failure, in Postfix's words) is backed off:
the attempt that failed is recorded for its copy, and every other copy for
that destination waits in the index, untouched and unsaved, until the
back-off ends (doubling from ``retry_initial_seconds`` up to
``retry_max_interval_seconds``). Then one copy probes it; the queue opens
again once a backup accepts a MAIL. So an outage costs one attempt per
back-off interval, not one per copy, and a flapping backup cannot eat the
relay's time. Copies that reach ``retry_max_age_seconds`` meanwhile are
dead-lettered all the same.

Destinations share the pool: while several have due copies, each may
hold at most its share of the workers, and a worker over its share (or
idle) gives its slot up as soon as another destination waits for one, so a
slow, failing or backlogged backup never holds the others back.

Outcomes, per recipient of a copy: 2xx delivered; 4xx, timeouts and
connection errors deferred with exponential backoff until
``retry_max_age_seconds``; 5xx and expiry dead-lettered with the reply.
Every outcome is journalled and saved in the threadpool, in batches (the
outcomes of one message in a batch share one save), before the copy's
worker takes another copy: a settled copy is never tried again, after a
restart or a crash included. Only a copy whose attempt was cut by a crash
can be delivered twice (at-least-once): at most one per worker in flight.

At start the index is built from the spool in the background, in chunks,
while the relay already serves SMTP and delivers what it has indexed.

Inflow control, as Postfix's ``in_flow_delay``: client sessions and backup
workers share one process. When the process is CPU-bound (the event loop
runs late) and copies for reachable backups pile up in a ready queue, a
new transaction waits, up to FLOW_DELAY_SECONDS, before its MAIL is
answered, so that intake cannot outgrow delivery without bound. A backup
that is backed off, or merely slow while the CPU idles, never slows the
primary path.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import gevent
from gevent.event import Event
from gevent.pool import Group

from . import logs, metrics, policy
from .blocking import Batch, blocking
from .config import Current, RelayConfig
from .destination import Destination
from .reply import Reply
from .spool import MEMORY_CONTENT_BYTES, AttemptOutcome, Copy, Message, Spool
from .transfer import Attempt, send_copy
from .upstream import Upstream, UpstreamError

log = logs.get("delivery")


# Copies due now kept in memory per destination (each pins its Message);
# beyond this, due copies wait in the on-disk backlog's index until the
# queue drains, so memory does not grow with the backlog.
READY_PER_DESTINATION = 1000
# How long an idle worker keeps its session open for more copies.
LINGER_SECONDS = 1.0
# How often the scheduler looks for `smtpdup queue flush` and refreshes
# the spool gauges.
POLL_SECONDS = 1.0
# A message younger than this is read on the event loop: its content was
# just written and is in the page cache. Older ones are read in the
# threadpool, as reading them may wait for the disk.
FRESH_SECONDS = 60.0
# How often the dead letters are counted for the smtpdup_spool_copies gauge.
DEAD_COUNT_SECONDS = 10.0
# Content is read from the spool and sent in blocks of this size.
READ_BLOCK_BYTES = 64 * 1024
# Messages read from the spool per threadpool trip: when indexing the spool
# at start, and when loading due copies into the ready queues.
LOAD_CHUNK = 256
# Inflow control (see the module docstring): a ready queue this long for a
# reachable backup, while the event loop runs this late, delays new
# transactions by up to FLOW_DELAY_SECONDS each.
CONGESTED_READY = READY_PER_DESTINATION // 2
CONGESTED_LAG_SECONDS = 0.01
FLOW_DELAY_SECONDS = 1.0
# How the event loop's lateness is sampled: a timer this often, smoothed.
LAG_SAMPLE_SECONDS = 0.05


@dataclass(slots=True)
class _Down:
    """A destination backed off after a site failure."""

    until: float  # time.time() of the next probe
    failures: int  # site failures in a row
    reply: Reply  # the last one's reply


class Scheduler:
    def __init__(self, current: Current, spool: Spool) -> None:
        self.current = current  # the configuration in force: current.config
        self.spool = spool
        # The backup pool: its size is relay.backup_concurrency as of now
        # (see _free), so that a reload resizes it. A gevent Pool's size is
        # fixed by the semaphore it is built with; this Group only tracks
        # the workers, for stop().
        self.pool = Group()
        self._ready: dict[str, deque[str]] = defaultdict(deque)  # destination -> "qid/index"
        self._delayed: dict[str, list[tuple[float, str]]] = defaultdict(list)  # heaps of (due, "qid/index")
        self._live: dict[str, list] = {}  # qid -> [Message, copies queued or in flight]
        self._records: Batch[AttemptOutcome] = Batch(spool.record_outcomes)
        self._workers: dict[str, int] = defaultdict(int)
        self._idle: dict[str, int] = defaultdict(int)
        self._in_flight: dict[str, int] = defaultdict(int)  # copies being attempted
        self._work: dict[str, Event] = defaultdict(Event)
        self._wake = Event()
        self._greenlet: gevent.Greenlet | None = None
        self._stopping = False
        self.flushes = 0  # `queue flush` requests acted upon
        self._share = (0, 1)
        self._next_dead_count = 0.0
        self._loader: gevent.Greenlet | None = None
        self.loaded = Event()  # the spool's pending copies are all indexed
        self.loaded_count = 0
        # Queue ids submitted while the spool is being indexed, which the
        # index must not queue a second time.
        self._submitted: set[str] = set()
        self._flushed_while_loading = False  # copies indexed after a flush are due now
        self._down: dict[str, _Down] = {}  # destinations backed off after a site failure
        self.lag = 0.0  # the event loop's lateness, smoothed (see _watch_lag)
        self._lag_watch: gevent.Greenlet | None = None
        self._trimming: gevent.Greenlet | None = None

    # -- intake ---------------------------------------------------------

    def load(self, share: tuple[int, int] = (0, 1)) -> int:
        """Index the pending copies in the spool, reading it in the
        threadpool chunk by chunk (the relay serves meanwhile). ``share``
        is (this worker, workers): with several worker processes each takes
        the messages whose queue id hashes to it, so none is claimed twice;
        a new message stays with the worker that received it. Returns the
        number of copies indexed."""
        self._share = share
        count = 0
        # What `queue requeue` made until now, the scan below finds.
        blocking(self.spool.take_requeued)
        messages = self.spool.messages()
        while not self._stopping:
            chunk = blocking(_take, messages, LOAD_CHUNK)
            if not chunk:
                break
            for message in chunk:
                if not self._mine(message.queue_id):
                    continue
                if message.queue_id in self._submitted:
                    continue  # committed since start: already queued by submit()
                for copy in message.pending():
                    due = 0.0 if self._flushed_while_loading else copy.next_attempt
                    heapq.heappush(self._delayed[copy.destination], (due, _key(message, copy)))
                    count += 1
            self._wake.set()
        self.loaded_count = count
        self.loaded.set()
        self._submitted = set()
        return count

    def _mine(self, queue_id: str) -> bool:
        """Whether this worker process owns the message (see ``load``)."""
        index, workers = self._share
        return workers <= 1 or int(queue_id[-8:], 16) % workers == index

    def submit(self, message: Message) -> None:
        """A freshly committed message (built in memory by the relay, not
        read back), or one requeued from the dead letters: its copies are
        due now."""
        if not self.loaded.is_set():
            self._submitted.add(message.envelope.queue_id)
        for copy in message.pending():
            dest = copy.destination
            if dest not in self._down and len(self._ready[dest]) < READY_PER_DESTINATION:
                self._queue(message, copy)
            else:
                heapq.heappush(self._delayed[dest], (0.0, _key(message, copy)))
        self._wake.set()

    def _queue(self, message: Message, copy: Copy) -> None:
        live = self._live.setdefault(message.envelope.queue_id, [message, 0])
        live[1] += 1
        self._ready[copy.destination].append(_key(message, copy))
        self._work[copy.destination].set()

    def _release(self, queue_id: str) -> None:
        live = self._live.get(queue_id)
        if live is not None:
            live[1] -= 1
            if live[1] <= 0:
                del self._live[queue_id]

    # -- the scheduler loop -----------------------------------------------

    def start(self, share: tuple[int, int] = (0, 1), load: bool = True) -> None:
        """Start scheduling; with ``load``, index the spool's pending copies
        (this process's ``share`` of them) in the background (see
        ``loaded``)."""
        self._share = share
        self._greenlet = gevent.spawn(self._run)
        self._lag_watch = gevent.spawn(self._watch_lag)
        if load:
            self._loader = gevent.spawn(self._load_logged)
        else:
            self.loaded.set()

    def _load_logged(self) -> None:
        started = time.monotonic()
        try:
            count = self.load(self._share)
        except OSError as exc:
            log.error("spool_read_failed", extra={"error": str(exc)})
            self.loaded.set()
            self._submitted = set()
            return
        log.info("spool_loaded", extra={
            "pending_copies": count, "duration_ms": round((time.monotonic() - started) * 1000, 1),
        })

    def stop(self, timeout: float = 5.0) -> None:
        """Stop scheduling and end deliveries in flight; what they had not
        finished stays pending on disk."""
        self._stopping = True
        self._wake.set()
        if self._loader is not None:
            self._loader.kill(timeout=timeout)
        for event in list(self._work.values()):
            event.set()
        self.pool.join(timeout=timeout)
        self.pool.kill(timeout=timeout)
        if self._greenlet is not None:
            self._greenlet.kill(timeout=timeout)
        if self._lag_watch is not None:
            self._lag_watch.kill(timeout=timeout)
        if self._trimming is not None:
            self._trimming.join(timeout=timeout)

    def _run(self) -> None:
        next_poll = 0.0
        while not self._stopping:
            now = time.time()
            if now >= next_poll:
                next_poll = now + POLL_SECONDS
                self._poll_spool()
                self._expire_down(now)
                self._update_gauges(now)
                self._trim_free()
            self._promote(now)
            self._dispatch()
            due = [self._next_due(dest, heap) for dest, heap in self._delayed.items() if heap and self._room(dest)]
            timeout = max(0.0, min([next_poll, *due]) - time.time())
            self._wake.wait(timeout)
            self._wake.clear()

    def _trim_free(self) -> None:
        """Remove the spool's surplus of recycled files (Spool.trim_free)
        in the threadpool, beside the deliveries, not in their way."""
        if self._trimming is None or self._trimming.dead:
            self._trimming = gevent.spawn(self._trim_logged)

    def _trim_logged(self) -> None:
        try:
            blocking(self.spool.trim_free)
        except OSError as exc:
            log.error("spool_trim_failed", extra={"error": str(exc)})

    def _watch_lag(self) -> None:
        """Sample how late the event loop wakes a timer: near 0 while the
        process has CPU to spare, tens of milliseconds when it is CPU-bound."""
        while not self._stopping:
            started = time.monotonic()
            gevent.sleep(LAG_SAMPLE_SECONDS)
            late = max(0.0, time.monotonic() - started - LAG_SAMPLE_SECONDS)
            self.lag = 0.8 * self.lag + 0.2 * late

    def congested(self) -> bool:
        """Delivery is behind because the process is short of CPU: a
        reachable backup's ready queue is long while the loop runs late."""
        return self.lag >= CONGESTED_LAG_SECONDS and any(
            len(ready) >= CONGESTED_READY for dest, ready in self._ready.items() if dest not in self._down
        )

    def flow_delay(self) -> None:
        """Called before a new transaction: wait while ``congested()``, up
        to FLOW_DELAY_SECONDS."""
        if not self.congested():
            return
        started = time.monotonic()
        deadline = started + FLOW_DELAY_SECONDS
        while time.monotonic() < deadline and self.congested():
            gevent.sleep(LAG_SAMPLE_SECONDS)
        metrics.INFLOW_DELAY.inc(time.monotonic() - started)

    def _poll_spool(self) -> None:
        """Act on `queue flush` and index what `queue requeue` made."""
        request = self.spool.take_flush()
        if request is not None:
            self.flush(request.destinations)
            self.flushes += 1
        try:
            requeued = blocking(self.spool.take_requeued)
        except OSError as exc:
            log.error("spool_read_failed", extra={"error": str(exc)})
            return
        for message in requeued:
            if self._mine(message.queue_id):
                self.submit(message)

    def flush(self, destinations: frozenset[str] | None = None) -> None:
        """Make every pending copy due now (those still to be indexed too),
        or those for ``destinations`` only; a flushed destination's back-off
        ends too."""
        if not self.loaded.is_set() and destinations is None:
            self._flushed_while_loading = True
        for dest, heap in self._delayed.items():
            if destinations is None or dest in destinations:
                self._delayed[dest] = [(0.0, key) for _, key in heap]
        for dest, down in self._down.items():
            if destinations is None or dest in destinations:
                down.until = 0.0
        log.info("queue_flush", extra={
            "copies": sum(len(h) for d, h in self._delayed.items() if destinations is None or d in destinations),
            "destination": None if destinations is None else ",".join(sorted(destinations)),
        })
        self._wake.set()

    def _room(self, dest: str) -> int:
        """How many copies may move to ``dest``'s ready queue now. A
        backed-off destination takes one, to probe it, once its back-off
        ended and nothing of it is queued or in flight."""
        ready = len(self._ready[dest])
        if dest in self._down:
            return 0 if ready or self._workers[dest] else 1
        return READY_PER_DESTINATION - ready

    def _next_due(self, dest: str, heap: list[tuple[float, str]]) -> float:
        down = self._down.get(dest)
        return heap[0][0] if down is None else max(heap[0][0], down.until)

    def _promote(self, now: float) -> None:
        """Move due copies from the index to their destinations' queues,
        a chunk per destination in turn (so every destination gets work from
        the start), loading the messages that are not in memory in one
        threadpool trip per chunk. Workers are started after each round."""
        while not self._stopping:
            moved = False
            for dest, heap in list(self._delayed.items()):
                keys = []
                room = min(self._room(dest), LOAD_CHUNK)
                down = self._down.get(dest)
                if down is not None and down.until > now:
                    room = 0
                while heap and heap[0][0] <= now and len(keys) < room:
                    keys.append(heapq.heappop(heap)[1])
                if not keys:
                    continue
                moved = True
                try:
                    messages = self._messages(keys)
                except OSError as exc:
                    log.error("spool_read_failed", extra={"error": str(exc)})
                    retry = now + self.current.config.relay.retry_initial_seconds
                    for key in keys:
                        heapq.heappush(heap, (retry, key))
                    continue
                for key in keys:
                    queue_id, index = _split(key)
                    message = messages.get(queue_id)
                    if message is None or index >= len(message.copies) or message.copies[index].settled:
                        continue  # delivered meanwhile, or deleted with `queue delete`
                    self._queue(message, message.copies[index])
            self._dispatch()
            if not moved:
                return

    def _messages(self, keys: list[str]) -> dict[str, Message]:
        """The messages of ``keys`` by queue id: those in memory, the others
        read from the spool in one threadpool trip. Those in memory are held
        here, not looked up again after the trip: a copy of one may finish
        meanwhile and drop it from ``_live``. Raises OSError."""
        found: dict[str, Message] = {}
        wanted = []
        for queue_id in {_split(key)[0] for key in keys}:
            live = self._live.get(queue_id)
            if live is not None:
                found[queue_id] = live[0]
            else:
                wanted.append(queue_id)
        if wanted:
            for queue_id, message in blocking(self._load_many, sorted(wanted)).items():
                live = self._live.get(queue_id)  # in memory meanwhile: one object per message
                found[queue_id] = live[0] if live is not None else message
        return found

    def _load_many(self, queue_ids: list[str]) -> dict[str, Message]:
        """In a worker thread: the messages still in the spool, by queue id."""
        found = {}
        for queue_id in queue_ids:
            message = self.spool.load(queue_id)
            if message is not None:
                found[queue_id] = message
        return found

    def _dispatch(self) -> None:
        """Start workers where copies wait and no idle worker is there, one
        destination after another in turn, each up to its share."""
        while self._free() > 0:
            started = False
            for dest, ready in self._ready.items():
                if ready and len(ready) > self._idle[dest] and self._workers[dest] < self._share_of(dest):
                    if self._free() <= 0:
                        return  # a finishing worker wakes the loop
                    self._workers[dest] += 1
                    self.pool.spawn(self._worker, dest)
                    self._idle[dest] += 1  # counted idle until it takes a copy
                    started = True
            if not started:
                break
        if self._free() <= 0:
            for dest, ready in self._ready.items():
                if ready and self._starving_for(dest):
                    # Idle workers elsewhere notice and give their slots up.
                    for other, event in self._work.items():
                        if other != dest:
                            event.set()
                    break

    def _free(self) -> int:
        """How many more workers the pool takes: relay.backup_concurrency,
        read anew so that a reload resizes the pool, less the workers
        running (below zero after a reload made the pool smaller)."""
        return self.current.config.relay.backup_concurrency - sum(self._workers.values())

    def reconfigure(self) -> None:
        """A reload has replaced the configuration: a larger pool starts
        workers where copies wait; in a smaller one, workers over its size
        leave after their copy in flight (idle ones at once)."""
        self._wake.set()
        for event in self._work.values():
            event.set()

    def _share_of(self, dest: str) -> int:
        """How many workers ``dest`` may hold: the whole pool while it is
        the only destination with work, else an equal share of it."""
        busy = sum(1 for d, ready in self._ready.items() if ready or self._workers[d])
        if not (self._ready[dest] or self._workers[dest]):
            busy += 1
        return max(1, self.current.config.relay.backup_concurrency // max(1, busy))

    def _starving(self, dest: str) -> bool:
        """True when the pool is full and another destination has copies
        waiting under its share: a worker of ``dest`` that is idle, or over
        its own share, should give its slot up."""
        if self._free() > 0:
            return False
        return any(d != dest and self._starving_for(d) for d in self._ready)

    def _starving_for(self, dest: str) -> bool:
        """``dest`` has copies that no idle worker of its own will take, and
        fewer workers than its share."""
        return len(self._ready[dest]) > self._idle[dest] and self._workers[dest] < self._share_of(dest)

    # -- workers ----------------------------------------------------------

    def _worker(self, dest_name: str) -> None:
        upstream: Upstream | None = None
        ready = self._ready[dest_name]
        delayed = self._delayed
        work = self._work[dest_name]
        idle_until = None
        try:
            while not self._stopping:
                if self._free() < 0:
                    return  # a reload made the pool smaller
                if self._starving(dest_name) and (
                    not ready or self._workers[dest_name] > self._share_of(dest_name)
                ):
                    return  # the slot serves a destination that waits
                if not ready:
                    # Linger with the session open: more copies are likely.
                    # Every idle worker wakes for a new copy; those that
                    # lose the race wait on until their own deadline.
                    now = time.monotonic()
                    idle_until = idle_until or now + LINGER_SECONDS
                    if now >= idle_until:
                        return
                    work.clear()
                    work.wait(idle_until - now)
                    continue
                idle_until = None
                key = ready.popleft()
                if len(ready) <= READY_PER_DESTINATION // 2 and delayed[dest_name]:
                    self._wake.set()  # refill the queue before it runs dry
                self._idle[dest_name] -= 1
                self._in_flight[dest_name] += 1
                try:
                    upstream = self._deliver(dest_name, key, upstream)
                finally:
                    self._in_flight[dest_name] -= 1
                    self._idle[dest_name] += 1
        finally:
            self._idle[dest_name] -= 1
            self._workers[dest_name] -= 1
            if upstream is not None:
                upstream.quit()
            self._wake.set()

    def _deliver(self, dest_name: str, key: str, upstream: Upstream | None) -> Upstream | None:
        """One attempt for one copy; returns the session to reuse, if any."""
        queue_id, index = _split(key)
        live = self._live.get(queue_id)
        try:
            if live is None:
                return upstream
            message = live[0]
            copy = message.copies[index]
            if copy.settled:
                return upstream
            destination = self._destination(dest_name)
            if destination is None:
                # Removed by a reload: like a site failure, one attempt per
                # back-off interval, not one per copy, until it is configured
                # again or the copies expire.
                reply = Reply(451, "4.3.5", f"{dest_name} is no longer configured")
                self._finish(message, copy, Attempt(deferred=list(copy.recipients), reply=reply), 0.0)
                self._back_off(dest_name, reply)
                return upstream
            started = time.monotonic()
            if upstream is None or not upstream.connected:
                config = self.current.config
                upstream = Upstream.for_destination(destination, config.relay, config.smtp.domain)
                try:
                    upstream.connect()
                except UpstreamError as exc:
                    attempt = Attempt(deferred=list(copy.recipients), reply=exc.reply,
                                      site_failure=policy.is_site_failure(None))
                    self._finish(message, copy, attempt, time.monotonic() - started)
                    self._back_off(dest_name, exc.reply)
                    return None
            attempt = self._transfer(upstream, message, copy)
            self._finish(message, copy, attempt, time.monotonic() - started)
            if attempt.site_failure:
                assert attempt.reply is not None
                self._back_off(dest_name, attempt.reply)
                if upstream.connected:
                    upstream.quit()
                return None
            return upstream if upstream.connected else None
        finally:
            self._release(queue_id)

    def _back_off(self, dest_name: str, reply: Reply) -> None:
        """A site failure: the destination waits out a back-off; the copies
        queued for it go back to the index as they are (no attempt, no
        save), to be promoted again when it answers."""
        down = self._down.get(dest_name)
        failures = 1 if down is None else down.failures + 1
        delay = policy.retry_delay(failures, _retry(self.current.config.relay))
        now = time.time()
        self._down[dest_name] = _Down(until=now + delay, failures=failures, reply=reply)
        ready = self._ready[dest_name]
        heap = self._delayed[dest_name]
        while ready:
            key = ready.popleft()
            heapq.heappush(heap, (now, key))
            self._release(_split(key)[0])
        (log.warning if failures == 1 else log.info)("backup_destination_down", extra={
            "destination": dest_name, "reply": str(reply), "failures": failures,
            "retry_in_seconds": round(delay, 3), "pending_copies": len(heap),
        })
        self._wake.set()

    def _destination_up(self, dest_name: str) -> None:
        """The destination accepted a MAIL: its back-off, if any, ends."""
        down = self._down.pop(dest_name, None)
        if down is not None:
            log.info("backup_destination_up", extra={"destination": dest_name, "failures": down.failures})
            self._wake.set()

    def _expire_down(self, now: float) -> None:
        """Dead-letter the copies of backed-off destinations that reached
        retry_max_age_seconds: nothing else would attempt them."""
        max_age = self.current.config.relay.retry_max_age_seconds
        for dest in list(self._down):
            heap = self._delayed.get(dest)
            if not heap or _queue_time(min(heap, key=_second)[1]) + max_age > now:
                continue
            expired = [key for _, key in heap if _queue_time(key) + max_age <= now]
            gone = set(expired)
            self._delayed[dest] = [entry for entry in heap if entry[1] not in gone]
            heapq.heapify(self._delayed[dest])
            reply = self._down[dest].reply
            for start in range(0, len(expired), LOAD_CHUNK):
                keys = expired[start:start + LOAD_CHUNK]
                try:
                    messages = self._messages(keys)
                except OSError as exc:
                    log.error("spool_read_failed", extra={"error": str(exc)})
                    for key in keys:
                        heapq.heappush(self._delayed[dest], (now, key))
                    continue
                for key in keys:
                    queue_id, index = _split(key)
                    message = messages.get(queue_id)
                    if message is None or index >= len(message.copies) or message.copies[index].settled:
                        continue
                    copy = message.copies[index]
                    self._finish(message, copy, Attempt(deferred=list(copy.recipients), reply=reply), 0.0)

    def _transfer(self, upstream: Upstream, message: Message, copy: Copy) -> Attempt:
        """One copy over an open session: its content opened (in memory,
        from the page cache, or in the threadpool), then sent (send_copy)."""
        envelope = message.envelope
        try:
            if message.content is not None or time.time() - envelope.received_at < FRESH_SECONDS:
                content = self._open_content(message)  # in memory or the page cache: no disk wait
            else:
                content = blocking(self._open_content, message)
        except FileNotFoundError:
            # Nothing left to deliver: settles the copy.
            return Attempt(reply=Reply(250, "2.0.0", "deleted from the queue"))
        except OSError as exc:
            return _unreadable(message, copy, exc)
        params: dict[str, str | None] = {"SIZE": str(message.content_length)}
        if envelope.smtputf8:
            params["SMTPUTF8"] = None
        if envelope.body:
            params["BODY"] = envelope.body
        with content:
            try:
                attempt = send_copy(upstream, envelope.sender, params, copy.recipients, content)
            except OSError as exc:
                # A broken spool file mid-content (the session is dropped:
                # no final dot); the destination had accepted MAIL.
                self._destination_up(copy.destination)
                return _unreadable(message, copy, exc)
        if attempt.mail_accepted:
            self._destination_up(copy.destination)
        return attempt

    def _finish(self, message: Message, copy: Copy, attempt: Attempt, seconds: float) -> None:
        """Replace the copy with its state after the attempt, then have the
        spool record it (Spool.record_outcomes, in the threadpool,
        serialised per message). What the outcome is, policy.outcome
        decides."""
        envelope = message.envelope
        now = time.time()
        dest = copy.destination
        attempts = copy.attempts + 1
        reply_text = str(attempt.reply) if attempt.reply is not None else ""
        if attempt.delivered:
            metrics.BACKUP_DELIVERIES.labels(dest, "delivered").inc()
        for recipient, reply in attempt.refused:
            log.warning("backup_refused_recipient", extra={
                "queue_id": envelope.queue_id, "destination": dest,
                "recipient": recipient, "reply": str(reply),
            })
            metrics.BACKUP_REFUSED_RECIPIENTS.labels(dest).inc()
        refused = [(recipient, str(reply)) for recipient, reply in attempt.refused]
        verdict = policy.outcome(
            refused=refused, dead=attempt.dead,
            deferred=attempt.deferred, reply=reply_text, attempts=attempts, now=now,
            received_at=envelope.received_at, retry=_retry(self.current.config.relay),
        )
        dead, deferred, reason, outcome = verdict.dead, verdict.deferred, verdict.reason, verdict.name
        if dead:
            metrics.BACKUP_DELIVERIES.labels(dest, "dead").inc()
            self._next_dead_count = 0.0  # recount at the next poll
        settled = verdict.next_attempt is None
        copy = message.update(
            copy.index, attempts=attempts, last_reply=reply_text, recipients=tuple(deferred), settled=settled,
            next_attempt=copy.next_attempt if settled else verdict.next_attempt,
        )
        if not settled:
            heapq.heappush(self._delayed[dest], (copy.next_attempt, _key(message, copy)))
            metrics.BACKUP_DELIVERIES.labels(dest, "deferred").inc()
        try:
            # Batched: outcomes recorded one after another in one thread,
            # so the saves of a message never overtake each other; the
            # worker goes on only once its outcome is on disk.
            self._records(AttemptOutcome(message, copy, attempt.delivered, deferred, refused, dead, reply_text,
                                         reason, now))
        except OSError as exc:
            # The outcome could not be written: the copy stays as it was on
            # disk and is tried again after a restart, if not sooner.
            log.error("spool_update_failed", extra={
                "queue_id": envelope.queue_id, "destination": dest, "error": str(exc),
            })
        log.info("backup_attempt", extra={
            "queue_id": envelope.queue_id, "destination": dest, "attempt": copy.attempts,
            "reply": reply_text, "outcome": outcome,
            "delivered": len(attempt.delivered), "deferred": len(deferred), "dead": len(dead),
            "duration_ms": round(seconds * 1000, 1),
        })

    def _open_content(self, message: Message) -> _Blocks:
        """In a worker thread: the content of ``message``. Small content is
        in memory while the message is fresh (``Message.content``: the
        chunks the relay received, or one read kept for the message's other
        copies until none is queued), else read as one block (the usual
        case: one trip to the threadpool); large content is an iterator that
        reads each further block in the threadpool too."""
        if message.content is not None:
            return _Blocks(message.content)
        f = self.spool.open_content(message)
        length = message.content_length
        if length <= READ_BLOCK_BYTES:
            try:
                data = f.read(length)
            finally:
                f.close()
            if len(data) != length:
                raise OSError(f"spool file of {message.queue_id} is truncated")
            if length <= MEMORY_CONTENT_BYTES:
                message.content = (data,)
            return _Blocks([data])
        return _Blocks(_stream(f, length))

    def _destination(self, name: str) -> Destination | None:
        for destination in self.current.config.relay.destination_backups:
            if destination.name == name:
                return destination
        return None

    def _update_gauges(self, now: float) -> None:
        """Pending copies and the oldest one's age, per backup and in all.
        Queue ids are fixed-width and begin with their creation time, so the
        smallest key is the oldest copy (a C-level ``min``, no parsing)."""
        total = 0
        oldest_overall = None
        for destination in self.current.config.relay.destination_backups:
            dest = destination.name
            ready, heap = self._ready.get(dest), self._delayed.get(dest)
            count = (len(ready) if ready else 0) + (len(heap) if heap else 0) + self._in_flight.get(dest, 0)
            oldest = min(
                ([min(ready)] if ready else []) + ([min(heap, key=_second)[1]] if heap else []),
                default=None,
            )
            total += count
            age = 0.0 if oldest is None else max(0.0, now - _queue_time(oldest))
            metrics.BACKUP_PENDING_COPIES.labels(dest).set(count)
            metrics.BACKUP_OLDEST_PENDING_AGE.labels(dest).set(age)
            if oldest is not None and (oldest_overall is None or oldest < oldest_overall):
                oldest_overall = oldest
        metrics.SPOOL_COPIES.labels("pending").set(self.pending_count())
        metrics.SPOOL_OLDEST_AGE.set(0.0 if oldest_overall is None else max(0.0, now - _queue_time(oldest_overall)))
        if self._share[0] == 0 and now >= self._next_dead_count:
            # Dead letters belong to no worker: the first one counts them all.
            self._next_dead_count = now + DEAD_COUNT_SECONDS
            try:
                metrics.SPOOL_COPIES.labels("dead").set(blocking(self.spool.dead_count))
            except OSError:
                pass

    def pending_count(self) -> int:
        return (
            sum(len(h) for h in self._delayed.values())
            + sum(len(q) for q in self._ready.values())
        )

    def held_count(self) -> int:
        """Messages held in memory: those with a copy queued or in flight."""
        return len(self._live)


class _Blocks:
    """Content blocks to send, closable like a file."""

    def __init__(self, blocks: Iterable[bytes]) -> None:
        self._blocks = blocks

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._blocks)

    def __enter__(self) -> _Blocks:
        return self

    def __exit__(self, *exc_info: object) -> None:
        close = getattr(self._blocks, "close", None)
        if close is not None:
            close()


def _take(iterator: Iterator[Message], count: int) -> list[Message]:
    """In a worker thread: up to ``count`` more items of ``iterator``."""
    return list(itertools.islice(iterator, count))


def _stream(f: BinaryIO, length: int) -> Iterator[bytes]:
    """Blocks of a large content, each read in the threadpool."""
    try:
        remaining = length
        while remaining > 0:
            block = blocking(f.read, min(READ_BLOCK_BYTES, remaining))
            if not block:
                raise OSError("spool file is truncated")
            remaining -= len(block)
            yield block
    finally:
        f.close()


def _retry(relay_config: RelayConfig) -> policy.Retry:
    return policy.Retry(relay_config.retry_initial_seconds, relay_config.retry_max_interval_seconds,
                        relay_config.retry_max_age_seconds)


def _unreadable(message: Message, copy: Copy, exc: OSError) -> Attempt:
    """The attempt of a copy whose spool file cannot be read: deferred."""
    log.error("spool_read_failed", extra={"queue_id": message.envelope.queue_id, "error": str(exc)})
    return Attempt(deferred=list(copy.recipients), reply=Reply(451, "4.3.0", "spool file unreadable"))


def _second(entry: tuple[float, str]) -> str:
    return entry[1]


def _key(message: Message, copy: Copy) -> str:
    return f"{message.envelope.queue_id}/{copy.index}"


def _split(key: str) -> tuple[str, int]:
    queue_id, _, index = key.rpartition("/")
    return queue_id, int(index)


def _queue_time(key: str) -> float:
    """Queue ids begin with their creation time in milliseconds (hex)."""
    try:
        return int(key[:11], 16) / 1000
    except ValueError:
        return time.time()
