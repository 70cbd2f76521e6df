"""The extras of the benchmark, each on a relay of its own: latency at half
the relay's peak rate, idle connections, one big message, a backlog for a
stopped backup, and the profile (py-spy) of one case."""

from __future__ import annotations

import os
import platform
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import latency as paced
import profile_summary
from probes import KIB, LOCALHOST, MIB, RECIPIENT, SENDER, BenchError, free_port, progress
from report import TARGET_CASE, git_commit, label, medians
from runner import SETTLE_SECONDS, WARMUP_MESSAGES, Bench, case_named, measure, wait_for_sinks
from smtpclient import SmtpConnection, SmtpError
from systems import Sink


def latency(bench: Bench, peak_rate: float | None) -> dict:
    args = bench.args
    relay = bench.relay("latency")
    try:
        if not peak_rate:
            progress("latency: calibrating the relay's peak rate (one 1k-1rcpt-reuse run)")
            case = case_named(TARGET_CASE)
            peak_rate = measure(relay, bench.tools, case, args.messages, args.sessions)["e2e_msg_per_s"]
        else:  # discarded: a fresh relay, cold caches, first connections
            case = case_named(TARGET_CASE)
            measure(relay, bench.tools, case, min(WARMUP_MESSAGES, args.messages), args.sessions)
        rate = max(1.0, round(peak_rate / 2, 1))
        direct = bench.sink("direct")
        out: dict = {"peak_rate_per_s": peak_rate, "rate_per_s": rate, "seconds": args.latency_seconds,
                     "workers": args.latency_workers, "size_bytes": KIB, "recipients": 1,
                     "direct": {"runs": []}, "relay": {"runs": []}}
        for run in range(args.runs):
            order = [("direct", direct.port), ("relay", relay.port)]
            if run % 2:
                order.reverse()
            for name, port in order:
                try:
                    result = paced.measure(LOCALHOST, port, rate=rate, seconds=args.latency_seconds,
                                             workers=args.latency_workers, size_bytes=KIB, recipients=1)
                except (OSError, SmtpError, ValueError) as exc:
                    result = {"error": str(exc)}
                out[name]["runs"].append(result)
                progress(f"latency run {run + 1}/{args.runs} {label(name):7s} at {rate} msg/s: "
                         f"p50 {result.get('p50_ms')} ms, p99 {result.get('p99_ms')} ms, "
                         f"errors {result.get('errors', result.get('error'))}")
                time.sleep(SETTLE_SECONDS)
        for name in ("direct", "relay"):
            ok = [r for r in out[name]["runs"] if r.get("count")]
            out[name]["median"] = {
                key: round(statistics.median([r[key] for r in ok if r.get(key) is not None]), 3)
                for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "from_schedule_p99_ms") if ok
            }
        dm, rm = out["direct"]["median"], out["relay"]["median"]
        if "p50_ms" in dm and "p50_ms" in rm:
            out["added_p50_ms"] = round(rm["p50_ms"] - dm["p50_ms"], 3)
            out["added_p99_ms"] = round(rm["p99_ms"] - dm["p99_ms"], 3)
        return out
    finally:
        relay.stop()

def idle(bench: Bench) -> dict:
    args = bench.args
    count = args.idle_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = count + 1024
    if soft < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
        except (ValueError, OSError):
            pass
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < needed:
        count = max(0, soft - 1024)
        progress(f"idle: RLIMIT_NOFILE is {soft}: holding {count} connections instead of {args.idle_connections}")
    relay = bench.relay("idle", extra_env={"SMTP_DUP_SMTP_MAX_CONNECTIONS": str(max(20000, count * 2))})
    case = case_named(TARGET_CASE)
    held: list[socket.socket] = []
    out: dict = {"connections": count, "without_idle": {"runs": []}, "with_idle": {"runs": []}}
    try:
        measure(relay, bench.tools, case, min(WARMUP_MESSAGES, args.messages), args.sessions)  # discarded
        for phase in ("without_idle", "with_idle"):
            if phase == "with_idle":
                time.sleep(1.0)
                rss_before = relay.rss_kib()
                started = time.perf_counter()
                held = open_idle(relay.port, count)
                out["open_seconds"] = round(time.perf_counter() - started, 2)
                time.sleep(1.0)  # the relay's sessions settle in recv()
                rss_after = relay.rss_kib()
                out["rss_before_kib"], out["rss_after_kib"] = rss_before, rss_after
                if rss_before and rss_after and count:
                    out["rss_per_connection_kib"] = round((rss_after - rss_before) / count, 2)
                progress(f"idle: {count} connections open in {out['open_seconds']}s, RSS {rss_before} -> "
                         f"{rss_after} KiB ({out.get('rss_per_connection_kib')} KiB each)")
            for run in range(args.runs):
                try:
                    result = measure(relay, bench.tools, case, args.messages, args.sessions)
                except BenchError as exc:
                    result = {"error": str(exc)}
                out[phase]["runs"].append(result)
                progress(f"idle: {phase} run {run + 1}/{args.runs}: e2e {result.get('e2e_msg_per_s')} msg/s")
                time.sleep(SETTLE_SECONDS)
            out[phase]["median"] = medians(out[phase]["runs"])
        out["rss_with_load_kib"] = relay.rss_kib()
        without = out["without_idle"]["median"].get("e2e_msg_per_s")
        with_ = out["with_idle"]["median"].get("e2e_msg_per_s")
        if without and with_:
            out["throughput_ratio"] = round(with_ / without, 4)
        alive = sum(1 for s in held if still_open(s))
        out["still_open_after_load"] = alive
        return out
    finally:
        for s in held:
            s.close()
        relay.stop()

def big_message(bench: Bench) -> dict:
    args = bench.args
    size = args.big_message_mib * MIB
    relay = bench.relay("big", extra_env={"SMTP_DUP_SMTP_MAX_MESSAGE_BYTES": str(size * 2 + MIB)})
    try:
        sinks = relay.sinks
        before = [s.count() for s in sinks]
        conn = SmtpConnection(LOCALHOST, relay.port, timeout_seconds=120.0)
        conn.ehlo()
        conn.transaction(SENDER, [RECIPIENT], b"Subject: warm-up\r\n\r\nwarm-up\r\n")  # paths warm
        wait_for_sinks(sinks, before, 1)
        time.sleep(1.0)
        reset = relay.reset_peak_rss()
        rss_before = relay.rss_kib()
        hwm_before = relay.peak_rss_kib()
        line = b"z" * 78 + b"\r\n"
        block = line * (MIB // len(line))
        blocks = max(1, round(size / len(block)))
        before = [s.count() for s in sinks]
        started = time.perf_counter()
        conn.send_large(SENDER, [RECIPIENT], block, blocks)
        client_seconds = time.perf_counter() - started
        conn.quit()
        wait_for_sinks(sinks, before, 1)
        e2e_seconds = time.perf_counter() - started
        hwm_after = relay.peak_rss_kib()
        out = {
            "content_bytes": len(block) * blocks,
            "client_seconds": round(client_seconds, 2),
            "e2e_seconds": round(e2e_seconds, 2),
            "rss_before_kib": rss_before,
            "peak_rss_before_kib": hwm_before,
            "peak_rss_after_kib": hwm_after,
            "peak_reset": reset,
            "rss_after_kib": relay.rss_kib(),
        }
        if rss_before and hwm_after:
            base = rss_before if reset else hwm_before or rss_before
            out["rss_growth_kib"] = max(0, hwm_after - base)
        progress(f"big message: {out['content_bytes'] / MIB:.0f} MiB in {client_seconds:.1f}s (client), "
                 f"{e2e_seconds:.1f}s (every copy); peak RSS growth {out.get('rss_growth_kib')} KiB")
        return out
    finally:
        relay.stop()

def backlog(bench: Bench) -> dict:
    args = bench.args
    copies = args.backlog_copies
    backup_port = free_port()  # nothing listens here until the drain
    relay = bench.relay("backlog", backups=0, backup_ports=[backup_port], extra_env={
        "SMTP_DUP_RELAY_RETRY_INITIAL_SECONDS": "86400",
        "SMTP_DUP_RELAY_RETRY_MAX_INTERVAL_SECONDS": "86400",
    })
    backup: Sink | None = None
    try:
        case = case_named(TARGET_CASE)
        warmup = min(100, copies)
        measure(relay, bench.tools, case, warmup, args.sessions)  # counts at the primary only
        wait_for_spool(relay.spool_dir, warmup)
        time.sleep(1.0)
        reset = relay.reset_peak_rss()
        rss_before = relay.rss_kib()
        started = time.perf_counter()
        run = measure(relay, bench.tools, case, copies, args.sessions)
        pending = wait_for_spool(relay.spool_dir, warmup + copies)
        time.sleep(1.0)
        rss_after, hwm_after = relay.rss_kib(), relay.peak_rss_kib()
        out: dict = {
            "copies": copies,
            "pending": pending,
            "fill_seconds": round(time.perf_counter() - started, 2),
            "fill_client_msg_per_s": run["client_msg_per_s"],
            "rss_before_kib": rss_before,
            "rss_after_kib": rss_after,
            "peak_rss_after_kib": hwm_after,
            "peak_reset": reset,
        }
        if rss_before and rss_after:
            out["rss_growth_kib"] = rss_after - rss_before
            out["peak_rss_growth_kib"] = (hwm_after or rss_after) - rss_before
        progress(f"backlog: {pending} copies pending, RSS {rss_before} -> {rss_after} KiB "
                 f"(peak {hwm_after}); draining")
        backup = Sink(bench.procs, bench.workdir, "backlog-backup", bench.tools, port=backup_port).start()
        relay.reset_peak_rss()
        rss_drain = relay.rss_kib()
        started = time.perf_counter()
        flush = subprocess.run([sys.executable, "-m", "smtpdup", "queue", "flush"], env=relay.env,
                               cwd=relay.dir, capture_output=True, text=True, timeout=120)
        if flush.returncode != 0:
            raise BenchError(f"smtpdup queue flush failed: {flush.stderr.strip()[-300:]}")
        wait_for_sinks([backup], [0], pending)
        drain_seconds = time.perf_counter() - started
        hwm_drain = relay.peak_rss_kib()
        out.update({
            "drain_seconds": round(drain_seconds, 2),
            "drain_copies_per_s": round(pending / drain_seconds, 1),
            "drain_peak_rss_growth_kib": (hwm_drain - rss_drain) if hwm_drain and rss_drain else None,
        })
        progress(f"backlog: drained {pending} copies in {drain_seconds:.1f}s "
                 f"({out['drain_copies_per_s']} copies/s, flush poll included)")
        return out
    finally:
        relay.stop()
        if backup is not None:
            backup.stop()

def profile(bench: Bench) -> dict:
    args = bench.args
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.access(py_spy, os.X_OK):
        raise BenchError("py-spy not found: .venv/bin/pip install py-spy")
    case = case_named(args.profile_case)
    relay = bench.relay(f"profile-{case.name}", backups=case.backups)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    messages = args.messages
    try:
        warm = measure(relay, bench.tools, case, messages, args.sessions)
        progress(f"profile: warm-up run {warm['e2e_msg_per_s']} msg/s e2e, {warm.get('cpu_us_per_msg')} µs/msg")
        runs = {}
        for fmt, path in (("raw", out_dir / "profile-relay.folded"), ("flamegraph", out_dir / "profile-relay.svg")):
            spy = bench.procs.start("py-spy", [py_spy, "record", "--pid", str(relay.pid), "--subprocesses", "--rate",
                                              str(args.profile_rate), "--nonblocking", "--format", fmt,
                                              "-o", str(path)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)  # attached
            runs[fmt] = measure(relay, bench.tools, case, messages, args.sessions)
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                pass
            bench.procs.stop(spy)
            progress(f"profile ({fmt}): {runs[fmt]['e2e_msg_per_s']} msg/s e2e under py-spy -> {path}")
        text = profile_summary.summarize(str(out_dir / "profile-relay.folded"))
        header = (f"# py-spy profile of the relay: case {case.name}, {messages} messages, "
                  f"{args.sessions} sessions, rate {args.profile_rate} Hz, --nonblocking\n"
                  f"# without the profiler: {warm['e2e_msg_per_s']} msg/s e2e, "
                  f"{warm.get('cpu_us_per_msg')} µs CPU/msg; under it: {runs['raw']['e2e_msg_per_s']} msg/s\n"
                  f"# commit {git_commit()}, {os.cpu_count()} CPUs, {platform.python_version()}\n\n")
        (out_dir / "profile-relay.txt").write_text(header + text)
        return {"case": case.name, "warm": warm, "runs": runs}
    finally:
        relay.stop()


def wait_for_spool(spool_dir: Path, copies: int, timeout: float = 300.0) -> int:
    """Until ``copies`` messages sit in the spool; returns how many. (Not
    every copy is attempted: after the first failure the backup is backed
    off as a whole, and the others wait in the index without an attempt.)"""
    msg = spool_dir / "msg"
    deadline = time.monotonic() + timeout
    while True:
        names = [e.name for e in os.scandir(msg)] if msg.exists() else []
        messages = sum(1 for n in names if not n.endswith(".state"))
        if messages >= copies:
            return messages
        if time.monotonic() > deadline:
            raise BenchError(f"spool: {messages} messages, expected {copies}")
        time.sleep(0.2)


def open_idle(port: int, count: int, batch: int = 50, timeout: float = 120.0) -> list[socket.socket]:
    """Open ``count`` connections and read each one's greeting; in batches
    so that the relay's listen backlog never overflows (a dropped SYN costs
    a second)."""
    held: list[socket.socket] = []
    deadline = time.monotonic() + timeout
    try:
        while len(held) < count:
            group = []
            for _ in range(min(batch, count - len(held))):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                s.connect_ex((LOCALHOST, port))
                group.append(s)
            held.extend(group)
            with selectors.DefaultSelector() as sel:
                for s in group:
                    sel.register(s, selectors.EVENT_READ)
                waiting = len(group)
                while waiting:
                    if time.monotonic() > deadline:
                        raise BenchError(f"idle: only {len(held) - waiting} of {count} connections greeted")
                    for key, _ in sel.select(timeout=1.0):
                        sock = key.fileobj
                        try:
                            data = sock.recv(512)  # type: ignore[union-attr]
                        except BlockingIOError:
                            continue
                        if not data.startswith(b"220"):
                            raise BenchError(f"idle: connection {len(held) - waiting} got {data[:80]!r}")
                        sel.unregister(sock)
                        waiting -= 1
    except BaseException:
        for s in held:
            s.close()
        raise
    return held


def still_open(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
