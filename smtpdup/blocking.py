"""File-system work off the event loop, in batches.

Not only fsync blocks: while the filesystem journal commits somebody's
fsync, even an ``open(O_CREAT)``, a rename or an unlink can take
milliseconds, and on the event loop that would stall every session. So the
spool operations that wait on the disk or its journal run in gevent's
threadpool: opening new files (blanks prepared ahead), fsync, the renames
of a commit, state saves, journal lines, dead letters, loading and scanning.
Some stay on the event loop, as cheap as a memory copy or rare: content
written to a file already open (the page cache; its fsync is in the
threadpool), taking a prepared blank, the one stat that looks for a
``queue flush``, reading a fresh message back for its copies (the page
cache), and closing and unlinking a transaction's file when it fails.

A trip to the threadpool costs a thread wake-up and a hub wake-up (tens of
microseconds on a virtual machine, where every cross-CPU wake-up is an
interrupt). :class:`Batch` makes one trip serve every greenlet that asked
while the previous trip was under way: concurrent sessions share their
fsyncs and commits (group commit), deliveries share their state updates.

gevent prints the traceback of every exception raised in a threadpool task
or a greenlet to stderr, as raw lines, even when the caller receives the
exception and handles it (a spool file that cannot be read). In a stream of
JSON lines that is unparsable noise: :func:`log_hub_errors` sends them
through the ``smtpdup`` logger instead, one record each.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import gevent
from gevent.event import AsyncResult

from . import logs

T = TypeVar("T")
Item = TypeVar("Item")


def blocking(function: Callable[..., T], *args: object) -> T:
    """Run one blocking call in gevent's threadpool; return its result or
    raise its exception in the calling greenlet."""
    return gevent.get_hub().threadpool.apply(function, args)


class Batch(Generic[Item]):
    """Hands items to ``work`` in batches, in a worker thread.

    ``work(items)`` returns one entry per item: None for success or the
    exception that item failed with. A caller blocks (its greenlet only)
    until the batch holding its item is done. Items arriving while a batch
    runs form the next one, so under load a batch grows to what arrived
    during one trip, and an idle relay pays no delay at all.

    ``concurrency`` trips may run at once: with 2, items arriving while one
    trip waits for the disk leave at once in a second trip (their fsyncs
    overlap the first's) instead of waiting for it to end.
    """

    def __init__(
        self, work: Callable[[list[Item]], Sequence[BaseException | None]], concurrency: int = 1,
    ) -> None:
        self._work = work
        self._waiting: list[tuple[Item, AsyncResult]] = []
        self._running = 0
        self._concurrency = concurrency

    def __call__(self, item: Item) -> None:
        waiter = AsyncResult()
        self._waiting.append((item, waiter))
        if self._running < self._concurrency:
            self._running += 1
            gevent.spawn(self._run)
        waiter.get()

    def _run(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    errors = blocking(self._work, [item for item, _ in batch])
                except Exception as exc:  # the work itself broke: every item failed
                    errors = [exc] * len(batch)
                for (_, waiter), error in zip(batch, errors):
                    if error is None:
                        waiter.set(None)
                    else:
                        waiter.set_exception(error)
        finally:
            self._running -= 1


def each(function: Callable[[Item], object]) -> Callable[[list[Item]], list[BaseException | None]]:
    """A batch ``work`` that calls ``function`` on every item, collecting
    OSErrors per item."""

    def work(items: list[Item]) -> list[BaseException | None]:
        errors: list[BaseException | None] = []
        for item in items:
            try:
                function(item)
                errors.append(None)
            except OSError as exc:
                errors.append(exc)
        return errors

    return work


_hub_log = logs.get("hub")


def log_hub_errors() -> None:
    """Make this thread's gevent hub log the errors it would print.

    A threadpool task's exception also reaches the caller of ``blocking``,
    whose own log line names the queue id and the fault: here it is a
    warning (``threadpool_task_failed``) with the traceback. An exception
    that ends a greenlet reaches nobody else: an error (``greenlet_failed``).
    Both are one record, so one JSON line. Idempotent."""
    hub = gevent.get_hub()
    # gevent's documented hook: an instance attribute with the method's
    # signature (``Hub.handle_error`` calls ``self.print_exception``).
    hub.print_exception = _log_exception


def _log_exception(context: object, kind: type | None, value: BaseException | None, tb: object) -> None:
    try:
        exc_info = (kind, value, tb) if kind is not None else None
        # gevent's threadpool reports (its worker, the function) as context.
        if isinstance(context, tuple) and len(context) == 2 and type(context[0]).__module__ == "gevent.threadpool":
            function = context[1]
            name = getattr(function, "__qualname__", None) or repr(function)
            _hub_log.warning("threadpool_task_failed", exc_info=exc_info, extra={"function": name})
        else:
            _hub_log.error("greenlet_failed", exc_info=exc_info, extra={"greenlet": _describe(context)})
    except Exception as exc:  # the hub's hook must never raise (gevent's rule)
        sys.stderr.write(f"smtpdup: cannot log a gevent error: {exc!r}\n")


def _describe(context: object) -> str:
    try:
        return repr(context)[:200]
    except Exception:  # a broken __repr__
        return type(context).__name__
