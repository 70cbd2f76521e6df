"""Process probes for the benchmark: start and stop processes by PID, wait
for a greeting, read CPU time and memory from /proc.

Also the constants and the progress log every other bench module shares.
Nothing here knows what a relay or a Postfix is.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from smtpclient import SmtpConnection, SmtpError

KIB = 1024
MIB = 1024 * KIB
LOCALHOST = "127.0.0.1"
SENDER = "bench@example.com"
RECIPIENT = "rcpt@example.net"
HELO = "bench.example"

# -- bounds: every wait in the bench has one ---------------------------------
START_TIMEOUT_SECONDS = 20.0  # a server's greeting after start
STOP_TIMEOUT_SECONDS = 15.0  # after SIGTERM, before SIGKILL

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A run or a setup step failed; the message is one line for the log."""


_started = time.monotonic()


def elapsed() -> float:
    """Seconds since the bench started."""
    return time.monotonic() - _started


def progress(message: str) -> None:
    print(f"[bench {elapsed():7.1f}s] {message}", file=sys.stderr, flush=True)


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
                      timeout: float = START_TIMEOUT_SECONDS, interval: float = 0.05) -> None:
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
            time.sleep(interval)
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


def proc_status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def tree_status_kib(root_pid: int, key: str) -> int | None:
    """Sum of a /proc/<pid>/status value (VmRSS, VmHWM) over a process and
    its descendants (smtp.workers > 1 forks relay processes)."""
    values = [proc_status_kib(pid, key) for pid in [root_pid, *descendants(root_pid)]]
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def pid_alive(pid: int) -> bool:
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
