"""One backup copy over an open session: MAIL, a RCPT per recipient, DATA
and the content, and what became of each recipient.

The delivery scheduler (delivery.py) opens the session and the content and
decides what to do with the outcome (policy.outcome: journal, retry,
dead-letter, back-off); this module only speaks SMTP through upstream.py
and sorts the replies by policy.recipient_fate. It never logs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from . import policy
from .reply import Reply
from .upstream import Upstream, UpstreamError


@dataclass(slots=True)
class Attempt:
    """What one attempt did with each recipient of a copy."""

    delivered: list[str] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)
    refused: list[tuple[str, Reply]] = field(default_factory=list)  # RCPT-level 5xx
    dead: list[str] = field(default_factory=list)  # whole-copy 5xx
    reply: Reply | None = None  # the reply that decided the attempt
    site_failure: bool = False  # the destination failed as a whole (policy.is_site_failure)
    mail_accepted: bool = False  # the destination accepted MAIL: it is up


def send_copy(
    upstream: Upstream, sender: str, params: Mapping[str, str | None], recipients: list[str],
    content: Iterable[bytes],
) -> Attempt:
    """MAIL (with ``params``), a RCPT per recipient, DATA and ``content``
    (wire-form blocks) over the open session ``upstream``; the session is
    left reusable (RSET after a refusal) unless it broke, which defers
    every recipient not decided yet. Raises OSError from ``content`` (a
    broken spool file) after dropping the session: no final dot is ever
    sent for it.
    """
    attempt = Attempt()
    try:
        mail, rcpts, data = upstream.open_transaction(sender, params, recipients)
        if not mail.is_completed:
            attempt.reply = mail
            attempt.site_failure = policy.is_site_failure(mail)
            _classify(attempt, recipients, mail)
            _rset(upstream)
            return attempt
        attempt.mail_accepted = True
        accepted = []
        for recipient, reply in zip(recipients, rcpts):
            fate = policy.recipient_fate(reply)
            if fate == policy.DELIVERED:
                accepted.append(recipient)
            elif fate == policy.DEAD:
                attempt.refused.append((recipient, reply))
            else:
                attempt.deferred.append(recipient)
                attempt.reply = reply
        if not accepted:
            _rset(upstream)
            attempt.reply = attempt.reply or (attempt.refused[0][1] if attempt.refused else rcpts[-1])
            return attempt
        if data is None or data.code != 354:
            reply = data or Reply(451, "4.4.2", "DATA not accepted")
            attempt.reply = reply
            _classify(attempt, accepted, reply)
            _rset(upstream)
            return attempt
        # Content streams block by block; the last block leaves with the
        # final dot, in one write.
        tail = b"\r\n"
        last = b""
        for block in content:
            if last:
                upstream.send(last)
            last = block
            tail = (tail + block[-2:])[-2:]
        reply = upstream.end_data(tail == b"\r\n", last)
        attempt.reply = reply
        _classify(attempt, accepted, reply)
    except UpstreamError as exc:
        done = set(attempt.delivered) | set(attempt.deferred) | set(attempt.dead)
        done |= {r for r, _ in attempt.refused}
        attempt.deferred.extend(r for r in recipients if r not in done)
        attempt.reply = exc.reply
        attempt.site_failure = policy.is_site_failure(None)
    except OSError:
        upstream.abort()
        raise
    return attempt


def _classify(attempt: Attempt, recipients: Iterable[str], reply: Reply) -> None:
    fate = policy.recipient_fate(reply)
    if fate == policy.DELIVERED:
        target = attempt.delivered
    else:
        target = attempt.dead if fate == policy.DEAD else attempt.deferred
    target.extend(recipients)


def _rset(upstream: Upstream) -> None:
    if upstream.connected:
        try:
            upstream.rset()
        except UpstreamError:
            pass
