#!/usr/bin/env python3
"""Paced SMTP transactions and their latency percentiles (open loop).

A few worker threads share one schedule: transaction i is due at
``start + i / rate``, worker ``i % workers`` sends it over its own
persistent connection (EHLO once), in lockstep like smtp-source: MAIL, RCPT,
DATA, content, final dot. A transaction's latency is the time from sending
MAIL to reading the reply to the final dot (what the client waits for).
A worker that falls behind starts its next transaction at once and counts
it as ``late``; ``from_schedule_*`` adds that wait to the latency (the view
that does not hide queueing, a.k.a. coordinated omission).

    .venv/bin/python bench/latency.py --port 2525 --rate 200 --seconds 10

prints one JSON object: count, errors, late, p50/p90/p99/max in ms.
``run.py`` imports :func:`measure` to compare the relay with DIRECT at the
same rate.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smtpclient import SmtpConnection, SmtpError, make_content, recipients_for  # noqa: E402

# A worker is "late" when it starts a transaction this much after its due time.
LATE_SECONDS = 0.001
# Bound on the whole measurement beyond its nominal duration.
GRACE_SECONDS = 30.0


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(latencies_s: list[float], from_schedule_s: list[float]) -> dict:
    lat = sorted(latencies_s)
    sched = sorted(from_schedule_s)

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 3)

    return {
        "count": len(lat),
        "p50_ms": ms(percentile(lat, 0.50)),
        "p90_ms": ms(percentile(lat, 0.90)),
        "p99_ms": ms(percentile(lat, 0.99)),
        "max_ms": ms(lat[-1] if lat else None),
        "from_schedule_p50_ms": ms(percentile(sched, 0.50)),
        "from_schedule_p99_ms": ms(percentile(sched, 0.99)),
    }


def measure(
    host: str,
    port: int,
    *,
    rate: float,
    seconds: float,
    workers: int = 8,
    size_bytes: int = 1024,
    recipients: int = 1,
    timeout_seconds: float = 30.0,
) -> dict:
    """Send ``rate`` transactions per second for ``seconds``; returns the
    summary (see the module docstring) plus rate, workers, errors and late."""
    if rate <= 0 or seconds <= 0 or workers < 1:
        raise ValueError("rate, seconds and workers must be positive")
    total = max(1, int(rate * seconds))
    content = make_content(size_bytes, subject="smtpdup latency")
    rcpts = recipients_for(recipients)
    lock = threading.Lock()
    latencies: list[float] = []
    from_schedule: list[float] = []
    counters = {"errors": 0, "late": 0, "first_error": ""}
    connections: list[SmtpConnection | None] = [None] * workers
    # Connect before the clock starts: the schedule measures transactions.
    for k in range(workers):
        conn = SmtpConnection(host, port, timeout_seconds=timeout_seconds)
        conn.ehlo()
        connections[k] = conn
    start = time.perf_counter() + 0.05
    deadline = start + seconds + GRACE_SECONDS

    def worker(k: int) -> None:
        conn = connections[k]
        mine_lat: list[float] = []
        mine_sched: list[float] = []
        errors = late = 0
        first_error = ""
        for i in range(k, total, workers):
            due = start + i / rate
            now = time.perf_counter()
            if now >= deadline:
                break
            if now < due:
                time.sleep(due - now)
            elif now - due > LATE_SECONDS:
                late += 1
            began = time.perf_counter()
            try:
                if conn is None:
                    conn = SmtpConnection(host, port, timeout_seconds=timeout_seconds)
                    conn.ehlo()
                conn.transaction("latency@example.com", rcpts, content)
            except (OSError, SmtpError) as exc:
                errors += 1
                first_error = first_error or str(exc)
                if conn is not None:
                    conn.close()
                conn = None
                continue
            done = time.perf_counter()
            mine_lat.append(done - began)
            mine_sched.append(done - due)
        if conn is not None:
            conn.quit()
        with lock:
            latencies.extend(mine_lat)
            from_schedule.extend(mine_sched)
            counters["errors"] += errors
            counters["late"] += late
            counters["first_error"] = counters["first_error"] or first_error

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline + 5.0 - time.perf_counter()))
    elapsed = time.perf_counter() - start
    result = summarize(latencies, from_schedule)
    result.update({
        "rate_per_s": rate,
        "achieved_per_s": round(len(latencies) / elapsed, 1) if elapsed > 0 else None,
        "seconds": round(elapsed, 3),
        "workers": workers,
        "size_bytes": size_bytes,
        "recipients": recipients,
        "errors": counters["errors"],
        "late": counters["late"],
    })
    if counters["first_error"]:
        result["first_error"] = counters["first_error"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="transactions per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=8, help="connections / threads (default: 8)")
    parser.add_argument("--size", type=int, default=1024, help="body bytes (default: 1024)")
    parser.add_argument("--recipients", type=int, default=1)
    args = parser.parse_args(argv)
    result = measure(args.host, args.port, rate=args.rate, seconds=args.seconds, workers=args.workers,
                     size_bytes=args.size, recipients=args.recipients)
    print(json.dumps(result, indent=2))
    return 0 if result["count"] else 1


if __name__ == "__main__":
    sys.exit(main())
