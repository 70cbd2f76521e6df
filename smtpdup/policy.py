"""What a backup attempt's replies mean: pure decisions over plain values.

No I/O, no clock, no configuration object: the scheduler (delivery.py)
passes the time and the retry settings in and carries the decisions out
(journal, dead letter, index, back-off). Tested table by table in
tests/test_policy.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .reply import Reply

DELIVERED = "delivered"
DEFERRED = "deferred"
DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Retry:
    """The retry settings (relay.retry_*_seconds)."""

    initial_seconds: float
    max_interval_seconds: float
    max_age_seconds: float


@dataclass(frozen=True, slots=True)
class Outcome:
    """What becomes of a copy after an attempt."""

    name: str  # DELIVERED, DEFERRED (some recipient still to try) or DEAD
    dead: list[str]  # recipients to dead-letter
    deferred: list[str]  # recipients to try again
    reason: str  # why the dead ones are dead ("" if none are)
    next_attempt: float | None  # when to try the deferred ones (None: settled)


def recipient_fate(reply: Reply) -> str:
    """A recipient's fate by the reply that decided it (to its RCPT, or to
    the whole transaction): 2xx delivered, 5xx dead, anything else (4xx, a
    3xx out of place) deferred."""
    if reply.is_completed:
        return DELIVERED
    return DEAD if reply.is_permanent else DEFERRED


def is_site_failure(mail: Reply | None) -> bool:
    """Whether an attempt shows the destination failing as a whole, so that
    it is backed off rather than each copy on its own: no session (connect,
    greeting, EHLO, TLS or a broken connection; ``mail`` None) or a 4xx to
    MAIL. A 5xx to MAIL is about this message, not the destination."""
    return mail is None or mail.is_transient


def retry_delay(failures: int, retry: Retry) -> float:
    """The wait after the ``failures``-th failure in a row (1, 2, ...):
    the initial delay, doubled per failure, at most the maximum interval.
    Serves a copy (its attempts) and a backed-off destination alike."""
    return min(retry.initial_seconds * 2 ** (failures - 1), retry.max_interval_seconds)


def is_expired(now: float, received_at: float, retry: Retry) -> bool:
    """A message received at ``received_at`` is past retry_max_age_seconds."""
    return now - received_at >= retry.max_age_seconds


def outcome(
    *, refused: Sequence[tuple[str, str]], dead: Sequence[str], deferred: Sequence[str], reply: str,
    attempts: int, now: float, received_at: float, retry: Retry,
) -> Outcome:
    """The copy's outcome after its ``attempts``-th attempt at ``now``.

    ``refused``: (recipient, reply) refused at RCPT with a 5xx; ``dead``:
    recipients the whole transaction refused (with ``reply``); ``deferred``:
    recipients to try again. Deferred recipients of a message past its
    maximum age are dead too ("expired after N attempts"); the rest wait
    ``retry_delay(attempts)``, never beyond that age.
    """
    dead_now = [recipient for recipient, _ in refused] + list(dead)
    reasons = [text for _, text in refused]
    if dead:
        reasons.append(reply)
    still = list(deferred)
    if still and is_expired(now, received_at, retry):
        dead_now += still
        reasons.append(f"expired after {attempts} attempts: {reply}")
        still = []
    reason = "; ".join(dict.fromkeys(reasons))
    if still:
        next_attempt = min(now + retry_delay(attempts, retry), received_at + retry.max_age_seconds)
        return Outcome(DEFERRED, dead_now, still, reason, next_attempt)
    return Outcome(DEAD if dead_now else DELIVERED, dead_now, still, reason, None)
