#!/usr/bin/env python3
"""smtpdup benchmark: DIRECT vs POSTFIX vs RELAY on loopback.

    .venv/bin/python bench/run.py            # or: make bench
    .venv/bin/python bench/run.py --quick    # a smoke run (~1 minute)

Systems (every destination is Postfix's smtp-sink, the load is smtp-source,
20 sessions):

- DIRECT: smtp-source straight into one smtp-sink: the machine's ceiling.
- POSTFIX: a private Postfix instance (own config and queue directory under
  a temp dir) relaying to a primary sink, with ``always_bcc`` expanded to
  two backup sinks: what an operator would run instead of smtpdup.
- RELAY: smtpdup (a subprocess) with a primary and two backups, spool on.

Every case runs each system ``--runs`` times, the systems alternated within
each run (ratios are taken within a run, then the median). A run counts
client-side msg/s (until smtp-source exits) and end-to-end msg/s (until
every sink has counted every copy, read from ``smtp-sink -c``'s counters),
the relay's CPU per message (/proc/<pid>/stat) and peak RSS (VmHWM).
Extras: latency at half the relay's peak rate (bench/latency.py) against
DIRECT, 10,000 idle connections, one 100 MiB message, a 10,000-copy backlog.

Results: ``<out>/<UTC timestamp>.json`` (raw runs and medians) and a Markdown
report on stdout and in ``<out>/latest.md``. Progress goes to stderr. See
bench/README.md for how to read it. Every process started here is stopped by
its PID (Postfix by ``postfix -c DIR stop``, then its master's PID) on the
way out, also on Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import fnmatch
import grp
import json
import os
import platform
import pwd
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import latency  # noqa: E402
import profile_summary  # noqa: E402
from smtpclient import SmtpConnection, SmtpError, load as python_load  # noqa: E402

KIB = 1024
MIB = 1024 * KIB
LOCALHOST = "127.0.0.1"
SENDER = "bench@example.com"
RECIPIENT = "rcpt@example.net"
HELO = "bench.example"

# -- bounds: every wait in this file has one ---------------------------------
START_TIMEOUT_SECONDS = 20.0  # a server's greeting after start
STOP_TIMEOUT_SECONDS = 15.0  # after SIGTERM, before SIGKILL
NO_PROGRESS_SECONDS = 45.0  # sinks counting nothing new: the run failed
LOAD_TIMEOUT_SECONDS = 900.0  # one smtp-source invocation
POLL_SECONDS = 0.002  # first sink poll interval after the client is done
MAX_POLL_SECONDS = 0.02
SETTLE_SECONDS = 0.5  # between runs: backup workers linger, sockets close
WARMUP_MESSAGES = 200  # one discarded run per system and case before the measured ones
SMTP_SINK_MAX_CONNECTIONS = 2000
SMTP_SINK_BACKLOG = 1024

SYSTEMS = ("direct", "postfix", "relay")
LABEL = {"direct": "DIRECT", "postfix": "POSTFIX", "relay": "RELAY"}
EXTRAS = ("latency", "idle", "big-message", "backlog")

# SMTP_DUP_* settings given with --relay-env, applied to every relay.
relay_env_overrides: dict[str, str] = {}

# The targets this bench evaluates (issue: "Targets to evaluate").
TARGET_CASE = "1k-1rcpt-reuse"
TARGET_NOREUSE_CASE = "1k-1rcpt-noreuse"
TARGET_PRIMARY_ONLY_CASE = "primary-only-1k-1rcpt-reuse"


class BenchError(Exception):
    """A run or a setup step failed; the message is one line for the log."""


_started = time.monotonic()


def progress(message: str) -> None:
    print(f"[bench {time.monotonic() - _started:7.1f}s] {message}", file=sys.stderr, flush=True)


# --- processes ----------------------------------------------------------------


class Processes:
    """Every process this bench starts, to stop each by its PID."""

    def __init__(self) -> None:
        self._procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(argv, **kwargs)
        self._procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_SECONDS) -> int | None:
        """SIGTERM, bounded wait, SIGKILL; returns the exit status."""
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                progress(f"pid {proc.pid} ignored SIGTERM for {timeout}s: SIGKILL")
                proc.kill()
                try:
                    proc.wait(5.0)
                except subprocess.TimeoutExpired:
                    pass
            except ProcessLookupError:
                pass
        self._procs = [(n, p) for n, p in self._procs if p is not proc]
        return proc.returncode

    def stop_all(self) -> None:
        for _, proc in reversed(list(self._procs)):
            self.stop(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def wait_for_greeting(port: int, proc: subprocess.Popen | None, what: str,
                      timeout: float = START_TIMEOUT_SECONDS) -> None:
    """Until a 220 greeting comes from ``port`` (bounded); BenchError if the
    process exits first."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} before listening")
        try:
            conn = SmtpConnection(LOCALHOST, port, timeout_seconds=2.0)
        except (OSError, SmtpError) as exc:
            last = str(exc)
            time.sleep(0.05)
            continue
        conn.quit()
        return
    raise BenchError(f"{what} did not greet on port {port} within {timeout}s ({last})")


def cpu_ticks(pid: int, children: bool = False) -> int:
    """utime + stime of ``pid`` (all threads), in clock ticks; with
    ``children``, plus what its reaped children used."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks


def descendants(root_pid: int) -> list[int]:
    """The live descendants of a process (children, their children ...)."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                parents[int(entry.name)] = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found: list[int] = []
    frontier = [root_pid]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def process_tree_ticks(root_pid: int) -> int:
    """CPU of a process, its reaped children, and its live descendants."""
    total = cpu_ticks(root_pid, children=True)
    for pid in descendants(root_pid):
        try:
            total += cpu_ticks(pid)
        except OSError:
            pass  # exited meanwhile: its time moved to its parent's cutime
    return total


def tree_status_kib(root_pid: int, key: str) -> int | None:
    """Sum of a /proc/<pid>/status value (VmRSS, VmHWM) over a process and
    its descendants (smtp.workers > 1 forks relay processes)."""
    values = [proc_status_kib(pid, key) for pid in [root_pid, *descendants(root_pid)]]
    known = [v for v in values if v is not None]
    return sum(known) if known else None


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proc_status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# --- sinks ----------------------------------------------------------------------


class Sink:
    """One destination that counts what it receives.

    Postfix's smtp-sink with ``-c`` prints ``sess=N quit=N mesg=N\\r`` to
    stdout after every session and every final dot; stdout is a file here, and
    ``count`` reads its last bytes (one pread, no parsing of the history).
    Without Postfix, ``smtpdup sink`` stores each message as a file and
    ``count`` counts them (slower; fine for a smoke run).
    """

    TAIL_BYTES = 256
    _COUNTERS = re.compile(rb"sess=(\d+) quit=\d+ mesg=(\d+)\r")

    def __init__(self, procs: Processes, workdir: Path, name: str, tools: Tools, port: int | None = None) -> None:
        self.procs = procs
        self.name = name
        self.tools = tools
        self.port = port or free_port()
        self.dir = workdir / f"sink-{name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self._fd: int | None = None

    def start(self) -> Sink:
        counts = self.dir / "counters"
        if self.tools.smtp_sink:
            argv = [self.tools.smtp_sink, "-c", "-m", str(SMTP_SINK_MAX_CONNECTIONS)]
            if os.geteuid() == 0:
                argv += ["-u", self.tools.unprivileged_user]  # required when run as root
            argv += [f"{LOCALHOST}:{self.port}", str(SMTP_SINK_BACKLOG)]
            out = open(counts, "wb")
            try:
                self.proc = self.procs.start(f"sink {self.name}", argv, stdout=out, stderr=subprocess.DEVNULL,
                                             stdin=subprocess.DEVNULL)
            finally:
                out.close()
            self._fd = os.open(counts, os.O_RDONLY)
        else:
            argv = [sys.executable, "-m", "smtpdup", "sink", "--listen", f"{LOCALHOST}:{self.port}",
                    "--maildir", str(self.dir / "maildir")]
            self.proc = self.procs.start(f"sink {self.name}", argv, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, cwd=ROOT)
        wait_for_greeting(self.port, self.proc, f"sink {self.name}")
        return self

    def count(self) -> int:
        """Messages received since start."""
        if self._fd is not None:
            return self.counters()[1]
        try:
            return sum(1 for _ in os.scandir(self.dir / "maildir" / "new"))
        except FileNotFoundError:
            return 0

    def counters(self) -> tuple[int, int]:
        """(sessions, messages) since start; sessions are -1 for `smtpdup sink`."""
        if self._fd is None:
            return -1, self.count()
        size = os.fstat(self._fd).st_size
        data = os.pread(self._fd, self.TAIL_BYTES, max(0, size - self.TAIL_BYTES))
        matches = self._COUNTERS.findall(data)
        return (int(matches[-1][0]), int(matches[-1][1])) if matches else (0, 0)

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc)
            self.proc = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --- the systems under test -------------------------------------------------------


@dataclass
class Tools:
    smtp_source: str | None
    smtp_sink: str | None
    postfix: str | None
    postconf: str | None
    load_client: str  # "smtp-source" or "python"
    unprivileged_user: str = "nobody"


def find_tools(choice: str) -> Tools:
    def which(name: str) -> str | None:
        return shutil.which(name) or next(
            (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)

    smtp_source = which("smtp-source")
    if choice == "smtp-source" and not smtp_source:
        raise BenchError("smtp-source not found (it comes with Postfix: apt-get install postfix)")
    load_client = "smtp-source" if smtp_source and choice != "python" else "python"
    user = "nobody"
    try:
        pwd.getpwnam("postfix")
        user = "postfix"
    except KeyError:
        pass
    return Tools(smtp_source, which("smtp-sink"), which("postfix"), which("postconf"), load_client, user)


class System:
    """Something smtp-source sends to, and the sinks that count the copies."""

    name = ""

    def __init__(self, port: int, sinks: list[Sink]) -> None:
        self.port = port
        self.sinks = sinks

    def cpu_ticks(self) -> int | None:
        return None

    def peak_rss_kib(self) -> int | None:
        return None


class Direct(System):
    name = "direct"


class Relay(System):
    """smtpdup in a subprocess, configured through the environment only."""

    name = "relay"

    def __init__(self, procs: Processes, workdir: Path, label: str, primary: Sink, backups: list[Sink],
                 *, backup_ports: list[int] | None = None, extra_env: dict[str, str] | None = None) -> None:
        super().__init__(free_port(), [primary, *backups])
        self.procs = procs
        self.label = label
        self.dir = workdir / f"relay-{label}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.spool_dir = self.dir / "spool"
        self.log_path = self.dir / "relay.log"
        config = self.dir / "empty.yaml"
        config.write_text("# smtpdup bench: everything comes from the environment\n")
        ports = backup_ports if backup_ports is not None else [s.port for s in backups]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SMTP_DUP_")}
        self.env.update({
            "SMTP_DUP_CONFIG": str(config),
            "SMTP_DUP_SMTP_LISTEN": f"{LOCALHOST}:{self.port}",
            "SMTP_DUP_METRICS_LISTEN": "",
            "SMTP_DUP_RELAY_DESTINATION_PRIMARY": f"{LOCALHOST}:{primary.port}",
            "SMTP_DUP_RELAY_DESTINATION_BACKUPS": ",".join(f"{LOCALHOST}:{p}" for p in ports),
            "SMTP_DUP_RELAY_SPOOL_DIR": str(self.spool_dir),
            "SMTP_DUP_LOG_LEVEL": "warning",
            "SMTP_DUP_SMTP_SHUTDOWN_GRACE_SECONDS": "2",
        })
        self.env.update(relay_env_overrides)
        self.env.update(extra_env or {})
        self.proc: subprocess.Popen | None = None

    def start(self) -> Relay:
        log = open(self.log_path, "ab")
        try:
            self.proc = self.procs.start(f"relay {self.label}", [sys.executable, "-m", "smtpdup"], env=self.env,
                                         cwd=self.dir, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        try:
            wait_for_greeting(self.port, self.proc, f"relay {self.label}")
        except BenchError as exc:
            raise BenchError(f"{exc}; log: {self.log_tail()}") from None
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # With smtp.workers > 1 the relay is a supervisor and its forked
    # workers: CPU and memory are summed over the process tree (peak RSS
    # then is the sum of each process's peak, an upper bound).

    def cpu_ticks(self) -> int | None:
        try:
            return process_tree_ticks(self.pid)
        except OSError:
            return None

    def peak_rss_kib(self) -> int | None:
        return tree_status_kib(self.pid, "VmHWM")

    def rss_kib(self) -> int | None:
        return tree_status_kib(self.pid, "VmRSS")

    def reset_peak_rss(self) -> bool:
        """Reset VmHWM to the current RSS (Linux: ``5 > clear_refs``)."""
        ok = True
        for pid in [self.pid, *descendants(self.pid)]:
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                ok = False
        return ok

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def log_summary(self) -> dict:
        """How many lines the relay logged (warnings and up) and the last ones."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        return {"lines": len(lines), "last": lines[-3:]}

    def stop(self) -> None:
        if self.proc is not None:
            status = self.procs.stop(self.proc)
            if status not in (0, None):
                progress(f"relay {self.label} exited with status {status}: {self.log_tail()}")
            self.proc = None


class Postfix(System):
    """A private Postfix instance: own config_directory and queue_directory,
    an smtpd on a loopback port, everything relayed to the primary sink and
    ``always_bcc`` expanded (virtual alias) to one address per backup sink,
    each routed by transport_maps to its sink. No DNS anywhere."""

    name = "postfix"

    def __init__(self, procs: Processes, workdir: Path, tools: Tools, primary: Sink, backups: list[Sink],
                 *, log: bool = False) -> None:
        super().__init__(free_port(), [primary, *backups])
        self.procs = procs
        self.tools = tools
        self.dir = workdir / "postfix"
        self.etc = self.dir / "etc"
        self.queue = self.dir / "queue"
        self.data = self.dir / "data"
        self.log = log
        self.started = False

    @staticmethod
    def unavailable(tools: Tools) -> str | None:
        """Why a private Postfix cannot run here, or None."""
        if not tools.postfix:
            return "postfix is not installed"
        if os.geteuid() != 0:
            return "a private Postfix instance needs root (postfix start)"
        try:
            pwd.getpwnam("postfix")
            grp.getgrnam("postdrop")
        except KeyError:
            return "the postfix user or the postdrop group is missing"
        return None

    def _write_config(self) -> None:
        for d in (self.etc, self.queue, self.data):
            d.mkdir(parents=True, exist_ok=True)
        primary, *backups = self.sinks
        transport = "".join(f"backup{i}.invalid smtp:[{LOCALHOST}]:{s.port}\n" for i, s in enumerate(backups, 1))
        aliases = ", ".join(f"copy@backup{i}.invalid" for i in range(1, len(backups) + 1))
        (self.etc / "transport").write_text(transport)
        (self.etc / "virtual").write_text(f"backups@bcc.invalid {aliases}\n" if backups else "")
        main = f"""\
# smtpdup bench: a private Postfix instance (generated)
compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {self.data}
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = loopback-only
inet_protocols = ipv4
myhostname = postfix-bench.localdomain
mydomain = localdomain
myorigin = $myhostname
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_peername_lookup = no
disable_dns_lookups = yes
smtp_host_lookup = native
lmtp_host_lookup = native
relayhost = [{LOCALHOST}]:{primary.port}
transport_maps = texthash:{self.etc}/transport
virtual_alias_maps = texthash:{self.etc}/virtual
biff = no
"""
        if backups:
            main += "always_bcc = backups@bcc.invalid\n"
        if self.log:
            main += f"maillog_file = {self.dir}/maillog\nmaillog_file_prefixes = {self.dir}\n"
        (self.etc / "main.cf").write_text(main)
        services = [
            f"{LOCALHOST}:{self.port} inet n - n - - smtpd",
            "pickup unix n - n 60 1 pickup",
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "tlsmgr unix - - n 1000? 1 tlsmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "flush unix n - n 1000? 0 flush",
            "proxymap unix - - n - - proxymap",
            "proxywrite unix - - n - 1 proxymap",
            "smtp unix - - n - - smtp",
            "relay unix - - n - - smtp",
            "showq unix n - n - - showq",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
        ]
        if self.log:
            services.append("postlog unix-dgram n - n - 1 postlogd")
        (self.etc / "master.cf").write_text("\n".join(services) + "\n")
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.data, postfix_user.pw_uid, postfix_user.pw_gid)

    def _postfix(self, *words: str) -> None:
        assert self.tools.postfix is not None
        done = subprocess.run([self.tools.postfix, "-c", str(self.etc), *words], capture_output=True,
                              text=True, timeout=60)
        if done.returncode != 0:
            raise BenchError(f"postfix {' '.join(words)} failed ({done.returncode}): "
                             f"{(done.stderr or done.stdout).strip()[-300:]}")

    def start(self) -> Postfix:
        self._write_config()
        self._postfix("check")  # creates the queue directories
        self._postfix("start")
        self.started = True
        wait_for_greeting(self.port, None, "postfix smtpd")
        return self

    def master_pid(self) -> int | None:
        try:
            return int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def cpu_ticks(self) -> int | None:
        pid = self.master_pid()
        if pid is None:
            return None
        try:
            return process_tree_ticks(pid)
        except OSError:
            return None

    def stop(self) -> None:
        if not self.started:
            return
        pid = self.master_pid()
        try:
            self._postfix("stop")
        except (BenchError, subprocess.TimeoutExpired) as exc:
            progress(f"postfix stop: {exc}")
        if pid is not None:
            deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
            while time.monotonic() < deadline and _pid_alive(pid):
                time.sleep(0.1)
            if _pid_alive(pid):
                progress(f"postfix master {pid} still running: SIGKILL")
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.started = False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not running
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


# --- one run ---------------------------------------------------------------------


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
                cases.append(Case(name, size, rcpts, reuse, SYSTEMS,
                                  description=f"{size_name.upper()}iB, {rcpts} recipient(s), "
                                              f"{'connection reuse (-d)' if reuse else 'a connection per message'}"))
    cases.append(Case(TARGET_PRIMARY_ONLY_CASE, KIB, 1, True, ("direct", "relay"), backups=0,
                      description="1 KiB, 1 recipient, reuse; RELAY without backups"))
    return cases


def run_load(tools: Tools, port: int, case: Case, messages: int, sessions: int) -> float:
    """Send ``messages`` as the case says; returns the client's seconds.
    Raises BenchError if the client failed."""
    if tools.load_client == "smtp-source":
        assert tools.smtp_source is not None
        argv = [tools.smtp_source, "-s", str(sessions), "-m", str(messages), "-l", str(case.size_bytes),
                "-f", SENDER, "-t", RECIPIENT, "-M", HELO]
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


def wait_for_sinks(sinks: list[Sink], before: list[int], expected: int) -> list[int]:
    """Until every sink counted ``expected`` more messages than ``before``;
    fails when nothing new arrives for NO_PROGRESS_SECONDS."""
    interval = POLL_SECONDS
    last_counts: list[int] = []
    last_change = time.monotonic()
    while True:
        counts = [s.count() - b for s, b in zip(sinks, before)]
        if all(c >= expected for c in counts):
            return counts
        now = time.monotonic()
        if counts != last_counts:
            last_counts, last_change = counts, now
        elif now - last_change > NO_PROGRESS_SECONDS:
            raise BenchError(f"sinks stuck at {counts} of {expected} for {NO_PROGRESS_SECONDS}s")
        time.sleep(interval)
        interval = min(interval * 1.25, MAX_POLL_SECONDS)


def measure(system: System, tools: Tools, case: Case, messages: int, sessions: int) -> dict:
    """One run of one system: client and end-to-end rates, CPU, peak RSS."""
    sessions_before = [s.counters()[0] for s in system.sinks]
    before = [s.count() for s in system.sinks]
    cpu_before = system.cpu_ticks()
    started = time.perf_counter()
    client_seconds = run_load(tools, system.port, case, messages, sessions)
    counts = wait_for_sinks(system.sinks, before, messages)
    e2e_seconds = time.perf_counter() - started
    cpu_after = system.cpu_ticks()
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
    peak = system.peak_rss_kib()
    if peak is not None:
        run["peak_rss_kib"] = peak
    return run


METRICS = ("client_msg_per_s", "e2e_msg_per_s", "cpu_us_per_msg", "peak_rss_kib", "client_seconds", "e2e_seconds")


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
        if "error" in ra or "error" in rb or not rb.get(key):
            continue
        per_run.append(round(ra[key] / rb[key], 4))
    return {"runs": per_run, "median": round(statistics.median(per_run), 4) if per_run else None}


# --- the bench ----------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    tools: Tools
    workdir: Path
    procs: Processes = field(default_factory=Processes)
    sinks: dict[str, Sink] = field(default_factory=dict)
    postfix: Postfix | None = None
    postfix_skip: str | None = None
    relay_count: int = 0

    def sink(self, name: str) -> Sink:
        if name not in self.sinks:
            self.sinks[name] = Sink(self.procs, self.workdir, name, self.tools).start()
        return self.sinks[name]

    def relay(self, label: str, backups: int = 2, **kwargs) -> Relay:
        self.relay_count += 1
        return Relay(self.procs, self.workdir, f"{self.relay_count}-{label}", self.sink("relay-primary"),
                     [self.sink(f"relay-backup{i}") for i in range(1, backups + 1)], **kwargs).start()

    def postfix_system(self) -> Postfix | None:
        if self.postfix is None and self.postfix_skip is None:
            self.postfix_skip = Postfix.unavailable(self.tools)
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
        if self.postfix is not None:
            self.postfix.stop()
        for sink in self.sinks.values():
            sink.stop()
        self.procs.stop_all()

    # -- throughput cases --

    def run_case(self, case: Case) -> dict:
        args = self.args
        wanted = [s for s in case.systems if s in args.systems]
        systems: dict[str, System] = {}
        setup_errors: dict[str, str] = {}
        relay: Relay | None = None
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
                    elif name == "relay":
                        relay = self.relay(case.name, backups=case.backups)
                        systems[name] = relay
                except BenchError as exc:
                    progress(f"{case.name}: {LABEL[name]} could not start: {exc}")
                    setup_errors[name] = str(exc)
            results: dict[str, dict] = {name: {"runs": []} for name in systems}
            order = list(systems)
            for name in order:  # discarded: fresh processes, cold caches, first connections
                try:
                    measure(systems[name], self.tools, case, min(WARMUP_MESSAGES, args.messages), args.sessions)
                except BenchError as exc:
                    progress(f"{case.name} warm-up {LABEL[name]}: {exc}")
            for run in range(args.runs):
                rotated = order[run % len(order):] + order[:run % len(order)] if order else []
                for name in rotated:
                    messages = args.messages * (args.direct_factor if name == "direct" else 1)
                    try:
                        if relay is not None and name == "relay" and not relay.alive():
                            raise BenchError(f"relay died: {relay.log_tail()}")
                        result = measure(systems[name], self.tools, case, messages, args.sessions)
                        progress(f"{case.name} run {run + 1}/{args.runs} {LABEL[name]:7s} "
                                 f"client {result['client_msg_per_s']:8.1f} msg/s, e2e {result['e2e_msg_per_s']:8.1f} msg/s"
                                 + (f", cpu {result['cpu_us_per_msg']:.0f} µs/msg" if 'cpu_us_per_msg' in result else ""))
                    except BenchError as exc:
                        result = {"messages": messages, "error": str(exc)}
                        progress(f"{case.name} run {run + 1}/{args.runs} {LABEL[name]}: FAILED: {exc}")
                    results[name]["runs"].append(result)
                    time.sleep(SETTLE_SECONDS)
            for name in results:
                results[name]["median"] = medians(results[name]["runs"])
            for name, error in setup_errors.items():
                results[name] = {"runs": [], "median": medians([]), "error": error}
            return {
                "relay_log": relay.log_summary() if relay is not None else None,
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
                },
            }
        finally:
            if relay is not None:
                relay.stop()

    # -- extras --

    def latency(self, peak_rate: float | None) -> dict:
        args = self.args
        relay = self.relay("latency")
        try:
            if not peak_rate:
                progress("latency: calibrating the relay's peak rate (one 1k-1rcpt-reuse run)")
                case = next(c for c in main_cases() if c.name == TARGET_CASE)
                peak_rate = measure(relay, self.tools, case, args.messages, args.sessions)["e2e_msg_per_s"]
            else:  # discarded: a fresh relay, cold caches, first connections
                case = next(c for c in main_cases() if c.name == TARGET_CASE)
                measure(relay, self.tools, case, min(WARMUP_MESSAGES, args.messages), args.sessions)
            rate = max(1.0, round(peak_rate / 2, 1))
            direct = self.sink("direct")
            out: dict = {"peak_rate_per_s": peak_rate, "rate_per_s": rate, "seconds": args.latency_seconds,
                         "workers": args.latency_workers, "size_bytes": KIB, "recipients": 1,
                         "direct": {"runs": []}, "relay": {"runs": []}}
            for run in range(args.runs):
                order = [("direct", direct.port), ("relay", relay.port)]
                if run % 2:
                    order.reverse()
                for name, port in order:
                    try:
                        result = latency.measure(LOCALHOST, port, rate=rate, seconds=args.latency_seconds,
                                                 workers=args.latency_workers, size_bytes=KIB, recipients=1)
                    except (OSError, SmtpError, ValueError) as exc:
                        result = {"error": str(exc)}
                    out[name]["runs"].append(result)
                    progress(f"latency run {run + 1}/{args.runs} {LABEL[name]:7s} at {rate} msg/s: "
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

    def idle(self) -> dict:
        args = self.args
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
        relay = self.relay("idle", extra_env={"SMTP_DUP_SMTP_MAX_CONNECTIONS": str(max(20000, count * 2))})
        case = next(c for c in main_cases() if c.name == TARGET_CASE)
        held: list[socket.socket] = []
        out: dict = {"connections": count, "without_idle": {"runs": []}, "with_idle": {"runs": []}}
        try:
            measure(relay, self.tools, case, min(WARMUP_MESSAGES, args.messages), args.sessions)  # discarded
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
                        result = measure(relay, self.tools, case, args.messages, args.sessions)
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
            alive = sum(1 for s in held if _still_open(s))
            out["still_open_after_load"] = alive
            return out
        finally:
            for s in held:
                s.close()
            relay.stop()

    def big_message(self) -> dict:
        args = self.args
        size = args.big_message_mib * MIB
        relay = self.relay("big", extra_env={"SMTP_DUP_SMTP_MAX_MESSAGE_BYTES": str(size * 2 + MIB)})
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

    def backlog(self) -> dict:
        args = self.args
        copies = args.backlog_copies
        backup_port = free_port()  # nothing listens here until the drain
        relay = self.relay("backlog", backups=0, backup_ports=[backup_port], extra_env={
            "SMTP_DUP_RELAY_RETRY_INITIAL_SECONDS": "86400",
            "SMTP_DUP_RELAY_RETRY_MAX_INTERVAL_SECONDS": "86400",
        })
        backup: Sink | None = None
        try:
            case = next(c for c in main_cases() if c.name == TARGET_CASE)
            warmup = min(100, copies)
            measure(relay, self.tools, case, warmup, args.sessions)  # counts at the primary only
            wait_for_spool(relay.spool_dir, warmup)
            time.sleep(1.0)
            reset = relay.reset_peak_rss()
            rss_before = relay.rss_kib()
            started = time.perf_counter()
            run = measure(relay, self.tools, case, copies, args.sessions)
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
            backup = Sink(self.procs, self.workdir, "backlog-backup", self.tools, port=backup_port).start()
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

    # -- profile --

    def profile(self) -> dict:
        args = self.args
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.access(py_spy, os.X_OK):
            raise BenchError("py-spy not found: .venv/bin/pip install py-spy")
        case = next(c for c in main_cases() if c.name == args.profile_case)
        relay = self.relay(f"profile-{case.name}", backups=case.backups)
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        messages = args.messages
        try:
            warm = measure(relay, self.tools, case, messages, args.sessions)
            progress(f"profile: warm-up run {warm['e2e_msg_per_s']} msg/s e2e, {warm.get('cpu_us_per_msg')} µs/msg")
            runs = {}
            for fmt, path in (("raw", out_dir / "profile-relay.folded"), ("flamegraph", out_dir / "profile-relay.svg")):
                spy = self.procs.start("py-spy", [py_spy, "record", "--pid", str(relay.pid), "--subprocesses", "--rate",
                                                  str(args.profile_rate), "--nonblocking", "--format", fmt,
                                                  "-o", str(path)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                time.sleep(1.0)  # attached
                runs[fmt] = measure(relay, self.tools, case, messages, args.sessions)
                spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                try:
                    spy.wait(60)
                except subprocess.TimeoutExpired:
                    pass
                self.procs.stop(spy)
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
    """Until ``copies`` messages sit in the spool, each attempted once (its
    state file written); returns how many are pending."""
    msg = spool_dir / "msg"
    deadline = time.monotonic() + timeout
    while True:
        names = [e.name for e in os.scandir(msg)] if msg.exists() else []
        states = sum(1 for n in names if n.endswith(".state"))
        messages = len(names) - states
        if messages >= copies and states >= messages:
            return messages
        if time.monotonic() > deadline:
            raise BenchError(f"spool: {messages} messages, {states} attempted, expected {copies}")
        time.sleep(0.2)


def open_idle(port: int, count: int, batch: int = 50, timeout: float = 120.0) -> list[socket.socket]:
    """Open ``count`` connections and read each one's greeting; in batches
    so that the relay's listen backlog never overflows (a dropped SYN costs
    a second)."""
    import selectors

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


def _still_open(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


# --- targets, report -----------------------------------------------------------


def find_case(results: dict, name: str) -> dict | None:
    return next((c for c in results["cases"] if c["name"] == name), None)


def evaluate_targets(results: dict) -> list[dict]:
    targets = []

    def add(name: str, value: float | None, op: str, goal: float, unit: str) -> None:
        met = None if value is None else (value >= goal if op == ">=" else value <= goal if op == "<=" else value < goal)
        targets.append({"target": name, "measured": value, "op": op, "goal": goal, "unit": unit, "met": met})

    def ratio(case_name: str, key: str) -> float | None:
        case = find_case(results, case_name)
        return case["ratios"][key].get("median") if case and case["ratios"].get(key) else None

    main = find_case(results, TARGET_CASE)
    add("RELAY e2e / DIRECT (1 KiB, 1 rcpt, 2 backups, reuse)", ratio(TARGET_CASE, "relay_vs_direct_e2e"),
        ">=", 0.14, "×")
    add("RELAY e2e / POSTFIX e2e (same case)", ratio(TARGET_CASE, "relay_vs_postfix_e2e"), ">=", 7.0, "×")
    add("RELAY primary-only e2e / DIRECT (1 KiB, 1 rcpt, reuse)",
        ratio(TARGET_PRIMARY_ONLY_CASE, "relay_vs_direct_e2e"), ">=", 0.35, "×")
    add("RELAY e2e / DIRECT without reuse (1 KiB, 1 rcpt, 2 backups)",
        ratio(TARGET_NOREUSE_CASE, "relay_vs_direct_e2e"), ">=", 0.23, "×")
    cpu = main["systems"].get("relay", {}).get("median", {}).get("cpu_us_per_msg") if main else None
    add("relay CPU per message (1 KiB, 1 rcpt, 2 backups, reuse)", cpu, "<=", 250, "µs")
    lat = results["extras"].get("latency") or {}
    add("added latency p50 at half the relay's peak rate", lat.get("added_p50_ms"), "<=", 2.0, "ms")
    add("added latency p99 at half the relay's peak rate", lat.get("added_p99_ms"), "<=", 10.0, "ms")
    idle = results["extras"].get("idle") or {}
    add(f"RSS per idle connection ({idle.get('connections', 10000)} idle)", idle.get("rss_per_connection_kib"),
        "<=", 10.0, "KiB")
    add("e2e throughput with idle connections / without", idle.get("throughput_ratio"), ">=", 0.90, "×")
    big = results["extras"].get("big-message") or {}
    growth = big.get("rss_growth_kib")
    add(f"RSS growth, one {round(big.get('content_bytes', 100 * MIB) / MIB)} MiB message",
        None if growth is None else round(growth / KIB, 2), "<", 16.0, "MiB")
    backlog = results["extras"].get("backlog") or {}
    growth = backlog.get("peak_rss_growth_kib")
    add(f"RSS growth, backlog of {backlog.get('pending', 10000)} copies",
        None if growth is None else round(growth / KIB, 2), "<", 16.0, "MiB")
    return targets


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"### smtpdup benchmark — {meta['timestamp']}",
        "",
        f"Commit `{meta['git_commit']}`{' (smtpdup/ modified)' if meta.get('git_dirty') else ''}"
        f"{' (smtpdup/ changed during the run!)' if meta.get('source_digest_end') != meta.get('source_digest_start') else ''}, "
        f"{meta['cpu_count']} CPUs, Python {meta['python']}, Postfix {meta.get('postfix_version') or '–'}, "
        f"load client {meta['load_client']}, spool on {meta.get('spool_filesystem') or '?'}; "
        f"{meta['runs']} run(s) per case, medians; {meta['sessions']} sessions; "
        f"{meta['messages']} messages per RELAY/POSTFIX run, {meta['messages'] * meta['direct_factor']} per DIRECT run; "
        f"load average {meta['loadavg_start']} at start"
        + (f"; relay settings {' '.join(f'{k}={v}' for k, v in meta['relay_env'].items())}" if meta.get("relay_env")
           else "") + ".",
        "",
        f"Command: `{meta['command']}`",
        "",
        "| case | DIRECT e2e | POSTFIX client | POSTFIX e2e | RELAY client | RELAY e2e "
        "| RELAY/DIRECT | RELAY/POSTFIX | relay CPU µs/msg | POSTFIX CPU µs/msg | relay peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in results["cases"]:
        systems = case["systems"]

        def med(system: str, key: str) -> float | None:
            return systems.get(system, {}).get("median", {}).get(key)

        rss = med("relay", "peak_rss_kib")
        lines.append(
            f"| {case['name']} | {_fmt(med('direct', 'e2e_msg_per_s'))} | {_fmt(med('postfix', 'client_msg_per_s'))} "
            f"| {_fmt(med('postfix', 'e2e_msg_per_s'))} | {_fmt(med('relay', 'client_msg_per_s'))} "
            f"| {_fmt(med('relay', 'e2e_msg_per_s'))} "
            f"| {_fmt(case['ratios']['relay_vs_direct_e2e'].get('median'), 3)} "
            f"| {_fmt(case['ratios']['relay_vs_postfix_e2e'].get('median'), 2)} "
            f"| {_fmt(med('relay', 'cpu_us_per_msg'))} | {_fmt(med('postfix', 'cpu_us_per_msg'))} "
            f"| {_fmt(None if rss is None else rss / KIB, 1)} |"
        )
    lines += ["", "Throughput in msg/s; e2e = until every copy reached every sink. Ratios are e2e, per run, "
              "then the median. CPU per message: the relay process; every process of the Postfix instance. "
              "Failed runs are left out (see the JSON)."]
    extras = results["extras"]
    lat = extras.get("latency")
    if lat:
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
    if idle:
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
    for name, value in extras.items():
        if isinstance(value, dict) and "error" in value:
            lines += ["", f"{name}: FAILED: {value['error']}"]
    lines += ["", "| target | measured | goal | met |", "|---|---:|---:|---|"]
    for t in results["targets"]:
        unit = t["unit"]
        value = t["measured"]
        shown = "–" if value is None else (f"{value:.3f}{unit}" if unit == "×" else f"{value:,.2f} {unit}")
        goal = f"{t['op']} {t['goal']}{unit}" if unit == "×" else f"{t['op']} {t['goal']} {unit}"
        met = "not measured" if t["met"] is None else ("met" if t["met"] else "**not met**")
        lines.append(f"| {t['target']} | {shown} | {goal} | {met} |")
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
    import hashlib

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


def postfix_version(tools: Tools) -> str | None:
    if not tools.postconf:
        return None
    try:
        out = subprocess.run([tools.postconf, "-d", "-h", "mail_version"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


# --- command line ---------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.split("\n\n")[0],
        epilog="Case names: " + ", ".join(c.name for c in main_cases()) + "; extras: " + ", ".join(EXTRAS) +
               ". See bench/README.md.")
    parser.add_argument("--quick", action="store_true", help="small counts, 1 run: a smoke test")
    parser.add_argument("--runs", type=int, help="runs per case (default 3; --quick 1)")
    parser.add_argument("--messages", type=int, help="messages per RELAY/POSTFIX run (default 1000; --quick 40)")
    parser.add_argument("--direct-factor", type=int,
                        help="DIRECT sends this many times --messages, to run long enough to time (default 5)")
    parser.add_argument("--sessions", type=int, default=20, help="parallel sessions (smtp-source -s; default 20)")
    parser.add_argument("--cases", default="*",
                        help="comma-separated names or shell patterns of cases and extras to run (default: all)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="subset of direct,postfix,relay")
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
    parser.add_argument("--postfix-log", action="store_true", help="Postfix logs to <tmp>/postfix/maillog (keep with --keep-temp)")
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
    args.systems = [s.strip().lower() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        parser.error(f"--systems: unknown {', '.join(unknown)} (choose from {', '.join(SYSTEMS)})")
    args.patterns = [p.strip() for p in args.cases.split(",") if p.strip()]
    known = [c.name for c in main_cases()] + list(EXTRAS)
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
    workdir = Path(tempfile.mkdtemp(prefix="smtpdup-bench-", dir=args.tmpdir))
    os.chmod(workdir, 0o755)  # Postfix daemons (user postfix) must reach their queue below it
    bench = Bench(args, tools, workdir)
    timestamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    words = sys.argv[1:] if argv is None else argv
    if os.environ.get("MAKELEVEL"):
        command = "make bench" + (f" BENCH_ARGS={shlex.quote(' '.join(words))}" if words else "")
    else:
        command = " ".join([".venv/bin/python bench/run.py", *map(shlex.quote, words)])
    results: dict = {
        "meta": {
            "timestamp": timestamp,
            "command": command,
            "cpu_count": os.cpu_count(),
            "git_commit": git_commit(),
            "git_dirty": git_dirty(),
            "source_digest_start": source_digest(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "postfix_version": postfix_version(tools),
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
        if args.profile:
            results["profile"] = bench.profile()
            progress(f"profile written to {Path(args.out) / 'profile-relay.txt'}")
            return 0
        for case in main_cases():
            if selected(args, case.name):
                progress(f"case {case.name}: {case.description}")
                results["cases"].append(bench.run_case(case))
        peak = None
        main_case = find_case(results, TARGET_CASE)
        if main_case:
            peak = main_case["systems"].get("relay", {}).get("median", {}).get("e2e_msg_per_s")
        for name, method in (("latency", lambda: bench.latency(peak)), ("idle", bench.idle),
                             ("big-message", bench.big_message), ("backlog", bench.backlog)):
            if not selected(args, name) or "relay" not in args.systems:
                continue
            progress(f"extra {name}")
            try:
                results["extras"][name] = method()
            except (BenchError, OSError, SmtpError) as exc:
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
    results["meta"]["duration_seconds"] = round(time.monotonic() - _started, 1)
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
    failed = sum(c["systems"][s]["median"]["runs_failed"] for c in results["cases"] for s in c["systems"])
    progress(f"done in {results['meta']['duration_seconds']}s: {met} of {measured} measured targets met, "
             f"{failed} failed run(s); results in {path} and {out / 'latest.md'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
