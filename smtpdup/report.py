"""What the operator reads: ``smtpdup report`` and ``smtpdup queue list``.

This module owns turning spool contents into numbers, tables and JSON. It
only reads the spool (``journal_since``, ``messages``, ``dead_letters``) and
never changes it, so it is safe while the relay runs; it prints nothing
itself (``cli.py`` does). Stdlib only.

Counts (per backup destination):

* delivered — ``delivered`` journal events within the window: one per
  successful delivery transaction of a copy (a copy delivered in two parts
  counts twice);
* pending — copies in the spool now, not settled, and of those ``retrying``:
  the copies that failed an attempt and wait for the next (not windowed: a
  backlog is a backlog however old);
* dead — dead letters in the spool now (not windowed: a dead copy counts
  until ``queue requeue`` or ``queue delete`` takes it away);
* refused recipients/domains — ``refused`` journal events within the window:
  a recipient the primary accepted and the backup permanently refused, with
  how often and the backup's last reply. One that the backup took later (a
  ``delivered`` event for it after its last refusal: the mailbox was made
  and the copy requeued) is listed as resolved and does not count.

Verdict: NOT READY while a backup has unresolved refused recipients, dead
letters or retrying copies; a copy on its first attempt does not count.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, Sequence

from smtpdup.spool import Spool, copy_id, queue_id_time

__all__ = [
    "BackupReport",
    "RefusedRecipient",
    "build_report",
    "format_queue",
    "format_text",
    "parse_duration",
    "queue_entries",
    "to_json",
]

_DURATION_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([mhd])\s*", re.IGNORECASE)
_UNIT_SECONDS = {"m": 60.0, "h": 3600.0, "d": 86400.0}

# Longest reply shown in a text table cell; JSON carries it whole.
_REPLY_COLUMN_CHARS = 60


@dataclass(frozen=True)
class RefusedRecipient:
    recipient: str
    domain: str
    count: int
    last_reply: str
    resolved: bool = False  # delivered by the backup after its last refusal


@dataclass(frozen=True)
class BackupReport:
    destination: str
    delivered: int
    pending: int
    dead: int
    refused_recipients: list[RefusedRecipient]
    refused_domains: list[tuple[str, int]]  # unresolved (domain, count), by count desc
    retrying: int = 0  # pending copies that failed an attempt and wait

    @property
    def unresolved(self) -> list[RefusedRecipient]:
        return [r for r in self.refused_recipients if not r.resolved]

    @property
    def verdict(self) -> str:
        """One line: READY, NOT READY (with why) or NO DATA."""
        problems = []
        unresolved = self.unresolved
        if unresolved:
            n = len(unresolved)
            problems.append(f"{n} recipient{'s' if n != 1 else ''} refused")
        if self.dead:
            problems.append(f"{self.dead} cop{'ies' if self.dead != 1 else 'y'} dead-lettered")
        if self.retrying:
            problems.append(
                f"{self.retrying} cop{'ies' if self.retrying != 1 else 'y'} failed an attempt and wait for a retry"
            )
        if problems:
            return "NOT READY: " + ", ".join(problems)
        if not self.delivered:
            return "NO DATA: no copy delivered in this window"
        return "READY: backup took everything the primary accepted"

    @property
    def ready(self) -> bool:
        return self.verdict.startswith("READY")

    @property
    def not_ready(self) -> bool:
        return self.verdict.startswith("NOT READY")


def parse_duration(text: str) -> float:
    """Seconds in "30m", "24h", "7d" (also "1.5h"); ValueError otherwise."""
    match = _DURATION_RE.fullmatch(text)
    if not match:
        raise ValueError(
            f"invalid duration {text!r}: expected a number followed by m, h or d (e.g. 30m, 24h, 7d)"
        )
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: must be more than zero")
    return seconds


def _domain(recipient: str) -> str:
    _, at, domain = recipient.rpartition("@")
    return domain.lower() if at else ""


class _Tally:
    __slots__ = ("delivered", "pending", "retrying", "dead", "refused", "delivered_at")

    def __init__(self) -> None:
        self.delivered = 0
        self.pending = 0
        self.retrying = 0
        self.dead = 0
        self.refused: dict[str, list] = {}  # recipient -> [count, last t, last reply]
        self.delivered_at: dict[str, float] = {}  # recipient -> last delivery


def build_report(spool: Spool, since: float, destinations: Sequence[str] = ()) -> list[BackupReport]:
    """Per-backup counts since ``since`` (epoch seconds), in the order of
    ``destinations`` (configured backups, shown even with zero counts)
    followed by any other destination seen, alphabetically."""
    tallies: dict[str, _Tally] = {d: _Tally() for d in destinations}

    def tally(destination: object) -> _Tally | None:
        if not isinstance(destination, str):
            return None
        found = tallies.get(destination)
        if found is None:
            found = tallies[destination] = _Tally()
        return found

    # Copy id -> recipients journalled as delivered: the relay may not have
    # written a delivered copy's state yet while sibling copies are under way.
    delivered_copies: dict[object, set[str]] = {}
    for event in spool.journal_since(since):
        kind = event.get("event")
        if kind not in ("delivered", "refused"):
            continue
        t = tally(event.get("destination"))
        if t is None:
            continue
        when = event["t"]
        if kind == "delivered":
            t.delivered += 1
            recipients = event.get("recipients")
            if isinstance(recipients, list):
                done = delivered_copies.setdefault(event.get("id"), set())
                for recipient in recipients:
                    if isinstance(recipient, str):
                        done.add(recipient)
                        if when >= t.delivered_at.get(recipient, when):
                            t.delivered_at[recipient] = when
        else:
            recipient = event.get("recipient")
            if not isinstance(recipient, str):
                continue
            reply = event.get("reply")
            reply = reply if isinstance(reply, str) else ""
            entry = t.refused.get(recipient)
            if entry is None:
                t.refused[recipient] = [1, when, reply]
            else:
                entry[0] += 1
                if when >= entry[1]:
                    entry[1], entry[2] = when, reply
    for message in spool.messages():
        for copy in message.pending():
            if copy.attempts and set(copy.recipients) <= delivered_copies.get(
                copy_id(message.queue_id, copy.index), set()
            ):
                continue  # delivered; its state is written with its siblings'
            t = tally(copy.destination)
            if t is not None:
                t.pending += 1
                if copy.attempts:
                    t.retrying += 1
    for letter in spool.dead_letters():
        t = tally(letter.destination)
        if t is not None:
            t.dead += 1

    order = list(dict.fromkeys(destinations)) + sorted(set(tallies) - set(destinations))
    reports = []
    for destination in order:
        t = tallies[destination]
        refused = [
            RefusedRecipient(recipient, _domain(recipient), count, reply,
                             resolved=t.delivered_at.get(recipient, -1.0) > last)
            for recipient, (count, last, reply) in t.refused.items()
        ]
        refused.sort(key=lambda r: (r.resolved, -r.count, r.recipient))
        domains: dict[str, int] = {}
        for r in refused:
            if not r.resolved:
                domains[r.domain] = domains.get(r.domain, 0) + r.count
        reports.append(
            BackupReport(
                destination=destination,
                delivered=t.delivered,
                pending=t.pending,
                dead=t.dead,
                refused_recipients=refused,
                refused_domains=sorted(domains.items(), key=lambda item: (-item[1], item[0])),
                retrying=t.retrying,
            )
        )
    return reports


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    cells = [list(headers)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())  # multi-line replies on one line
    return text if len(text) <= width else text[: width - 3] + "..."


def format_text(reports: Sequence[BackupReport], since_text: str) -> str:
    """Readable report: one section per backup, then one verdict line each."""
    lines = [f"Backup report for the last {since_text}", ""]
    if not reports:
        lines += ["no backup destinations configured or seen", ""]
    for r in reports:
        lines.append(f"== {r.destination}")
        resolved = len(r.refused_recipients) - len(r.unresolved)
        lines += _table(
            ["delivered", "pending", "retrying", "dead", "refused recipients", "resolved"],
            [[r.delivered, r.pending, r.retrying, r.dead, len(r.unresolved), resolved]],
        )
        if r.refused_recipients:
            lines.append("")
            if r.refused_domains:
                lines.append("refused domains:")
                lines += ["  " + line for line in _table(["DOMAIN", "COUNT"], r.refused_domains)]
            lines.append("refused recipients:")
            lines += [
                "  " + line
                for line in _table(
                    ["RECIPIENT", "STATUS", "COUNT", "LAST REPLY"],
                    [
                        [x.recipient, "resolved" if x.resolved else "refused", x.count,
                         _clip(x.last_reply, _REPLY_COLUMN_CHARS)]
                        for x in r.refused_recipients
                    ],
                )
            ]
        else:
            lines.append("no refused recipients")
        lines.append("")
    lines.append("Verdict:")
    for r in reports:
        lines.append(f"  {r.destination}: {r.verdict}")
    return "\n".join(lines) + "\n"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def to_json(reports: Sequence[BackupReport], since: float) -> dict:
    """The ``report --json`` object: ``{"since": ISO 8601 UTC, "backups": [...]}``."""
    return {
        "since": _iso(since),
        "backups": [
            {
                "destination": r.destination,
                "delivered": r.delivered,
                "pending": r.pending,
                "retrying": r.retrying,
                "dead": r.dead,
                "ready": r.ready,
                "verdict": r.verdict,
                "refused_recipients": [
                    {
                        "recipient": x.recipient,
                        "domain": x.domain,
                        "count": x.count,
                        "last_reply": x.last_reply,
                        "resolved": x.resolved,
                    }
                    for x in r.refused_recipients
                ],
                "refused_domains": [{"domain": d, "count": n} for d, n in r.refused_domains],
            }
            for r in reports
        ],
    }


# --- queue list ----------------------------------------------------------------


def queue_entries(spool: Spool, now: float | None = None) -> list[dict]:
    """One entry per pending copy and per dead letter, sorted by id::

        {id: "<qid>.<index>", queue_id, age_seconds, sender, recipients,
         destination, state: "pending"|"dead", attempts, last_reply,
         next_attempt}

    ``recipients`` are those still to deliver (pending) or dead (dead);
    ``next_attempt`` is epoch seconds, None for a dead letter. A copy partly
    dead-lettered and partly pending appears twice with the same id.
    """
    now = time.time() if now is None else now

    def age(envelope_received_at: float, queue_id: str) -> float:
        received = envelope_received_at or queue_id_time(queue_id)
        return max(0.0, now - received)

    entries = []
    for message in spool.messages():
        env = message.envelope
        for copy in message.pending():
            entries.append(
                {
                    "id": copy_id(env.queue_id, copy.index),
                    "queue_id": env.queue_id,
                    "age_seconds": age(env.received_at, env.queue_id),
                    "sender": env.sender,
                    "recipients": list(copy.recipients),
                    "destination": copy.destination,
                    "state": "pending",
                    "attempts": copy.attempts,
                    "last_reply": copy.last_reply,
                    "next_attempt": copy.next_attempt,
                }
            )
    for letter in spool.dead_letters():
        env = letter.envelope
        entries.append(
            {
                "id": letter.id,
                "queue_id": env.queue_id,
                "age_seconds": age(env.received_at, env.queue_id),
                "sender": env.sender,
                "recipients": list(letter.recipients),
                "destination": letter.destination,
                "state": "dead",
                "attempts": letter.attempts,
                "last_reply": letter.reason,
                "next_attempt": None,
            }
        )
    entries.sort(key=lambda e: (e["queue_id"], int(e["id"].rpartition(".")[2]), e["state"]))
    return entries


def _age_text(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def format_queue(entries: Sequence[dict]) -> str:
    """A compact table of ``queue_entries`` and a summary line "N pending, M dead"."""
    pending = sum(1 for e in entries if e["state"] == "pending")
    dead = len(entries) - pending
    lines = []
    if entries:
        rows = []
        for e in entries:
            recipients = e["recipients"]
            shown = recipients[0] if recipients else "-"
            if len(recipients) > 1:
                shown += f" (+{len(recipients) - 1})"
            rows.append(
                [
                    e["id"],
                    _age_text(e["age_seconds"]),
                    e["state"],
                    e["attempts"],
                    e["destination"],
                    e["sender"] or "<>",
                    shown,
                    _clip(e["last_reply"], _REPLY_COLUMN_CHARS) or "-",
                ]
            )
        lines += _table(
            ["ID", "AGE", "STATE", "ATTEMPTS", "DESTINATION", "SENDER", "RECIPIENTS", "LAST REPLY"],
            rows,
        )
    lines.append(f"{pending} pending, {dead} dead")
    return "\n".join(lines) + "\n"


# --- queue show ----------------------------------------------------------------------------


def lineage(entry_id: str, events: Iterable[dict]) -> list[str]:
    """``entry_id`` and the copies it was requeued from (newest first), from
    the "requeued" journal events among ``events``."""
    previous = {e.get("new_id"): e.get("id") for e in events if e.get("event") == "requeued"}
    chain = [entry_id]
    while len(chain) < 100:
        before = previous.get(chain[-1])
        if not isinstance(before, str) or before in chain:
            break
        chain.append(before)
    return chain


def _event_text(event: dict) -> list[str]:
    kind = str(event.get("event", "?"))
    who = event.get("recipients")
    if isinstance(event.get("recipient"), str):
        who = [event["recipient"]]
    recipients = ", ".join(r for r in who if isinstance(r, str)) if isinstance(who, list) else ""
    detail = event.get("reply")
    if kind == "requeued":
        detail = f"as {event.get('new_id')}"
    return [_iso(float(event["t"])), str(event.get("id", "")), kind, recipients or "-",
            " ".join(str(detail).split()) if detail else "-"]


def format_show(entry, events: Sequence[dict], now: float | None = None) -> str:
    """``queue show``: one copy (an ``Entry``) with its envelope, state and
    the journal ``events`` of it and of the copies it was requeued from.
    The caller prints the message's header section (or all of it) after."""
    now = time.time() if now is None else now
    env = entry.envelope
    origin = entry.origin
    rows = [
        ("id", entry.id),
        ("state", entry.state),
        ("destination", entry.destination),
        ("sender", env.sender or "<>"),
        ("recipients", ", ".join(entry.recipients) or "-"),
        ("received", f"{_iso(env.received_at)} ({_age_text(now - env.received_at)} ago) from {env.client}"),
    ]
    if origin.get("requeued_from"):
        first = origin.get("first_received_at")
        first_text = f", first received {_iso(float(first))}" if isinstance(first, (int, float)) else ""
        rows.append(("requeued from", f"{origin['requeued_from']}{first_text}"))
    rows.append(("attempts", str(entry.attempts)))
    if entry.state == "pending":
        due = entry.next_attempt or 0.0
        rows.append(("next attempt", "now" if due <= now else _iso(due)))
        rows.append(("last reply", " ".join(entry.last_reply.split()) or "-"))
    else:
        rows.append(("dead because", " ".join(entry.last_reply.split()) or "-"))
    parameters = (["SMTPUTF8"] if env.smtputf8 else []) + ([f"BODY={env.body}"] if env.body else [])
    if parameters:
        rows.append(("parameters", " ".join(parameters)))
    width = max(len(k) for k, _ in rows) + 1
    lines = [f"{k + ':':<{width}} {v}" for k, v in rows]
    lines.append("")
    lines.append("history:")
    if events:
        lines += ["  " + line for line in _table(["TIME", "COPY", "EVENT", "RECIPIENTS", "REPLY"],
                                                   [_event_text(e) for e in events])]
    else:
        lines.append("  (no attempt journalled yet)")
    return "\n".join(lines) + "\n"
