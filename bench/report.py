"""Results of a bench run: medians and per-run ratios, the targets, the
Markdown report, and the run's metadata (commit, versions, filesystem)."""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
from pathlib import Path

from probes import KIB, MIB

ROOT = Path(__file__).resolve().parent.parent

METRICS = ("client_msg_per_s", "e2e_msg_per_s", "cpu_us_per_msg", "postfix_cpu_us_per_msg", "peak_rss_kib",
           "client_seconds", "e2e_seconds")

TARGET_CASE = "1k-1rcpt-reuse"
TARGET_NOREUSE_CASE = "1k-1rcpt-noreuse"
TARGET_PRIMARY_ONLY_CASE = "primary-only-1k-1rcpt-reuse"
# Issue 10: these improve at least 1.5x against the baseline.
BEFORE_SECONDARY_CASES = ("1k-10rcpt-reuse", "1k-10rcpt-noreuse", "100k-1rcpt-reuse", "100k-1rcpt-noreuse")
FRONT_CASE = "postfix-front"

LABEL = {"direct": "DIRECT", "postfix": "POSTFIX", "relay": "RELAY", "before": "BEFORE", "floor": "FLOOR", "floor-nodisk": "FLOOR-NODISK",
         "postfix-sink": "POSTFIX→sink", "front-relay": "POSTFIX→RELAY", "front-before": "POSTFIX→BEFORE"}


def label(name: str) -> str:
    """How a system is named in the report."""
    if name in LABEL:
        return LABEL[name]
    if name.startswith("front-relay-w"):
        return f"POSTFIX→RELAY, smtp.workers {name.rsplit('w', 1)[1]}"
    return name.upper()


def medians(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    out: dict = {"runs_ok": len(ok), "runs_failed": len(runs) - len(ok)}
    for key in METRICS:
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            out[key] = round(statistics.median(values), 1)
    return out


def run_ratios(systems: dict[str, dict], a: str, b: str, key: str) -> dict:
    """Per-run ratio a/b of ``key`` (same run index), and their median."""
    if a not in systems or b not in systems:
        return {}
    per_run = []
    for ra, rb in zip(systems[a]["runs"], systems[b]["runs"]):
        if "error" in ra or "error" in rb or not rb.get(key) or ra.get(key) is None:
            continue
        per_run.append(round(ra[key] / rb[key], 4))
    return {"runs": per_run, "median": round(statistics.median(per_run), 4) if per_run else None}


def find_case(results: dict, name: str) -> dict | None:
    return next((c for c in results["cases"] if c["name"] == name), None)


# --- targets ---------------------------------------------------------------------


def evaluate_targets(results: dict) -> list[dict]:
    targets = []

    def add(name: str, value: float | None, op: str, goal: float, unit: str, source: str) -> None:
        met = None if value is None else (value >= goal if op == ">=" else value <= goal if op == "<=" else value < goal)
        targets.append({"target": name, "measured": value, "op": op, "goal": goal, "unit": unit, "met": met,
                        "source": source})

    def ratio(case_name: str, key: str) -> float | None:
        case = find_case(results, case_name)
        return case["ratios"][key].get("median") if case and case.get("ratios", {}).get(key) else None

    main = find_case(results, TARGET_CASE)
    add("RELAY e2e / DIRECT (1 KiB, 1 rcpt, 2 backups, reuse)", ratio(TARGET_CASE, "relay_vs_direct_e2e"),
        ">=", 0.14, "×", "first bench")
    add("RELAY e2e / POSTFIX e2e (same case)", ratio(TARGET_CASE, "relay_vs_postfix_e2e"), ">=", 7.0, "×",
        "first bench")
    add("RELAY primary-only e2e / DIRECT (1 KiB, 1 rcpt, reuse)",
        ratio(TARGET_PRIMARY_ONLY_CASE, "relay_vs_direct_e2e"), ">=", 0.35, "×", "first bench")
    add("RELAY e2e / DIRECT without reuse (1 KiB, 1 rcpt, 2 backups)",
        ratio(TARGET_NOREUSE_CASE, "relay_vs_direct_e2e"), ">=", 0.23, "×", "first bench")
    cpu = main["systems"].get("relay", {}).get("median", {}).get("cpu_us_per_msg") if main else None
    add("relay CPU per message (1 KiB, 1 rcpt, 2 backups, reuse)", cpu, "<=", 250, "µs", "first bench")
    extras = results["extras"]
    lat = extras.get("latency") or {}
    add("added latency p50 at half the relay's peak rate", lat.get("added_p50_ms"), "<=", 2.0, "ms", "first bench")
    add("added latency p99 at half the relay's peak rate", lat.get("added_p99_ms"), "<=", 10.0, "ms", "first bench")
    idle = extras.get("idle") or {}
    add(f"RSS per idle connection ({idle.get('connections', 10000)} idle)", idle.get("rss_per_connection_kib"),
        "<=", 10.0, "KiB", "first bench")
    add("e2e throughput with idle connections / without", idle.get("throughput_ratio"), ">=", 0.90, "×",
        "first bench")
    big = extras.get("big-message") or {}
    growth = big.get("rss_growth_kib")
    add(f"RSS growth, one {round(big.get('content_bytes', 100 * MIB) / MIB)} MiB message",
        None if growth is None else round(growth / KIB, 2), "<", 16.0, "MiB", "first bench")
    backlog = extras.get("backlog") or {}
    growth = backlog.get("peak_rss_growth_kib")
    add(f"RSS growth, backlog of {backlog.get('pending', 10000)} copies",
        None if growth is None else round(growth / KIB, 2), "<", 16.0, "MiB", "first bench")

    # Issue 10, against the baseline (--baseline REF) measured in the same run.
    for case_name, what in ((TARGET_CASE, "reuse"), (TARGET_NOREUSE_CASE, "a connection per message")):
        add(f"relay CPU per message / BEFORE (1 KiB, 1 rcpt, 2 backups, {what})",
            ratio(case_name, "relay_vs_before_cpu"), "<=", 0.35, "×", "issue 10")
        add(f"RELAY e2e / BEFORE e2e (1 KiB, 1 rcpt, 2 backups, {what})",
            ratio(case_name, "relay_vs_before_e2e"), ">=", 2.5, "×", "issue 10")
    for case_name in BEFORE_SECONDARY_CASES:
        add(f"RELAY e2e / BEFORE e2e ({case_name})", ratio(case_name, "relay_vs_before_e2e"), ">=", 1.5, "×",
            "issue 10")
    add("POSTFIX→RELAY e2e / POSTFIX→sink e2e (Postfix in front)",
        ratio(FRONT_CASE, "front-relay_vs_postfix_sink_e2e"), ">=", 0.8, "×", "issue 10")

    # Issue 8: a restart on a large spool answers at once, every backup gets
    # copies from the start, the spool empties.
    for drain in extras.get("drain", {}).get("runs", []):
        if "error" in drain:
            continue
        n = drain["copies"]
        add(f"drain {n:,}: SMTP answers after start", drain.get("smtp_ready_seconds"), "<=", 2.0, "s", "issue 8")
        first = drain.get("first_delivery_seconds") or []
        add(f"drain {n:,}: first delivery at the later backup", max(first) if first and None not in first else None,
            "<=", 5.0, "s", "issue 8")
        add(f"drain {n:,}: the other backup's share done when the first finished",
            drain.get("fairness"), ">=", 0.8, "×", "issue 8")
        add(f"drain {n:,}: copies still pending after the drain", drain.get("pending_after"), "<=", 0, "copies",
            "issue 8")
    return targets


# --- the report -----------------------------------------------------------------


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _main_table(results: dict) -> list[str]:
    cases = [c for c in results["cases"] if c["name"] != FRONT_CASE]
    if not cases:
        return []
    before = any("before" in c["systems"] for c in cases)
    head = ("| case | DIRECT e2e | POSTFIX client | POSTFIX e2e | RELAY client | RELAY e2e "
            "| RELAY/DIRECT | RELAY/POSTFIX | relay CPU µs/msg | POSTFIX CPU µs/msg | relay peak RSS MiB |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    if before:
        head += " BEFORE e2e | BEFORE CPU µs/msg | RELAY/BEFORE e2e | RELAY/BEFORE CPU |"
        rule += "---:|---:|---:|---:|"
    floor = any("floor" in c["systems"] for c in cases)
    if floor:
        head += (" FLOOR e2e | FLOOR CPU µs/msg | RELAY/FLOOR CPU | FLOOR-NODISK CPU µs/msg |"
                 + (" FLOOR/BEFORE CPU | FLOOR-NODISK/BEFORE CPU |" if before else ""))
        rule += "---:|---:|---:|---:|" + ("---:|---:|" if before else "")
    lines = [head, rule]
    for case in cases:
        systems = case["systems"]
        ratios = case["ratios"]

        def med(system: str, key: str) -> float | None:
            return systems.get(system, {}).get("median", {}).get(key)

        rss = med("relay", "peak_rss_kib")
        line = (
            f"| {case['name']} | {_fmt(med('direct', 'e2e_msg_per_s'))} | {_fmt(med('postfix', 'client_msg_per_s'))} "
            f"| {_fmt(med('postfix', 'e2e_msg_per_s'))} | {_fmt(med('relay', 'client_msg_per_s'))} "
            f"| {_fmt(med('relay', 'e2e_msg_per_s'))} "
            f"| {_fmt(ratios['relay_vs_direct_e2e'].get('median'), 3)} "
            f"| {_fmt(ratios['relay_vs_postfix_e2e'].get('median'), 2)} "
            f"| {_fmt(med('relay', 'cpu_us_per_msg'))} | {_fmt(med('postfix', 'cpu_us_per_msg'))} "
            f"| {_fmt(None if rss is None else rss / KIB, 1)} |"
        )
        if before:
            line += (f" {_fmt(med('before', 'e2e_msg_per_s'))} | {_fmt(med('before', 'cpu_us_per_msg'))} "
                     f"| {_fmt(ratios.get('relay_vs_before_e2e', {}).get('median'), 2)} "
                     f"| {_fmt(ratios.get('relay_vs_before_cpu', {}).get('median'), 2)} |")
        if floor:
            line += (f" {_fmt(med('floor', 'e2e_msg_per_s'))} | {_fmt(med('floor', 'cpu_us_per_msg'))} "
                     f"| {_fmt(ratios.get('relay_vs_floor_cpu', {}).get('median'), 2)} "
                     f"| {_fmt(med('floor-nodisk', 'cpu_us_per_msg'))} |")
            if before:
                line += (f" {_fmt(ratios.get('floor_vs_before_cpu', {}).get('median'), 2)} "
                         f"| {_fmt(ratios.get('floor-nodisk_vs_before_cpu', {}).get('median'), 2)} |")
        lines.append(line)
    lines += ["", "Throughput in msg/s; e2e = until every copy reached every sink. Ratios are per run, then the "
              "median. CPU per message: the relay process; every process of the Postfix instance."
              + (" BEFORE: the relay at the baseline commit, alternated with the others." if before else "")
              + (" FLOOR: bench/floor.py, the least a gevent relay does for the same job (pooled primary "
                 "sessions, content group-committed to one segment file); FLOOR-NODISK: the same keeping nothing "
                 "on disk." if floor else "")
              + " Failed runs are left out (see the JSON)."]
    return lines


def _front_table(results: dict) -> list[str]:
    front = find_case(results, FRONT_CASE)
    if not front:
        return []
    if "skipped" in front or "error" in front:
        return ["", f"{FRONT_CASE}: {'skipped' if 'skipped' in front else 'FAILED'}: "
                    f"{front.get('skipped') or front.get('error')}"]
    lines = ["", f"Postfix in front ({FRONT_CASE}): smtp-source ({front['sessions']} sessions, 1 KiB, 1 recipient, "
                 "-d) into a private Postfix whose transport map sends each test domain through the `smtpdup` "
                 "transport of `deploy/postfix/` to a relay (primary + 2 backups) or to one sink:", "",
             "| route | client msg/s | e2e msg/s | e2e / POSTFIX→sink | relay CPU µs/msg | Postfix CPU µs/msg "
             "| relay peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, system in front["systems"].items():
        med = system.get("median", {})
        ratio = front["ratios"].get(f"{name}_vs_postfix_sink_e2e", {}).get("median")
        rss = med.get("peak_rss_kib")
        lines.append(f"| {label(name)} | {_fmt(med.get('client_msg_per_s'))} | {_fmt(med.get('e2e_msg_per_s'))} "
                     f"| {_fmt(ratio, 2) if name != 'postfix-sink' else '1'} | {_fmt(med.get('cpu_us_per_msg'))} "
                     f"| {_fmt(med.get('postfix_cpu_us_per_msg'))} | {_fmt(None if rss is None else rss / KIB, 1)} |")
    return lines


def _drain_table(results: dict) -> list[str]:
    drain = results["extras"].get("drain")
    if not drain:
        return []
    lines = ["", "Drain after a restart (both backups up; the backlog written "
                 f"{'through the spool module' if drain.get('fill') == 'spool' else 'by the relay with its backups down'}"
                 "; times from the relay's start):", "",
             "| copies | spool fill s | SMTP answers s | first delivery s (backup 1, 2) | drained s "
             "| copies/s | per backup copies/s | other backup's share when the first finished | spool empty s "
             "| pending after |",
             "|---:|---:|---:|---|---:|---:|---|---:|---:|---:|"]
    for run in drain["runs"]:
        if "error" in run:
            lines.append(f"| {run.get('copies', '?'):,} | FAILED: {run['error']} |||||||||")
            continue
        first = ", ".join(_fmt(t, 2) for t in run.get("first_delivery_seconds") or [])
        per = ", ".join(_fmt(r) for r in run.get("per_backup_copies_per_s") or [])
        lines.append(f"| {run['copies']:,} | {_fmt(run.get('fill_seconds'), 1)} | {_fmt(run.get('smtp_ready_seconds'), 2)} "
                     f"| {first} | {_fmt(run.get('drain_seconds'), 1)} | {_fmt(run.get('copies_per_s'))} "
                     f"| {per} | {_fmt(run.get('fairness'), 2)} | {_fmt(run.get('spool_empty_seconds'), 1)} "
                     f"| {_fmt(run.get('pending_after'))} |")
    return lines


def markdown(results: dict) -> str:
    meta = results["meta"]
    baseline = meta.get("baseline")
    lines = [
        f"### smtpdup benchmark — {meta['timestamp']}",
        "",
        f"Commit `{meta['git_commit']}`{' (smtpdup/ modified)' if meta.get('git_dirty') else ''}"
        f"{' (smtpdup/ changed during the run!)' if meta.get('source_digest_end') != meta.get('source_digest_start') else ''}"
        + (f", baseline (BEFORE) `{baseline['commit'][:7]}` (`--baseline {baseline['ref']}`)" if baseline else "")
        + f", {meta['cpu_count']} CPUs, Python {meta['python']}, Postfix {meta.get('postfix_version') or '–'}, "
        f"load client {meta['load_client']}, spool on {meta.get('spool_filesystem') or '?'}; "
        f"{meta['runs']} run(s) per case, medians; {meta['sessions']} sessions; "
        f"{meta['messages']} messages per RELAY/POSTFIX run, {meta['messages'] * meta['direct_factor']} per DIRECT run; "
        f"load average {meta['loadavg_start']} at start"
        + (f"; relay settings {' '.join(f'{k}={v}' for k, v in meta['relay_env'].items())}" if meta.get("relay_env")
           else "") + ".",
        "",
        f"Command: `{meta['command']}`",
        "",
    ]
    lines += _main_table(results)
    lines += _front_table(results)
    extras = results["extras"]
    lat = extras.get("latency")
    if lat and "error" not in lat:
        d, r = lat["direct"].get("median", {}), lat["relay"].get("median", {})
        lines += [
            "",
            f"Latency per transaction at {lat['rate_per_s']} msg/s (half the relay's {lat['peak_rate_per_s']} msg/s), "
            f"1 KiB, 1 recipient, {lat['workers']} connections, {lat['seconds']}s per run:",
            "",
            "| system | p50 ms | p90 ms | p99 ms | max ms |",
            "|---|---:|---:|---:|---:|",
            f"| DIRECT | {_fmt(d.get('p50_ms'), 2)} | {_fmt(d.get('p90_ms'), 2)} | {_fmt(d.get('p99_ms'), 2)} "
            f"| {_fmt(d.get('max_ms'), 2)} |",
            f"| RELAY | {_fmt(r.get('p50_ms'), 2)} | {_fmt(r.get('p90_ms'), 2)} | {_fmt(r.get('p99_ms'), 2)} "
            f"| {_fmt(r.get('max_ms'), 2)} |",
            f"| added | {_fmt(lat.get('added_p50_ms'), 2)} | | {_fmt(lat.get('added_p99_ms'), 2)} | |",
        ]
    idle = extras.get("idle")
    if idle and "error" not in idle:
        lines += ["", f"Idle connections: {idle['connections']} held open: RSS {_fmt(idle.get('rss_before_kib'))} → "
                  f"{_fmt(idle.get('rss_after_kib'))} KiB ({_fmt(idle.get('rss_per_connection_kib'), 2)} KiB each); "
                  f"RELAY e2e {_fmt(idle['without_idle']['median'].get('e2e_msg_per_s'))} msg/s without, "
                  f"{_fmt(idle['with_idle']['median'].get('e2e_msg_per_s'))} with "
                  f"(×{_fmt(idle.get('throughput_ratio'), 3)})."]
    big = extras.get("big-message")
    if big and "error" not in big:
        lines += ["", f"Big message: {big['content_bytes'] / MIB:.0f} MiB through the relay in "
                  f"{big['client_seconds']}s (client), {big['e2e_seconds']}s (every copy); relay peak RSS "
                  f"growth {_fmt((big.get('rss_growth_kib') or 0) / KIB, 1)} MiB."]
    backlog = extras.get("backlog")
    if backlog and "error" not in backlog:
        lines += ["", f"Backlog: {backlog['pending']} copies pending for a stopped backup: relay RSS "
                  f"{_fmt(backlog.get('rss_before_kib'))} → {_fmt(backlog.get('rss_after_kib'))} KiB (peak growth "
                  f"{_fmt((backlog.get('peak_rss_growth_kib') or 0) / KIB, 1)} MiB); drained after "
                  f"`smtpdup queue flush` at {_fmt(backlog.get('drain_copies_per_s'))} copies/s "
                  f"({backlog.get('drain_seconds')}s)."]
    lines += _drain_table(results)
    for name, value in extras.items():
        if isinstance(value, dict) and "error" in value:
            lines += ["", f"{name}: FAILED: {value['error']}"]
    lines += ["", "| target | measured | goal | met | from |", "|---|---:|---:|---|---|"]
    for t in results["targets"]:
        unit = t["unit"]
        value = t["measured"]
        shown = "–" if value is None else (f"{value:.3f}{unit}" if unit == "×" else f"{value:,.2f} {unit}")
        goal = f"{t['op']} {t['goal']}{unit}" if unit == "×" else f"{t['op']} {t['goal']} {unit}"
        met = "not measured" if t["met"] is None else ("met" if t["met"] else "**not met**")
        lines.append(f"| {t['target']} | {shown} | {goal} | {met} | {t['source']} |")
    return "\n".join(lines) + "\n"


# --- metadata ---------------------------------------------------------------------


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def git_dirty() -> bool | None:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "smtpdup"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout
        return bool(out.strip())
    except (OSError, subprocess.TimeoutExpired):
        return None


def source_digest() -> str:
    """A digest of smtpdup/*.py as run: others edit the tree, and a relay
    started later in a bench run would run changed code."""
    digest = hashlib.sha1()
    for path in sorted((ROOT / "smtpdup").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def filesystem_of(path: Path) -> str | None:
    """The filesystem type of the mount holding ``path`` (from /proc/mounts)."""
    best, kind, device = "", None, ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                    best, kind, device = parts[1], parts[2], parts[0]
    except OSError:
        return None
    if kind == "ext4":
        # Without a journal ext4 checks every candidate inode for a recent
        # deletion when it allocates one: create/unlink churn costs more.
        try:
            task = Path(f"/sys/fs/ext4/{os.path.basename(device)}/journal_task").read_text().strip()
            kind += " (no journal)" if task == "<none>" else " (journal)"
        except OSError:
            pass
    return kind


def postfix_version(postconf: str | None) -> str | None:
    if not postconf:
        return None
    try:
        out = subprocess.run([postconf, "-d", "-h", "mail_version"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None
