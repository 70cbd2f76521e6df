#!/usr/bin/env python3
"""smtpdup benchmark: DIRECT vs POSTFIX vs RELAY (vs BEFORE) on loopback.

    .venv/bin/python bench/run.py            # or: make bench
    .venv/bin/python bench/run.py --quick    # a smoke run (~1 minute)
    .venv/bin/python bench/run.py --baseline REF   # also the relay at commit REF

Systems (every destination is Postfix's smtp-sink, the load is smtp-source,
20 sessions):

- DIRECT: smtp-source straight into one smtp-sink: the machine's ceiling.
- POSTFIX: a private Postfix instance (own config and queue directory under
  a temp dir) relaying to a primary sink, with ``always_bcc`` expanded to
  two backup sinks: what an operator would run instead of smtpdup.
- RELAY: smtpdup (a subprocess) with a primary and two backups, spool on.
- BEFORE (``--baseline REF``): the relay at commit REF, from a temporary
  ``git worktree``, run beside RELAY with the same interpreter.

Every case runs each system ``--runs`` times, the systems alternated within
each run (ratios are taken within a run, then the median). A run counts
client-side msg/s (until smtp-source exits) and end-to-end msg/s (until
every sink has counted every copy, read from ``smtp-sink -c``'s counters),
the relay's CPU per message (/proc/<pid>/stat) and peak RSS (VmHWM).
Also: POSTFIX-FRONT (a private Postfix in front of the relay, as deployed),
latency at half the relay's peak rate against DIRECT, 10,000 idle
connections, one 100 MiB message, a 10,000-copy backlog, and the drain of a
spool backlog after a restart.

Results: ``<out>/<UTC timestamp>.json`` (raw runs and medians) and a Markdown
report on stdout and in ``<out>/latest.md``. Progress goes to stderr. See
bench/README.md for how to read it. Every process started here is stopped by
its PID (Postfix by ``postfix -c DIR stop``, then its master's PID) on the
way out, also on Ctrl-C and SIGTERM; the baseline's worktree is removed.

The code: ``probes.py`` (processes, /proc), ``systems.py`` (sinks, relay,
baseline, Postfix), ``runner.py`` (one run, the cases, POSTFIX-FRONT),
``extras.py``, ``drain.py``, ``report.py`` (medians, targets, tables), and
this file (the command line).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import drain  # noqa: E402
import extras  # noqa: E402
from probes import BenchError, elapsed, progress  # noqa: E402
from report import (FRONT_CASE, TARGET_CASE, evaluate_targets, filesystem_of, find_case, git_commit,  # noqa: E402
                    git_dirty, markdown, postfix_version, source_digest)
from runner import SYSTEMS, Bench, main_cases  # noqa: E402
from smtpclient import SmtpError  # noqa: E402
from systems import Baseline, find_tools, relay_env_overrides  # noqa: E402

EXTRAS = ("latency", "idle", "big-message", "backlog", "drain")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v.replace("_", "")) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("every number must be at least 1")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.split("\n\n")[0],
        epilog="Case names: " + ", ".join(c.name for c in main_cases()) + f", {FRONT_CASE}; extras: "
               + ", ".join(EXTRAS) + ". See bench/README.md.")
    parser.add_argument("--quick", action="store_true", help="small counts, 1 run: a smoke test")
    parser.add_argument("--runs", type=int, help="runs per case (default 3; --quick 1)")
    parser.add_argument("--messages", type=int, help="messages per RELAY/POSTFIX run (default 1000; --quick 40)")
    parser.add_argument("--direct-factor", type=int,
                        help="DIRECT sends this many times --messages, to run long enough to time (default 5)")
    parser.add_argument("--sessions", type=int, default=20, help="parallel sessions (smtp-source -s; default 20)")
    parser.add_argument("--cases", default="*",
                        help="comma-separated names or shell patterns of cases and extras to run (default: all)")
    parser.add_argument("--systems", help="subset of direct,postfix,relay,before,floor,floor-nodisk (default: all; before only "
                                          "with --baseline)")
    parser.add_argument("--baseline", metavar="REF",
                        help="also run the relay at commit REF (git worktree) as BEFORE, beside RELAY")
    parser.add_argument("--front-workers", type=lambda t: _int_list(t) if t.strip() else [], default=[2],
                        metavar="N[,N]", help=f"{FRONT_CASE}: also a relay with smtp.workers N (default 2; '' for none)")
    parser.add_argument("--drain-copies", type=_int_list, metavar="N[,N]",
                        help="drain: backlog sizes in copies (default 10000,100000; --quick 400)")
    parser.add_argument("--drain-fill", choices=("spool", "smtp"), default="spool",
                        help="drain: write the backlog through smtpdup.spool (fast; default) or send it "
                             "through the relay with the backups down")
    parser.add_argument("--out", default=str(BENCH_DIR / "results"), help="results directory (default bench/results)")
    parser.add_argument("--tmpdir", help="where sinks, spools and the Postfix queue live (default: $TMPDIR or /tmp)")
    parser.add_argument("--keep-temp", action="store_true", help="keep the temp directory (logs, spools)")
    parser.add_argument("--load-client", choices=("auto", "smtp-source", "python"), default="auto",
                        help="auto: smtp-source if installed, else the built-in Python client (not comparable)")
    parser.add_argument("--latency-seconds", type=float, help="per latency run (default 5; --quick 1.5)")
    parser.add_argument("--latency-workers", type=int, default=8, help="latency connections (default 8)")
    parser.add_argument("--idle-connections", type=int, help="default 10000; --quick 300")
    parser.add_argument("--big-message-mib", type=int, help="default 100; --quick 8")
    parser.add_argument("--backlog-copies", type=int, help="default 10000; --quick 200")
    parser.add_argument("--relay-env", action="append", default=[], metavar="SMTP_DUP_KEY=VALUE",
                        help="extra relay setting for every relay, e.g. SMTP_DUP_SMTP_WORKERS=2 (repeatable)")
    parser.add_argument("--postfix-log", action="store_true",
                        help="Postfix logs to <tmp>/postfix*/maillog (keep with --keep-temp)")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the bench: py-spy the relay during one case; writes profile-relay.{svg,txt,folded}")
    parser.add_argument("--profile-case", default=TARGET_CASE, help=f"case to profile (default {TARGET_CASE})")
    parser.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second (default 250)")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "runs": 1 if quick else 3,
        "messages": 40 if quick else 1000,
        "direct_factor": 2 if quick else 5,
        "latency_seconds": 1.5 if quick else 5.0,
        "idle_connections": 300 if quick else 10000,
        "big_message_mib": 8 if quick else 100,
        "backlog_copies": 200 if quick else 10000,
        "drain_copies": [400] if quick else [10000, 100000],
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.runs < 1 or args.messages < 1 or args.direct_factor < 1 or args.sessions < 1:
        parser.error("--runs, --messages, --direct-factor and --sessions must be at least 1")
    for item in args.relay_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("SMTP_DUP_"):
            parser.error(f"--relay-env: expected SMTP_DUP_KEY=VALUE, got {item!r}")
        relay_env_overrides[key] = value
    if args.systems is None:
        args.systems = [s for s in SYSTEMS if s != "before" or args.baseline]
    else:
        args.systems = [s.strip().lower() for s in args.systems.split(",") if s.strip()]
        unknown = [s for s in args.systems if s not in SYSTEMS]
        if unknown:
            parser.error(f"--systems: unknown {', '.join(unknown)} (choose from {', '.join(SYSTEMS)})")
        if args.baseline and "before" not in args.systems:
            args.systems.append("before")
    if "before" in args.systems and not args.baseline:
        parser.error("--systems before needs --baseline REF (the commit to compare with)")
    args.patterns = [p.strip() for p in args.cases.split(",") if p.strip()]
    known = [c.name for c in main_cases()] + [FRONT_CASE] + list(EXTRAS)
    for pattern in args.patterns:
        if not fnmatch.filter(known, pattern):
            parser.error(f"--cases: {pattern!r} matches nothing (cases: {', '.join(known)})")
    if args.profile_case not in [c.name for c in main_cases()]:
        parser.error(f"--profile-case: unknown case {args.profile_case!r}")
    return args


def selected(args: argparse.Namespace, name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in args.patterns)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _command(argv: list[str] | None) -> str:
    words = sys.argv[1:] if argv is None else argv
    if os.environ.get("MAKELEVEL"):
        return "make bench" + (f" BENCH_ARGS={shlex.quote(' '.join(words))}" if words else "")
    return " ".join([".venv/bin/python bench/run.py", *map(shlex.quote, words)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        tools = find_tools(args.load_client)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    if tools.load_client != "smtp-source":
        progress("WARNING: smtp-source not found (it comes with Postfix: apt-get install postfix); using the "
                 "built-in Python load client, which is slower: numbers are not comparable with smtp-source runs")
    if not tools.smtp_sink:
        progress("WARNING: smtp-sink not found: destinations are `smtpdup sink` (slower, counts files)")
    if args.tmpdir:
        os.makedirs(args.tmpdir, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="smtpdup-bench-", dir=args.tmpdir))
    os.chmod(workdir, 0o755)  # Postfix daemons (user postfix) must reach their queue below it
    bench = Bench(args, tools, workdir)
    timestamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    results: dict = {
        "meta": {
            "timestamp": timestamp,
            "command": _command(argv),
            "cpu_count": os.cpu_count(),
            "git_commit": git_commit(),
            "git_dirty": git_dirty(),
            "source_digest_start": source_digest(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "postfix_version": postfix_version(tools.postconf),
            "load_client": tools.load_client,
            "sink": "smtp-sink" if tools.smtp_sink else "smtpdup sink",
            "spool_filesystem": filesystem_of(workdir),
            "tmpdir": str(workdir),
            "runs": args.runs,
            "messages": args.messages,
            "direct_factor": args.direct_factor,
            "sessions": args.sessions,
            "quick": args.quick,
            "relay_env": dict(relay_env_overrides),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        },
        "cases": [],
        "extras": {},
    }
    progress(f"workdir {workdir}; {args.runs} run(s), {args.messages} messages per run, "
             f"load client {tools.load_client}")
    status = 0
    try:
        if args.baseline:
            try:
                bench.baseline = Baseline(args.baseline, workdir)
                bench.baseline.prepare()
            except (BenchError, OSError, subprocess.TimeoutExpired) as exc:
                print(f"bench: {exc}", file=sys.stderr)
                return 2
            results["meta"]["baseline"] = {"ref": args.baseline, "commit": bench.baseline.commit,
                                           "requirements_differ": bench.baseline.notes}
            progress(f"baseline {args.baseline} = {bench.baseline.commit[:12]} in {bench.baseline.path}")
        if args.profile:
            try:
                results["profile"] = extras.profile(bench)
            except (BenchError, OSError, SmtpError, subprocess.TimeoutExpired) as exc:
                print(f"bench: --profile: {exc}", file=sys.stderr)
                return 1
            progress(f"profile written to {Path(args.out) / 'profile-relay.txt'}")
            return 0
        for case in main_cases():
            if selected(args, case.name):
                progress(f"case {case.name}: {case.description}")
                results["cases"].append(bench.run_case(case))
        if selected(args, FRONT_CASE):
            progress(f"case {FRONT_CASE}: Postfix in front of the relay")
            results["cases"].append(bench.run_front())
        peak = None
        main_case = find_case(results, TARGET_CASE)
        if main_case:
            peak = main_case["systems"].get("relay", {}).get("median", {}).get("e2e_msg_per_s")
        for name, method in (("latency", lambda: extras.latency(bench, peak)), ("idle", lambda: extras.idle(bench)),
                             ("big-message", lambda: extras.big_message(bench)),
                             ("backlog", lambda: extras.backlog(bench)), ("drain", lambda: drain.drain(bench))):
            if not selected(args, name) or "relay" not in args.systems:
                continue
            progress(f"extra {name}")
            try:
                results["extras"][name] = method()
            except (BenchError, OSError, SmtpError, subprocess.TimeoutExpired) as exc:
                progress(f"extra {name}: FAILED: {exc}")
                results["extras"][name] = {"error": str(exc)}
    except KeyboardInterrupt:
        progress("interrupted: stopping every process started")
        status = 130
    finally:
        bench.close()
        if args.keep_temp:
            progress(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.profile:
        return status
    results["meta"]["postfix_skipped"] = bench.postfix_skip
    results["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["meta"]["source_digest_end"] = source_digest()
    if results["meta"]["source_digest_end"] != results["meta"]["source_digest_start"]:
        progress("WARNING: smtpdup/*.py changed during the run: later cases ran different code")
    results["meta"]["duration_seconds"] = round(elapsed(), 1)
    results["targets"] = evaluate_targets(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{timestamp}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)
    report = markdown(results)
    (out / "latest.md").write_text(report)
    sys.stdout.write(report)
    met = sum(1 for t in results["targets"] if t["met"])
    measured = sum(1 for t in results["targets"] if t["met"] is not None)
    failed = sum(c["systems"][s]["median"]["runs_failed"] for c in results["cases"] for s in c.get("systems", {}))
    progress(f"done in {results['meta']['duration_seconds']}s: {met} of {measured} measured targets met, "
             f"{failed} failed run(s); results in {path} and {out / 'latest.md'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
