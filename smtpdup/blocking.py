"""File-system work off the event loop, in batches.

Not only fsync blocks: while the filesystem journal commits somebody's
fsync, even an ``open(O_CREAT)``, a rename or an unlink can take
milliseconds, and on the event loop that would stall every session. So
every spool operation on the message path runs in gevent's threadpool.

A trip to the threadpool costs a thread wake-up and a hub wake-up (tens of
microseconds on a virtual machine, where every cross-CPU wake-up is an
interrupt). :class:`Batch` makes one trip serve every greenlet that asked
while the previous trip was under way: concurrent sessions share their
fsyncs and commits (group commit), deliveries share their state updates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import gevent
from gevent.event import AsyncResult

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
    """

    def __init__(self, work: Callable[[list[Item]], Sequence[BaseException | None]]) -> None:
        self._work = work
        self._waiting: list[tuple[Item, AsyncResult]] = []
        self._running = False

    def __call__(self, item: Item) -> None:
        waiter = AsyncResult()
        self._waiting.append((item, waiter))
        if not self._running:
            self._running = True
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
            self._running = False


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
