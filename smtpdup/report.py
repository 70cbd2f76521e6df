"""What the operator reads: ``smtpdup report`` and ``smtpdup queue list``.

This module owns turning spool contents into numbers, tables and JSON. It
only reads the spool (``journal_since``, ``messages``, ``dead_letters``) and
never changes it, so it is safe while the relay runs; it prints nothing
itself (``cli.py`` does). Stdlib only.

Counts (per backup destination, within the window):

* delivered — ``delivered`` journal events: one per successful delivery
  transaction of a copy (a copy delivered in two parts counts twice);
* dead — ``dead`` journal events: one per dead-lettering of a copy;
* pending — copies in the spool now, not settled (not windowed: a backlog is
  a backlog however old);
* refused recipients/domains — ``refused`` journal events: a recipient the
  primary accepted and the backup permanently refused, with how often and
  the backup's last reply.
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


@dataclass(frozen=True)
class BackupReport:
    destination: str
    delivered: int
    pending: int
    dead: int
    refused_recipients: list[RefusedRecipient]
    refused_domains: list[tuple[str, int]]  # (domain, count), by count desc

    @property
    def verdict(self) -> str:
        """One line: READY, NOT READY (with why) or NO DATA."""
        problems = []
        if self.refused_recipients:
            n = len(self.refused_recipients)
            problems.append(f"{n} recipient{'s' if n != 1 else ''} refused")
        if self.dead:
            problems.append(f"{self.dead} cop{'ies' if self.dead != 1 else 'y'} dead-lettered")
        if self.pending:
            problems.append(f"{self.pending} cop{'ies' if self.pending != 1 else 'y'} still pending")
        if problems:
            return "NOT READY: " + ", ".join(problems)
        if not self.delivered:
            return "NO DATA: no copy delivered in this window"
        return "READY: backup took everything the primary accepted"


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
    __slots__ = ("delivered", "pending", "dead", "refused")

    def __init__(self) -> None:
        self.delivered = 0
        self.pending = 0
        self.dead = 0
        self.refused: dict[str, list] = {}  # recipient -> [count, last t, last reply]


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

    for event in spool.journal_since(since):
        kind = event.get("event")
        if kind not in ("delivered", "dead", "refused"):
            continue
        t = tally(event.get("destination"))
        if t is None:
            continue
        if kind == "delivered":
            t.delivered += 1
        elif kind == "dead":
            t.dead += 1
        else:
            recipient = event.get("recipient")
            if not isinstance(recipient, str):
                continue
            reply = event.get("reply")
            reply = reply if isinstance(reply, str) else ""
            when = event["t"]
            entry = t.refused.get(recipient)
            if entry is None:
                t.refused[recipient] = [1, when, reply]
            else:
                entry[0] += 1
                if when >= entry[1]:
                    entry[1], entry[2] = when, reply
    for message in spool.messages():
        for copy in message.pending():
            t = tally(copy.destination)
            if t is not None:
                t.pending += 1

    order = list(dict.fromkeys(destinations)) + sorted(set(tallies) - set(destinations))
    reports = []
    for destination in order:
        t = tallies[destination]
        refused = [
            RefusedRecipient(recipient, _domain(recipient), count, reply)
            for recipient, (count, _, reply) in t.refused.items()
        ]
        refused.sort(key=lambda r: (-r.count, r.recipient))
        domains: dict[str, int] = {}
        for r in refused:
            domains[r.domain] = domains.get(r.domain, 0) + r.count
        reports.append(
            BackupReport(
                destination=destination,
                delivered=t.delivered,
                pending=t.pending,
                dead=t.dead,
                refused_recipients=refused,
                refused_domains=sorted(domains.items(), key=lambda item: (-item[1], item[0])),
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
        lines += _table(
            ["delivered", "pending", "dead", "refused recipients"],
            [[r.delivered, r.pending, r.dead, len(r.refused_recipients)]],
        )
        if r.refused_recipients:
            lines.append("")
            lines.append("refused domains:")
            lines += ["  " + line for line in _table(["DOMAIN", "COUNT"], r.refused_domains)]
            lines.append("refused recipients:")
            lines += [
                "  " + line
                for line in _table(
                    ["RECIPIENT", "COUNT", "LAST REPLY"],
                    [
                        [x.recipient, x.count, _clip(x.last_reply, _REPLY_COLUMN_CHARS)]
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
                "dead": r.dead,
                "ready": r.verdict.startswith("READY"),
                "verdict": r.verdict,
                "refused_recipients": [
                    {
                        "recipient": x.recipient,
                        "domain": x.domain,
                        "count": x.count,
                        "last_reply": x.last_reply,
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
