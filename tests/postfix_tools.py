"""Postfix's load tools as test peers: ``smtp-sink`` servers and ``smtp-source`` runs.

This module owns starting, watching and stopping these two programs on
127.0.0.1, and reading what an ``smtp-sink`` dumped. It knows nothing about
smtpdup; the tests and the benchmark put the relay between them. Every
process it starts is stopped by its PID (SIGTERM, then SIGKILL after a
bounded wait); every wait has a bound.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness import free_port, listening  # noqa: F401  (part of this module's interface)

SMTP_SOURCE = Path("/usr/sbin/smtp-source")
SMTP_SINK = Path("/usr/sbin/smtp-sink")

# Upper bound on how long a process may take to listen or to stop.
START_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 5.0

# smtp-sink's listen(2) backlog and simultaneous-connection cap (its -m,
# default 256): above smtpdup's pool of backup deliveries plus a primary
# connection per client session, so the sink never queues a relay connection.
SINK_BACKLOG = 512
SINK_MAX_CONNECTIONS = 1024

# The trace header smtpdup prepends (relay.py ``_received_header``):
# "\tby <domain> (smtpdup) with ESMTP id <queue id>;". smtp-sink adds its own
# "(smtp-sink) ... id <random>" header, which this does not match.
SMTPDUP_QUEUE_ID = re.compile(rb"^\tby \S+ \(smtpdup\) with \S+ id ([0-9a-f]+);$", re.MULTILINE)


def available() -> bool:
    """True when both Postfix test programs are installed."""
    return SMTP_SOURCE.exists() and SMTP_SINK.exists()


def wait_listening(proc: subprocess.Popen, port: int, timeout: float = START_TIMEOUT_SECONDS) -> None:
    """Poll until ``proc`` listens on ``port``; RuntimeError if it exits or
    ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while not listening(port):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with status {proc.returncode} before listening on {port}")
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{proc.args[0]} not listening on {port} after {timeout}s")
        time.sleep(0.02)


def stop(proc: subprocess.Popen | None, timeout: float = STOP_TIMEOUT_SECONDS) -> int | None:
    """SIGTERM ``proc`` by its PID, SIGKILL it after ``timeout``; returns its
    exit status (None if there was no process)."""
    if proc is None:
        return None
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    return proc.returncode


@dataclass
class Sink:
    """A running ``smtp-sink``; with ``dump_dir``, one file per transaction."""

    proc: subprocess.Popen
    port: int
    dump_dir: Path | None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def dumps(self) -> list[bytes]:
        """The content of every dump file so far (complete or still being written)."""
        if self.dump_dir is None or not self.dump_dir.exists():
            return []
        return [path.read_bytes() for path in sorted(self.dump_dir.iterdir()) if path.is_file()]

    def stop(self) -> int | None:
        return stop(self.proc)


def start_sink(dump_dir: Path | None = None, port: int | None = None, extra_args: tuple[str, ...] = ()) -> Sink:
    """Start ``smtp-sink`` on 127.0.0.1 and wait until it listens.

    ``dump_dir``: each transaction goes to its own file there (``-d``, which
    creates names with O_EXCL, so two transactions never share a file).
    Returns the Sink; RuntimeError if it does not come up (it is stopped).
    """
    port = port or free_port()
    args = [str(SMTP_SINK), "-m", str(SINK_MAX_CONNECTIONS)]
    if os.geteuid() == 0:
        # smtp-sink refuses to run as root without -u; staying root keeps
        # the dump directory (under a 0700 pytest tmp dir) writable.
        args += ["-u", pwd.getpwuid(os.geteuid()).pw_name]
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
        args += ["-d", f"{dump_dir}/%H%M%S."]
    args += [*extra_args, f"127.0.0.1:{port}", str(SINK_BACKLOG)]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(proc, port)
    except RuntimeError as exc:
        stop(proc)
        raise RuntimeError(f"{exc}: {proc.stderr.read().decode(errors='replace').strip()}") from None
    return Sink(proc, port, dump_dir)


@dataclass
class SourceRun:
    """The outcome of one ``smtp-source`` run."""

    returncode: int
    output: str
    duration_seconds: float


def run_source(port: int, messages: int, sessions: int = 1, reuse_connections: bool = False,
               sender: str = "sender@example.com", recipient: str = "rcpt@example.com",
               extra_args: tuple[str, ...] = (), timeout: float = 60.0) -> SourceRun:
    """Run ``smtp-source`` against 127.0.0.1:``port`` to completion.

    ``reuse_connections`` is ``-d``: the next message goes over the same
    connection, as Postfix's connection cache does. Returns its exit status,
    combined output and wall time; the process is killed after ``timeout``.
    """
    args = [str(SMTP_SOURCE), "-m", str(messages), "-s", str(sessions), "-f", sender, "-t", recipient]
    if reuse_connections:
        args.append("-d")
    args += [*extra_args, f"127.0.0.1:{port}"]
    started = time.monotonic()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        output, _ = proc.communicate(timeout=STOP_TIMEOUT_SECONDS)
        raise RuntimeError(f"smtp-source did not finish {messages} messages within {timeout}s: "
                           f"{output.decode(errors='replace')[-2000:]}") from None
    finally:
        stop(proc)
    return SourceRun(proc.returncode, output.decode(errors="replace"), time.monotonic() - started)


# --- a private Postfix instance ------------------------------------------------
#
# The whole mail system, not just its load tools: master, smtpd, cleanup,
# qmgr and the smtp client, from Debian's package, with its own configuration
# and queue directories and its listeners on 127.0.0.1 only. It never reads
# /etc/postfix/main.cf and does not disturb a system Postfix.

POSTFIX = Path("/usr/sbin/postfix")
POSTCONF = Path("/usr/sbin/postconf")

# The services a relaying instance needs; no chroot (the instance's
# directories are not set up for one), no local delivery, no pickup.
_MASTER_CF_SERVICES = """\
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def postfix_available() -> str | None:
    """None when a private Postfix instance can run here, else why not."""
    if not POSTFIX.exists() or not POSTCONF.exists():
        return f"Postfix not installed ({POSTFIX}): apt-get install postfix"
    if os.geteuid() != 0:
        return "a Postfix master must start as root"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "no 'postfix' user (Debian's postfix package creates it)"
    return None


@dataclass
class PostfixInstance:
    """A running private Postfix: ``ports`` by listener name, its log (what
    its daemons log, via postlogd) in ``log_path``."""

    directory: Path
    proc: subprocess.Popen
    ports: dict[str, int]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        """SIGTERM the master by its PID (it stops its own children), then
        remove the instance's directories."""
        try:
            return stop(self.proc)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def start_postfix(listeners: dict[str, str], settings: dict[str, str]) -> PostfixInstance:
    """Start a private Postfix whose smtpd listens on a free 127.0.0.1 port
    per ``listeners`` entry (name -> extra master.cf ``-o`` options, e.g.
    ``"-o smtpd_tls_wrappermode=yes"``), with ``settings`` added to its
    main.cf (e.g. relayhost, smtpd_tls_chain_files). Waits until every
    listener accepts; RuntimeError (and nothing left running) if not.

    Its directories live in /tmp, outside pytest's 0700 tree: the daemons
    run as the ``postfix`` user and must reach them.
    """
    directory = Path(tempfile.mkdtemp(prefix="smtpdup-postfix-"))
    directory.chmod(0o755)
    etc, queue, data = directory / "etc", directory / "queue", directory / "data"
    for path in (etc, queue, data):
        path.mkdir()
    shutil.chown(data, user="postfix")
    log_path = directory / "maillog"
    main = {
        "compatibility_level": "3.6",
        "config_directory": str(etc),
        "queue_directory": str(queue),
        "data_directory": str(data),
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        # Postfix writes the log to its own stdout: the master's, a file here.
        "maillog_file": "/dev/stdout",
        "myhostname": "postfix.test",
        "mydestination": "",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "smtp_bind_address": "127.0.0.1",
        "mynetworks": "127.0.0.0/8",
        "smtpd_relay_restrictions": "permit_mynetworks, reject",
        "alias_maps": "",
        "alias_database": "",
        "smtp_tls_security_level": "none",
        **settings,
    }
    (etc / "main.cf").write_text("".join(f"{key} = {value}\n" for key, value in main.items()))
    ports = {name: free_port() for name in listeners}
    lines = [f"127.0.0.1:{ports[name]} inet n - n - - smtpd {options}".rstrip() for name, options in listeners.items()]
    (etc / "master.cf").write_text("\n".join(lines) + "\n" + _MASTER_CF_SERVICES)
    try:
        # `postfix check` creates the queue directories with their owners.
        check = subprocess.run([str(POSTFIX), "-c", str(etc), "check"], capture_output=True,
                               timeout=START_TIMEOUT_SECONDS, stdin=subprocess.DEVNULL)
        if check.returncode != 0:
            raise RuntimeError(f"postfix check failed: {(check.stdout + check.stderr).decode(errors='replace')}")
        daemon_directory = subprocess.run(
            [str(POSTCONF), "-c", str(etc), "-h", "daemon_directory"], capture_output=True, check=True,
            timeout=START_TIMEOUT_SECONDS, text=True).stdout.strip()
    except (RuntimeError, subprocess.SubprocessError):
        shutil.rmtree(directory, ignore_errors=True)
        raise
    with open(log_path, "wb") as log:
        # -d: the master stays in the foreground, so its PID is ours to stop.
        proc = subprocess.Popen([os.path.join(daemon_directory, "master"), "-c", str(etc), "-d"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    instance = PostfixInstance(directory, proc, ports, log_path)
    try:
        for port in ports.values():
            wait_listening(proc, port)
    except RuntimeError as exc:
        text = instance.log()
        instance.stop()
        raise RuntimeError(f"{exc}; Postfix log:\n{text[-2000:]}") from None
    return instance
