"""The systems the benchmark drives, and the sinks that count what they deliver.

- ``Sink``: Postfix's smtp-sink (or ``smtpdup sink``), counting messages.
- ``Direct``: the load straight into one sink.
- ``Relay``: smtpdup in a subprocess, configured through ``SMTP_DUP_*``
  only; the BEFORE system is the same with ``PYTHONPATH`` on a ``Baseline``.
- ``Baseline``: a commit checked out in a ``git worktree`` (temporary).
- ``Floor``: ``bench/floor.py``, the least a gevent relay does for the same
  job (lockstep primary over pooled sessions, content group-committed to a
  segment file, two backups), as the floor under the relay's CPU per
  message; FLOOR-NODISK the same with nothing on disk.
- ``Postfix``: a private Postfix doing smtpdup's job (``always_bcc``).
- ``PostfixFront``: a private Postfix in front, its transport map sending one
  test domain per route to smtpdup (or straight to a sink), as the README's
  Postfix integration section and ``deploy/postfix/`` describe; each route is
  a ``FrontRoute`` system.

Every process is started through ``probes.Processes`` and stopped by its PID.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from probes import (LOCALHOST, RECIPIENT, STOP_TIMEOUT_SECONDS, BenchError, Processes, descendants, free_port,
                    pid_alive, process_tree_ticks, progress, tree_status_kib, wait_for_greeting)

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent

SMTP_SINK_MAX_CONNECTIONS = 2000
SMTP_SINK_BACKLOG = 1024

# SMTP_DUP_* settings given with --relay-env, applied to every relay.
relay_env_overrides: dict[str, str] = {}


@dataclass
class Tools:
    smtp_source: str | None
    smtp_sink: str | None
    postfix: str | None
    postconf: str | None
    load_client: str  # "smtp-source" or "python"
    unprivileged_user: str = "nobody"


def which(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)


def find_tools(choice: str) -> Tools:
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


# --- systems ----------------------------------------------------------------------


class System:
    """Something the load goes to, and the sinks that count the copies."""

    name = ""
    recipient = RECIPIENT  # smtp-source -t: the domain picks a route in POSTFIX-FRONT

    def __init__(self, port: int, sinks: list[Sink]) -> None:
        self.port = port
        self.sinks = sinks

    def cpu_ticks(self) -> int | None:
        """CPU of the system under test (the relay, or the whole Postfix)."""
        return None

    def other_cpu_ticks(self) -> dict[str, int | None]:
        """CPU of the other programs on the path, by name (Postfix in front)."""
        return {}

    def peak_rss_kib(self) -> int | None:
        return None

    def alive(self) -> bool:
        return True

    def describe_failure(self) -> str:
        return ""


class Direct(System):
    name = "direct"


class Relay(System):
    """smtpdup in a subprocess, configured through the environment only.

    ``python_path``: run the smtpdup found there (a ``Baseline`` checkout)
    instead of this tree's, with the same interpreter and dependencies.
    """

    def __init__(self, procs: Processes, workdir: Path, label: str, primary: Sink, backups: list[Sink],
                 *, backup_ports: list[int] | None = None, extra_env: dict[str, str] | None = None,
                 name: str = "relay", python_path: Path | None = None) -> None:
        super().__init__(free_port(), [primary, *backups])
        self.name = name
        self.procs = procs
        self.label = label
        self.dir = workdir / f"relay-{label}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.spool_dir = self.dir / "spool"
        self.log_path = self.dir / "relay.log"
        config = self.dir / "empty.yaml"
        config.write_text("# smtpdup bench: everything comes from the environment\n")
        ports = backup_ports if backup_ports is not None else [s.port for s in backups]
        self.backup_names = [f"{LOCALHOST}:{p}" for p in ports]  # Destination.name of each backup
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SMTP_DUP_")}
        if python_path is not None:
            self.env["PYTHONPATH"] = str(python_path)
        else:
            self.env.pop("PYTHONPATH", None)
        self.env.update({
            "SMTP_DUP_CONFIG": str(config),
            "SMTP_DUP_SMTP_LISTEN": f"{LOCALHOST}:{self.port}",
            "SMTP_DUP_METRICS_LISTEN": "",
            "SMTP_DUP_RELAY_DESTINATION_PRIMARY": f"{LOCALHOST}:{primary.port}",
            "SMTP_DUP_RELAY_DESTINATION_BACKUPS": ",".join(self.backup_names),
            "SMTP_DUP_RELAY_SPOOL_DIR": str(self.spool_dir),
            "SMTP_DUP_LOG_LEVEL": "warning",
            "SMTP_DUP_SMTP_SHUTDOWN_GRACE_SECONDS": "2",
        })
        self.env.update(relay_env_overrides)
        self.env.update(extra_env or {})
        self.proc: subprocess.Popen | None = None

    def smtpdup(self, *words: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """``python -m smtpdup WORDS`` with this relay's code and settings."""
        return subprocess.run([sys.executable, "-m", "smtpdup", *words], env=self.env, cwd=self.dir,
                              capture_output=True, text=True, timeout=timeout)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "smtpdup"]

    def launch(self) -> subprocess.Popen:
        """Start the process, without waiting for it to listen."""
        log = open(self.log_path, "ab")
        try:
            self.proc = self.procs.start(f"{self.name} {self.label}", self.argv(), env=self.env, cwd=self.dir,
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        return self.proc

    def start(self) -> Relay:
        self.launch()
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

    def describe_failure(self) -> str:
        return f"{self.name} died: {self.log_tail()}"

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


class Floor(Relay):
    """``bench/floor.py`` with the relay's sinks: the same job, nothing more."""

    def __init__(self, procs: Processes, workdir: Path, label: str, primary: Sink, backups: list[Sink],
                 *, disk: bool = True) -> None:
        super().__init__(procs, workdir, label, primary, backups, name="floor" if disk else "floor-nodisk")
        self.disk = disk
        self.primary_port = primary.port
        self.backup_ports = [s.port for s in backups]

    def argv(self) -> list[str]:
        return [sys.executable, str(BENCH_DIR / "floor.py"), "--listen", str(self.port),
                "--primary", str(self.primary_port), "--backups", ",".join(map(str, self.backup_ports)),
                "--spool", str(self.spool_dir)] + ([] if self.disk else ["--no-spool"])


# --- the baseline: another commit's relay -------------------------------------------


class Baseline:
    """Commit ``ref`` checked out with ``git worktree add --detach`` under
    the bench's temp directory; its relay runs with ``PYTHONPATH`` on the
    checkout and this interpreter, so it needs no network and no venv of its
    own (its pinned dependencies are compared with what is installed: a
    difference is reported). ``remove`` deletes the worktree (also on Ctrl-C:
    the bench's ``finally``)."""

    def __init__(self, ref: str, workdir: Path) -> None:
        self.ref = ref
        self.workdir = workdir
        self.path: Path | None = None
        self.commit = ""
        self.notes: list[str] = []

    def _git(self, *words: str, timeout: float = 120.0) -> str:
        done = subprocess.run(["git", *words], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise BenchError(f"git {' '.join(words)}: {(done.stderr or done.stdout).strip()[-300:]}")
        return done.stdout.strip()

    def prepare(self) -> Baseline:
        try:
            self.commit = self._git("rev-parse", "--verify", "--quiet", f"{self.ref}^{{commit}}")
        except BenchError:
            raise BenchError(f"--baseline {self.ref}: not a commit in this repository "
                             f"(try a commit id, a branch or HEAD~1)") from None
        path = self.workdir / f"baseline-{self.commit[:12]}"
        self.path = path  # set first: an interrupted add is removed as well
        self._git("worktree", "add", "--detach", str(path), self.commit)
        probe = subprocess.run([sys.executable, "-c", "import smtpdup; print(smtpdup.__file__)"],
                               env={**os.environ, "PYTHONPATH": str(path)}, cwd=self.workdir,
                               capture_output=True, text=True, timeout=60)
        found = probe.stdout.strip()
        if probe.returncode != 0 or not found.startswith(str(path)):
            raise BenchError(f"--baseline {self.ref}: its smtpdup does not import from {path} "
                             f"({(probe.stderr or found).strip()[-300:]})")
        self.notes = self._requirement_differences()
        for note in self.notes:
            progress(f"baseline {self.commit[:12]}: {note}")
        return self

    def _requirement_differences(self) -> list[str]:
        """Pins in the baseline's requirements.txt that the installed
        packages do not match (it then runs with what is installed)."""
        from importlib import metadata

        assert self.path is not None
        notes = []
        try:
            lines = (self.path / "requirements.txt").read_text().splitlines()
        except OSError:
            return ["no requirements.txt"]
        for line in lines:
            line = line.split("#", 1)[0].strip()
            name, sep, version = line.partition("==")
            if not sep:
                continue
            name = name.split("[", 1)[0].strip()
            try:
                installed = metadata.version(name)
            except metadata.PackageNotFoundError:
                installed = None
            if installed != version.strip():
                notes.append(f"requires {name}=={version.strip()}, installed {installed or 'nothing'}")
        return notes

    def remove(self) -> None:
        if self.path is None:
            return
        path, self.path = self.path, None
        listed = subprocess.run(["git", "worktree", "list", "--porcelain"], cwd=ROOT, capture_output=True,
                                text=True, timeout=60).stdout.splitlines()
        if f"worktree {path}" not in listed:
            shutil.rmtree(path, ignore_errors=True)  # the add did not get that far
            return
        try:
            self._git("worktree", "remove", "--force", str(path), timeout=60)
        except (BenchError, subprocess.TimeoutExpired) as exc:
            progress(f"baseline: {exc}; remove {path} and run `git worktree prune` by hand")


# --- private Postfix instances ----------------------------------------------------------


# Services of a private Postfix instance that only relays (no local
# delivery, no pickup from sendmail).
POSTFIX_SERVICES = [
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


class PrivatePostfix(System):
    """A private Postfix instance: own config_directory and queue_directory
    under the bench's temp dir, an smtpd on a loopback port, no DNS, no local
    delivery. Subclasses say where mail goes (``_routing``)."""

    name = "postfix"

    def __init__(self, procs: Processes, workdir: Path, tools: Tools, dirname: str, sinks: list[Sink],
                 *, log: bool = False) -> None:
        super().__init__(free_port(), sinks)
        self.procs = procs
        self.tools = tools
        self.dir = workdir / dirname
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

    def _routing(self) -> tuple[str, list[str]]:
        """main.cf lines and extra master.cf services for where mail goes."""
        raise NotImplementedError

    def _write_config(self) -> None:
        for d in (self.etc, self.queue, self.data):
            d.mkdir(parents=True, exist_ok=True)
        routing, services = self._routing()
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
biff = no
""" + routing
        if self.log:
            main += f"maillog_file = {self.dir}/maillog\nmaillog_file_prefixes = {self.dir}\n"
        (self.etc / "main.cf").write_text(main)
        lines = [f"{LOCALHOST}:{self.port} inet n - n - - smtpd", *POSTFIX_SERVICES, *services]
        if self.log:
            lines.append("postlog unix-dgram n - n - 1 postlogd")
        (self.etc / "master.cf").write_text("\n".join(lines) + "\n")
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.data, postfix_user.pw_uid, postfix_user.pw_gid)

    def _postfix(self, *words: str) -> None:
        assert self.tools.postfix is not None
        done = subprocess.run([self.tools.postfix, "-c", str(self.etc), *words], capture_output=True,
                              text=True, timeout=60)
        if done.returncode != 0:
            raise BenchError(f"postfix {' '.join(words)} failed ({done.returncode}): "
                             f"{(done.stderr or done.stdout).strip()[-300:]}")

    def start(self) -> PrivatePostfix:
        self._write_config()
        self._postfix("check")  # creates the queue directories
        self._postfix("start")
        self.started = True
        wait_for_greeting(self.port, None, "postfix smtpd")
        return self

    def drop_queue(self) -> None:
        """Delete every queued message (after a failed run, so that late
        deliveries do not count in the next one)."""
        postsuper = which("postsuper")
        if postsuper and self.started:
            subprocess.run([postsuper, "-c", str(self.etc), "-d", "ALL"], capture_output=True, timeout=60)

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
            while time.monotonic() < deadline and pid_alive(pid):
                time.sleep(0.1)
            if pid_alive(pid):
                progress(f"postfix master {pid} still running: SIGKILL")
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.started = False


class Postfix(PrivatePostfix):
    """Postfix doing smtpdup's job: everything relayed to the primary sink
    and ``always_bcc`` expanded (virtual alias) to one address per backup
    sink, each routed by transport_maps to its sink."""

    name = "postfix"

    def __init__(self, procs: Processes, workdir: Path, tools: Tools, primary: Sink, backups: list[Sink],
                 *, log: bool = False) -> None:
        super().__init__(procs, workdir, tools, "postfix", [primary, *backups], log=log)

    def _routing(self) -> tuple[str, list[str]]:
        primary, *backups = self.sinks
        transport = "".join(f"backup{i}.invalid smtp:[{LOCALHOST}]:{s.port}\n" for i, s in enumerate(backups, 1))
        aliases = ", ".join(f"copy@backup{i}.invalid" for i in range(1, len(backups) + 1))
        (self.etc / "transport").write_text(transport)
        (self.etc / "virtual").write_text(f"backups@bcc.invalid {aliases}\n" if backups else "")
        main = (f"relayhost = [{LOCALHOST}]:{primary.port}\n"
                f"transport_maps = texthash:{self.etc}/transport\n"
                f"virtual_alias_maps = texthash:{self.etc}/virtual\n")
        if backups:
            main += "always_bcc = backups@bcc.invalid\n"
        return main, []


# The hop to smtpdup as deploy/postfix/ sets it up: a dedicated clone of the
# smtp client (master.cf.snippet) and its limits (main.cf.snippet).
FRONT_TRANSPORT = "smtpdup"
FRONT_MASTER = [
    f"{FRONT_TRANSPORT} unix - - n - 20 smtp",
    f"  -o syslog_name=postfix/{FRONT_TRANSPORT}",
    "  -o smtp_tls_security_level=none",
    "  -o smtp_connection_cache_on_demand=yes",
    "  -o smtp_connection_reuse_time_limit=300s",
    "  -o smtp_fallback_relay=",
    "  -o smtp_send_xforward_command=no",
    "  -o smtp_connect_timeout=10s",
    "  -o smtp_data_done_timeout=600s",
]
FRONT_MAIN = f"""\
{FRONT_TRANSPORT}_destination_concurrency_limit = 20
{FRONT_TRANSPORT}_initial_destination_concurrency = 5
{FRONT_TRANSPORT}_destination_recipient_limit = 1000
{FRONT_TRANSPORT}_destination_rate_delay = 0s
{FRONT_TRANSPORT}_destination_concurrency_failed_cohort_limit = 10
smtp_connection_cache_on_demand = yes
message_size_limit = 26214400
"""


class PostfixFront(PrivatePostfix):
    """Postfix in front: each route is a relay domain that transport_maps
    sends through the ``smtpdup`` transport clone to a port (smtpdup, or a
    sink for the reference). The load picks the route by its recipient's
    domain, so every route goes through the same Postfix and transport."""

    name = "postfix-front"

    def __init__(self, procs: Processes, workdir: Path, tools: Tools, routes: dict[str, int],
                 *, log: bool = False) -> None:
        super().__init__(procs, workdir, tools, "postfix-front", [], log=log)
        self.routes = routes  # domain -> port

    def _routing(self) -> tuple[str, list[str]]:
        transport = "".join(f"{domain} {FRONT_TRANSPORT}:[{LOCALHOST}]:{port}\n"
                            for domain, port in self.routes.items())
        (self.etc / "transport").write_text(transport)
        nexthops = " ".join(f"[{LOCALHOST}]:{port}" for port in self.routes.values())
        main = (f"relay_domains = {', '.join(self.routes)}\n"
                f"transport_maps = texthash:{self.etc}/transport\n"
                f"smtp_connection_cache_destinations = {nexthops}\n" + FRONT_MAIN)
        return main, FRONT_MASTER


class FrontRoute(System):
    """One route of a PostfixFront: the load goes to Postfix with a
    recipient in ``domain``; the copies are counted at ``sinks``. CPU is the
    relay's (when the route goes through one) and Postfix's apart."""

    def __init__(self, name: str, postfix: PostfixFront, domain: str, sinks: list[Sink],
                 relay: Relay | None = None) -> None:
        super().__init__(postfix.port, sinks)
        self.name = name
        self.postfix = postfix
        self.domain = domain
        self.recipient = f"rcpt@{domain}"
        self.relay = relay

    def cpu_ticks(self) -> int | None:
        return self.relay.cpu_ticks() if self.relay is not None else None

    def other_cpu_ticks(self) -> dict[str, int | None]:
        return {"postfix": self.postfix.cpu_ticks()}

    def peak_rss_kib(self) -> int | None:
        return self.relay.peak_rss_kib() if self.relay is not None else None

    def alive(self) -> bool:
        return self.relay is None or self.relay.alive()

    def describe_failure(self) -> str:
        return self.relay.describe_failure() if self.relay is not None else "postfix"
