"""Running the throughput cases: one load run, the end-to-end count at the
sinks, and the systems taking turns within each run.

``Bench`` owns what a bench run starts (sinks, relays, the private Postfix
instances, the baseline checkout) and stops all of it in ``close``.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from probes import CLOCK_TICKS, HELO, KIB, LOCALHOST, SENDER, BenchError, Processes, progress
from report import FRONT_CASE, TARGET_PRIMARY_ONLY_CASE, label, medians, run_ratios
from smtpclient import load as python_load
from systems import (Baseline, Direct, Floor, FrontRoute, Postfix, PostfixFront, PrivatePostfix, Relay, Sink, System,
                     Tools)

NO_PROGRESS_SECONDS = 45.0  # sinks counting nothing new: the run failed
LOAD_TIMEOUT_SECONDS = 900.0  # one smtp-source invocation
POLL_SECONDS = 0.002  # first sink poll interval after the client is done
MAX_POLL_SECONDS = 0.02
SETTLE_SECONDS = 0.5  # between runs: backup workers linger, sockets close
WARMUP_MESSAGES = 200  # one discarded run per system and case before the measured ones

SYSTEMS = ("direct", "postfix", "relay", "before", "floor", "floor-nodisk")
# FLOOR and FLOOR-NODISK (bench/floor.py) run in the cases of issue 10's targets only.
FLOOR_CASES = ("1k-1rcpt-reuse", "1k-1rcpt-noreuse")


@dataclass(frozen=True)
class Case:
    name: str
    size_bytes: int
    recipients: int
    reuse: bool
    systems: tuple[str, ...]
    backups: int = 2
    description: str = ""


def main_cases() -> list[Case]:
    cases = []
    for size, size_name in ((KIB, "1k"), (100 * KIB, "100k")):
        for rcpts in (1, 10):
            for reuse in (True, False):
                name = f"{size_name}-{rcpts}rcpt-{'reuse' if reuse else 'noreuse'}"
                systems = SYSTEMS if name in FLOOR_CASES else tuple(s for s in SYSTEMS if not s.startswith("floor"))
                cases.append(Case(name, size, rcpts, reuse, systems,
                                  description=f"{size_name.upper()}iB, {rcpts} recipient(s), "
                                              f"{'connection reuse (-d)' if reuse else 'a connection per message'}"))
    cases.append(Case(TARGET_PRIMARY_ONLY_CASE, KIB, 1, True, ("direct", "relay", "before"), backups=0,
                      description="1 KiB, 1 recipient, reuse; RELAY without backups"))
    return cases


def case_named(name: str) -> Case:
    return next(c for c in main_cases() if c.name == name)


# The load into Postfix in front: 1 KiB, 1 recipient, smtp-source -d.
FRONT_LOAD = Case(FRONT_CASE, KIB, 1, True, (), description="Postfix in front of smtpdup (transport map)")


def run_load(tools: Tools, port: int, case: Case, messages: int, sessions: int, recipient: str) -> float:
    """Send ``messages`` as the case says; returns the client's seconds.
    Raises BenchError if the client failed."""
    if tools.load_client == "smtp-source":
        assert tools.smtp_source is not None
        argv = [tools.smtp_source, "-s", str(sessions), "-m", str(messages), "-l", str(case.size_bytes),
                "-f", SENDER, "-t", recipient, "-M", HELO]
        if case.recipients > 1:
            argv += ["-r", str(case.recipients)]
        if case.reuse:
            argv.append("-d")
        argv.append(f"{LOCALHOST}:{port}")
        started = time.perf_counter()
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=LOAD_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            raise BenchError(f"smtp-source did not finish within {LOAD_TIMEOUT_SECONDS}s") from None
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            text = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
            raise BenchError(f"smtp-source exited with {done.returncode}: {' | '.join(text[-3:])}")
        return seconds
    result = python_load(LOCALHOST, port, messages=messages, sessions=sessions, size_bytes=case.size_bytes,
                         recipients=case.recipients, reuse=case.reuse, deadline_seconds=LOAD_TIMEOUT_SECONDS)
    if result["errors"] or result["sent"] != messages:
        raise BenchError(f"load client: {result['sent']} of {messages} sent, {result['errors']} errors "
                         f"({result['first_error']})")
    return result["seconds"]


def wait_for_sinks(sinks: list[Sink], before: list[int], expected: int | list[int],
                   no_progress: float = NO_PROGRESS_SECONDS, deadline: float | None = None,
                   on_poll=None) -> list[int]:
    """Until every sink counted ``expected`` more messages than ``before``;
    fails when nothing new arrives for ``no_progress`` seconds, or at the
    monotonic ``deadline``. ``on_poll(counts)`` sees every poll."""
    wanted = expected if isinstance(expected, list) else [expected] * len(sinks)
    interval = POLL_SECONDS
    last_counts: list[int] = []
    last_change = time.monotonic()
    while True:
        counts = [s.count() - b for s, b in zip(sinks, before)]
        if on_poll is not None:
            on_poll(counts)
        if all(c >= w for c, w in zip(counts, wanted)):
            return counts
        now = time.monotonic()
        if counts != last_counts:
            last_counts, last_change = counts, now
        elif now - last_change > no_progress:
            raise BenchError(f"sinks stuck at {counts} of {wanted} for {no_progress}s")
        if deadline is not None and now > deadline:
            raise BenchError(f"sinks at {counts} of {wanted} when the time was up")
        time.sleep(interval)
        interval = min(interval * 1.25, MAX_POLL_SECONDS)


def measure(system: System, tools: Tools, case: Case, messages: int, sessions: int) -> dict:
    """One run of one system: client and end-to-end rates, CPU, peak RSS."""
    sessions_before = [s.counters()[0] for s in system.sinks]
    before = [s.count() for s in system.sinks]
    cpu_before = system.cpu_ticks()
    other_before = system.other_cpu_ticks()
    started = time.perf_counter()
    client_seconds = run_load(tools, system.port, case, messages, sessions, system.recipient)
    counts = wait_for_sinks(system.sinks, before, messages)
    e2e_seconds = time.perf_counter() - started
    cpu_after = system.cpu_ticks()
    other_after = system.other_cpu_ticks()
    run: dict = {
        "messages": messages,
        "client_seconds": round(client_seconds, 4),
        "e2e_seconds": round(e2e_seconds, 4),
        "client_msg_per_s": round(messages / client_seconds, 1),
        "e2e_msg_per_s": round(messages / e2e_seconds, 1),
        "sink_counts": counts,
        # Sessions each sink saw: how well connections to destinations are reused.
        "sink_sessions": [s.counters()[0] - b if b >= 0 else None for s, b in zip(system.sinks, sessions_before)],
    }
    if cpu_before is not None and cpu_after is not None:
        run["cpu_us_per_msg"] = round((cpu_after - cpu_before) / CLOCK_TICKS * 1e6 / messages, 1)
    for name, after in other_after.items():
        if after is not None and other_before.get(name) is not None:
            run[f"{name}_cpu_us_per_msg"] = round((after - other_before[name]) / CLOCK_TICKS * 1e6 / messages, 1)
    peak = system.peak_rss_kib()
    if peak is not None:
        run["peak_rss_kib"] = peak
    return run


def alternate(bench: Bench, case: Case, systems: dict[str, System], messages_for,
              on_failure=None) -> dict[str, dict]:
    """A warm-up run per system (discarded), then ``--runs`` runs in which
    the systems take turns (the order rotates from run to run)."""
    args = bench.args
    results: dict[str, dict] = {name: {"runs": []} for name in systems}
    order = list(systems)
    for name in order:  # discarded: fresh processes, cold caches, first connections
        try:
            measure(systems[name], bench.tools, case, min(WARMUP_MESSAGES, messages_for(name)), args.sessions)
        except BenchError as exc:
            progress(f"{case.name} warm-up {label(name)}: {exc}")
            if on_failure is not None:
                on_failure(name)
    for run in range(args.runs):
        rotated = order[run % len(order):] + order[:run % len(order)] if order else []
        for name in rotated:
            system = systems[name]
            messages = messages_for(name)
            try:
                if not system.alive():
                    raise BenchError(system.describe_failure())
                result = measure(system, bench.tools, case, messages, args.sessions)
                progress(f"{case.name} run {run + 1}/{args.runs} {label(name):16s} "
                         f"client {result['client_msg_per_s']:8.1f} msg/s, e2e {result['e2e_msg_per_s']:8.1f} msg/s"
                         + (f", cpu {result['cpu_us_per_msg']:.0f} µs/msg" if 'cpu_us_per_msg' in result else ""))
            except BenchError as exc:
                result = {"messages": messages, "error": str(exc)}
                progress(f"{case.name} run {run + 1}/{args.runs} {label(name)}: FAILED: {exc}")
                if on_failure is not None:
                    on_failure(name)
            results[name]["runs"].append(result)
            time.sleep(SETTLE_SECONDS)
    for name in results:
        results[name]["median"] = medians(results[name]["runs"])
    return results


@dataclass
class Bench:
    """What one bench run has started, and the throughput cases."""

    args: argparse.Namespace
    tools: Tools
    workdir: Path
    procs: Processes = field(default_factory=Processes)
    sinks: dict[str, Sink] = field(default_factory=dict)
    postfix: Postfix | None = None
    postfix_skip: str | None = None
    baseline: Baseline | None = None
    relay_count: int = 0
    others: list = field(default_factory=list)  # more things to stop: PostfixFront instances

    def sink(self, name: str) -> Sink:
        if name not in self.sinks:
            self.sinks[name] = Sink(self.procs, self.workdir, name, self.tools).start()
        return self.sinks[name]

    def relay(self, label: str, backups: int = 2, *, before: bool = False, **kwargs) -> Relay:
        """A started relay (this tree's, or the baseline's with ``before``)
        with the shared primary and backup sinks."""
        self.relay_count += 1
        if before:
            if self.baseline is None or self.baseline.path is None:
                raise BenchError("no --baseline")
            kwargs.update(name="before", python_path=self.baseline.path)
            label = f"before-{label}"
        return Relay(self.procs, self.workdir, f"{self.relay_count}-{label}", self.sink("relay-primary"),
                     [self.sink(f"relay-backup{i}") for i in range(1, backups + 1)], **kwargs).start()

    def postfix_system(self) -> Postfix | None:
        if self.postfix is None and self.postfix_skip is None:
            self.postfix_skip = PrivatePostfix.unavailable(self.tools)
            if self.postfix_skip:
                progress(f"POSTFIX skipped: {self.postfix_skip}")
                return None
            progress("starting a private Postfix instance")
            postfix = Postfix(self.procs, self.workdir, self.tools, self.sink("postfix-primary"),
                              [self.sink("postfix-backup1"), self.sink("postfix-backup2")],
                              log=self.args.postfix_log)
            try:
                self.postfix = postfix.start()
            except (BenchError, OSError, subprocess.TimeoutExpired) as exc:
                postfix.stop()
                self.postfix_skip = f"could not start: {exc}"
                progress(f"POSTFIX skipped: {self.postfix_skip} (--postfix-log --keep-temp keeps its log)")
                return None
        return self.postfix

    def close(self) -> None:
        for other in self.others:
            other.stop()
        if self.postfix is not None:
            self.postfix.stop()
        for sink in self.sinks.values():
            sink.stop()
        self.procs.stop_all()
        if self.baseline is not None:
            self.baseline.remove()

    # -- throughput cases --

    def run_case(self, case: Case) -> dict:
        args = self.args
        wanted = [s for s in case.systems if s in args.systems]
        systems: dict[str, System] = {}
        setup_errors: dict[str, str] = {}
        relays: list[Relay] = []
        try:
            for name in wanted:
                try:
                    if name == "direct":
                        sink = self.sink("direct")
                        systems[name] = Direct(sink.port, [sink])
                    elif name == "postfix":
                        postfix = self.postfix_system()
                        if postfix is not None:
                            systems[name] = postfix
                    elif name in ("relay", "before"):
                        relay = self.relay(case.name, backups=case.backups, before=name == "before")
                        relays.append(relay)
                        systems[name] = relay
                    elif name in ("floor", "floor-nodisk"):
                        self.relay_count += 1
                        floor = Floor(self.procs, self.workdir, f"{self.relay_count}-{name}-{case.name}",
                                      self.sink("relay-primary"), [self.sink(f"relay-backup{i}") for i in (1, 2)],
                                      disk=name == "floor")
                        relays.append(floor.start())
                        systems[name] = floor
                except BenchError as exc:
                    progress(f"{case.name}: {label(name)} could not start: {exc}")
                    setup_errors[name] = str(exc)
            results = alternate(self, case, systems,
                                lambda name: args.messages * (args.direct_factor if name == "direct" else 1))
            for name, error in setup_errors.items():
                results[name] = {"runs": [], "median": medians([]), "error": error}
            return {
                "relay_log": {r.name: r.log_summary() for r in relays} or None,
                "name": case.name,
                "description": case.description,
                "size_bytes": case.size_bytes,
                "recipients": case.recipients,
                "reuse": case.reuse,
                "sessions": args.sessions,
                "relay_backups": case.backups,
                "systems": results,
                "ratios": {
                    "relay_vs_direct_e2e": run_ratios(results, "relay", "direct", "e2e_msg_per_s"),
                    "relay_vs_direct_client": run_ratios(results, "relay", "direct", "client_msg_per_s"),
                    "relay_vs_postfix_e2e": run_ratios(results, "relay", "postfix", "e2e_msg_per_s"),
                    "relay_vs_postfix_client": run_ratios(results, "relay", "postfix", "client_msg_per_s"),
                    "relay_vs_before_e2e": run_ratios(results, "relay", "before", "e2e_msg_per_s"),
                    "relay_vs_before_client": run_ratios(results, "relay", "before", "client_msg_per_s"),
                    "relay_vs_before_cpu": run_ratios(results, "relay", "before", "cpu_us_per_msg"),
                    "relay_vs_floor_cpu": run_ratios(results, "relay", "floor", "cpu_us_per_msg"),
                    "floor_vs_before_cpu": run_ratios(results, "floor", "before", "cpu_us_per_msg"),
                    "floor_vs_before_e2e": run_ratios(results, "floor", "before", "e2e_msg_per_s"),
                    "floor-nodisk_vs_before_cpu": run_ratios(results, "floor-nodisk", "before", "cpu_us_per_msg"),
                },
            }
        finally:
            for relay in relays:
                relay.stop()

    def run_front(self) -> dict:
        """POSTFIX-FRONT: one private Postfix whose transport map sends a
        domain to smtpdup (a primary and two backup sinks), another to the
        same relay with ``smtp.workers`` > 1, another to the baseline's
        relay, and one straight to a sink; the load (smtp-source into
        Postfix) alternates between the domains."""
        args = self.args
        skip = PrivatePostfix.unavailable(self.tools)
        if skip is None and self.tools.load_client != "smtp-source":
            skip = "needs smtp-source (the recipient's domain picks the route)"
        if skip:
            progress(f"{FRONT_CASE} skipped: {skip}")
            return {"name": FRONT_CASE, "skipped": skip}
        relays: dict[str, Relay] = {}
        front: PostfixFront | None = None
        try:
            if "relay" in args.systems:
                relays["front-relay"] = self.relay("front")
                for workers in args.front_workers:
                    relays[f"front-relay-w{workers}"] = self.relay(
                        f"front-w{workers}", extra_env={"SMTP_DUP_SMTP_WORKERS": str(workers)})
            if self.baseline is not None and "before" in args.systems:
                relays["front-before"] = self.relay("front", before=True)
            sink = self.sink("front-direct")
            domains = {"postfix-sink": "sink.front.invalid"}
            domains.update({name: f"{name}.front.invalid" for name in relays})
            ports = {domains["postfix-sink"]: sink.port}
            ports.update({domains[name]: relay.port for name, relay in relays.items()})
            progress(f"{FRONT_CASE}: starting a private Postfix in front ({', '.join(domains.values())})")
            front = PostfixFront(self.procs, self.workdir, self.tools, ports, log=args.postfix_log)
            self.others.append(front)
            front.start()
            systems: dict[str, System] = {"postfix-sink": FrontRoute("postfix-sink", front, domains["postfix-sink"],
                                                                     [sink])}
            for name, relay in relays.items():
                systems[name] = FrontRoute(name, front, domains[name], relay.sinks, relay)
            results = alternate(self, FRONT_LOAD, systems, lambda name: args.messages,
                                on_failure=lambda name: front.drop_queue())
            ratios = {}
            for name in relays:
                ratios[f"{name}_vs_postfix_sink_e2e"] = run_ratios(results, name, "postfix-sink", "e2e_msg_per_s")
            if "front-before" in results and "front-relay" in results:
                ratios["front-relay_vs_front-before_e2e"] = run_ratios(results, "front-relay", "front-before",
                                                                       "e2e_msg_per_s")
                ratios["front-relay_vs_front-before_cpu"] = run_ratios(results, "front-relay", "front-before",
                                                                       "cpu_us_per_msg")
            return {
                "name": FRONT_CASE,
                "description": "smtp-source into a private Postfix; its transport map sends each test domain "
                               "to smtpdup (primary + 2 backups), or to one sink (postfix-sink)",
                "size_bytes": FRONT_LOAD.size_bytes,
                "recipients": 1,
                "reuse": True,
                "sessions": args.sessions,
                "routes": domains,
                "relay_log": {name: r.log_summary() for name, r in relays.items()} or None,
                "systems": results,
                "ratios": ratios,
            }
        except (BenchError, OSError, subprocess.TimeoutExpired) as exc:
            progress(f"{FRONT_CASE}: FAILED: {exc}")
            return {"name": FRONT_CASE, "error": str(exc)}
        finally:
            if front is not None:
                front.stop()
                self.others.remove(front)
            for relay in relays.values():
                relay.stop()
