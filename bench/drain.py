"""Drain after an outage (issue 8): a backlog of N copies in the spool, then
a relay started with both backups up.

The backlog (N/2 messages, one copy per backup each) is written straight
through ``smtpdup.spool`` by ``spool_fill.py`` (``--drain-fill spool``, the
default; seconds), or sent through the relay while nothing listens on the
backups' ports (``--drain-fill smtp``; the relay is then stopped and
``smtpdup queue flush`` makes every copy due). Then two fresh smtp-sinks
listen on the backups' ports and the relay starts on that spool. Measured
from the relay's start: when SMTP answers, each backup's first delivery,
when each backup has all its copies (drain rate overall and per backup), how
far the other backup was when the first finished (fairness), and when the
spool gauge (``smtpdup_spool_copies{state="pending"}`` on /metrics) reads
0; then ``smtpdup queue list --json`` counts what is still pending.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from probes import CLOCK_TICKS, KIB, LOCALHOST, BenchError, free_port, progress, wait_for_greeting
from runner import Bench, case_named, measure, wait_for_sinks
from report import TARGET_CASE
from smtpclient import SmtpError
from systems import Relay, Sink

BENCH_DIR = Path(__file__).resolve().parent
FILL_TIMEOUT_SECONDS = 900.0
DRAIN_NO_PROGRESS_SECONDS = 60.0
SPOOL_EMPTY_TIMEOUT_SECONDS = 30.0  # after every copy arrived
QUEUE_LIST_TIMEOUT_SECONDS = 300.0
SAMPLE_SECONDS = 1.0  # the timeline of per-backup counts
API_MISMATCH = 3  # spool_fill.py's exit status


def drain(bench: Bench) -> dict:
    out: dict = {"fill": bench.args.drain_fill, "runs": []}
    for copies in bench.args.drain_copies:
        try:
            run = drain_once(bench, copies)
        except (BenchError, OSError, SmtpError, subprocess.TimeoutExpired) as exc:
            progress(f"drain {copies}: FAILED: {exc}")
            run = {"copies": copies, "error": str(exc)}
        out["runs"].append(run)
        if run.get("fill"):
            out["fill"] = run["fill"]
    return out


def _fill_spool(relay: Relay, messages: int) -> bool:
    """spool_fill.py into the relay's spool; False if its spool API differs."""
    done = subprocess.run(
        [sys.executable, str(BENCH_DIR / "spool_fill.py"), "--spool", str(relay.spool_dir), "--messages",
         str(messages), "--size", str(KIB), *[w for name in relay.backup_names for w in ("--backup", name)]],
        env=relay.env, cwd=relay.dir, capture_output=True, text=True, timeout=FILL_TIMEOUT_SECONDS)
    if done.returncode == API_MISMATCH:
        progress(f"drain: {done.stderr.strip()}; filling through the relay instead")
        return False
    if done.returncode != 0:
        raise BenchError(f"spool_fill.py failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    return True


def _fill_smtp(bench: Bench, relay: Relay, messages: int) -> None:
    """Through the relay with nothing on the backups' ports; then stopped,
    and every copy made due (``queue flush``)."""
    relay.start()
    try:
        measure(relay, bench.tools, case_named(TARGET_CASE), messages, bench.args.sessions)  # counts the primary
    finally:
        relay.stop()
    flush = relay.smtpdup("queue", "flush")
    if flush.returncode != 0:
        raise BenchError(f"smtpdup queue flush failed: {flush.stderr.strip()[-300:]}")


def pending_gauge(port: int) -> float | None:
    """``smtpdup_spool_copies{state="pending"}`` from the relay's /metrics."""
    try:
        with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith('smtpdup_spool_copies{state="pending"}'):
            return float(line.rsplit(" ", 1)[1])
    return None


def queue_pending(relay: Relay) -> int | None:
    """Copies ``smtpdup queue list --json`` lists as pending."""
    done = relay.smtpdup("queue", "list", "--json", timeout=QUEUE_LIST_TIMEOUT_SECONDS)
    if done.returncode != 0:
        progress(f"drain: queue list failed: {done.stderr.strip()[-200:]}")
        return None
    return sum(1 for entry in json.loads(done.stdout or "[]") if entry.get("state") == "pending")


def drain_once(bench: Bench, copies: int) -> dict:
    messages = max(1, copies // 2)
    copies = messages * 2
    ports = [free_port(), free_port()]  # nothing listens here until the drain
    metrics_port = free_port()
    bench.relay_count += 1
    relay = Relay(bench.procs, bench.workdir, f"{bench.relay_count}-drain-{copies}", bench.sink("relay-primary"), [],
                  backup_ports=ports, extra_env={
                      "SMTP_DUP_METRICS_LISTEN": f"{LOCALHOST}:{metrics_port}",
                      "SMTP_DUP_RELAY_RETRY_INITIAL_SECONDS": "86400",
                      "SMTP_DUP_RELAY_RETRY_MAX_INTERVAL_SECONDS": "86400",
                  })
    backups: list[Sink] = []
    out: dict = {"copies": copies, "messages": messages, "backups": 2}
    try:
        started = time.perf_counter()
        fill = bench.args.drain_fill
        if fill == "spool" and not _fill_spool(relay, messages):
            fill = "smtp"
        if fill == "smtp":
            _fill_smtp(bench, relay, messages)
        out["fill"] = fill
        out["fill_seconds"] = round(time.perf_counter() - started, 2)
        progress(f"drain {copies}: {messages} messages spooled ({fill}) in {out['fill_seconds']}s; "
                 "starting the backups and the relay")
        backups = [Sink(bench.procs, bench.workdir, f"drain{copies}-backup{i}", bench.tools, port=port).start()
                   for i, port in enumerate(ports, 1)]

        ready: dict[str, float | str] = {}
        t0 = time.perf_counter()
        relay.launch()

        def greet() -> None:
            try:
                wait_for_greeting(relay.port, relay.proc, "relay", timeout=DRAIN_NO_PROGRESS_SECONDS, interval=0.01)
                ready["seconds"] = time.perf_counter() - t0
            except BenchError as exc:
                ready["error"] = str(exc)

        greeter = threading.Thread(target=greet, daemon=True)
        greeter.start()
        first: list[float | None] = [None, None]
        finished: list[float | None] = [None, None]
        fairness: list[float] = []
        timeline: list[list] = []
        next_sample = [0.0]

        def on_poll(counts: list[int]) -> None:
            now = time.perf_counter() - t0
            for i, count in enumerate(counts):
                if count > 0 and first[i] is None:
                    first[i] = now
                if count >= messages and finished[i] is None:
                    finished[i] = now
                    other = counts[1 - i]
                    if not fairness:
                        fairness.append(min(1.0, other / messages))
            if now >= next_sample[0]:
                timeline.append([round(now, 2), *counts])
                next_sample[0] = now + SAMPLE_SECONDS

        try:
            counts = wait_for_sinks(backups, [0, 0], messages, no_progress=DRAIN_NO_PROGRESS_SECONDS,
                           deadline=time.monotonic() + max(300.0, copies / 20), on_poll=on_poll)
        except BenchError as exc:
            raise BenchError(f"{exc} (first deliveries at {first}; relay log: {relay.log_tail(2)}"
                             f"{'; try --drain-fill smtp' if fill == 'spool' else ''})") from None
        drained = time.perf_counter() - t0
        timeline.append([round(drained, 2), *counts])
        greeter.join(5.0)
        if "error" in ready:
            raise BenchError(ready["error"])
        cpu = relay.cpu_ticks()
        out.update({
            "smtp_ready_seconds": round(ready["seconds"], 3) if "seconds" in ready else None,
            "first_delivery_seconds": [None if t is None else round(t, 3) for t in first],
            "backup_done_seconds": [None if t is None else round(t, 2) for t in finished],
            "drain_seconds": round(drained, 2),
            "copies_per_s": round(copies / drained, 1),
            "copies_per_s_from_first_delivery": round(copies / max(1e-3, drained - min(first)), 1)
            if None not in first else None,
            "per_backup_copies_per_s": [round(messages / t, 1) if t else None for t in finished],
            "fairness": round(fairness[0], 3) if fairness else None,
            "cpu_us_per_copy": round(cpu / CLOCK_TICKS * 1e6 / copies, 1) if cpu is not None else None,
            "peak_rss_kib": relay.peak_rss_kib(),
            "timeline": timeline,
        })
        progress(f"drain {copies}: SMTP after {out['smtp_ready_seconds']}s, first deliveries "
                 f"{out['first_delivery_seconds']}s, drained in {drained:.1f}s ({out['copies_per_s']} copies/s, "
                 f"per backup {out['per_backup_copies_per_s']}), other backup at {out['fairness']} when the first "
                 f"finished")
        deadline = time.monotonic() + SPOOL_EMPTY_TIMEOUT_SECONDS
        gauge = pending_gauge(metrics_port)
        while gauge != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
            gauge = pending_gauge(metrics_port)
        out["pending_gauge"] = gauge
        out["spool_empty_seconds"] = round(time.perf_counter() - t0, 2) if gauge == 0 else None
        out["pending_after"] = queue_pending(relay)
        progress(f"drain {copies}: pending gauge {gauge} "
                 f"{'at ' + str(out['spool_empty_seconds']) + 's' if gauge == 0 else 'after the wait'}; "
                 f"queue list: {out['pending_after']} pending")
        return out
    finally:
        relay.stop()
        for sink in backups:
            sink.stop()
