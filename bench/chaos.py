"""Fault run: kill -9 the relay at random moments under load, one backup flapping.

    python bench/chaos.py [--cycles N] [--clients N] [--min-up S] [--max-up S] [--workers N] [--json]

What it does, all on 127.0.0.1:

* a primary and two backups, aiosmtpd servers each in its own process,
  each counting what it stores per Message-ID; backup 2 flaps
  every ``--flap`` seconds between up (a third of the time), down
  (connections refused), 421 at MAIL, 451 at MAIL and hanging at MAIL past
  the relay's timeout (a sixth each);
* ``--clients`` threads sending messages with unique Message-IDs through
  the relay, each remembering which ids got a 250;
* the relay (``python -m smtpdup``) started, killed with SIGKILL after a
  random ``--min-up``..``--max-up`` seconds, started again on the same spool,
  ``--cycles`` times;
* then the load stops, backup 2 comes up for good, the relay is started a
  last time and the run waits for its spool to empty (``--drain-timeout``),
  then stops it with SIGTERM.

It prints the figures (cycles, accepted, lost, duplicates per destination,
drain time) and exits 0 when nothing was lost, the spool drained in time and
the duplicates stay within the in-flight bound: a copy can be delivered
twice only if its delivery was in flight at a kill, so at most
``backup_concurrency`` per kill (per worker process), all backups together. ``make chaos`` runs the long
version; ``tests/test_chaos.py`` a short one.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from aiosmtpd.smtp import SMTP

ROOT = Path(__file__).resolve().parent.parent
# Backup 2 is up a third of the time; each fault takes a sixth.
MODES = ("up", "up", "down", "421", "451", "hang")
RELAY_TIMEOUT_SECONDS = 2
# How often the drain's end is checked (a listing of the spool's msg/).
DRAIN_POLL_SECONDS = 1.0
# relay.backup_concurrency: the relay's default unless --backup-concurrency.
BACKUP_CONCURRENCY = 32


# -- the peers ---------------------------------------------------------------


class Peer:
    """An SMTP server that counts stored messages per Message-ID."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.received: collections.Counter[str] = collections.Counter()
        self.mode = "up"
        self.port = 0
        self.server: asyncio.base_events.Server | None = None

    # aiosmtpd handler hooks
    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.mode == "421":
            return "421 4.3.2 going away"
        if self.mode == "451":
            return "451 4.3.2 try later"
        if self.mode == "hang":
            await asyncio.sleep(RELAY_TIMEOUT_SECONDS * 3)
            return "451 4.3.2 too slow"
        envelope.mail_from = address
        return "250 2.1.0 OK"

    async def handle_DATA(self, server, session, envelope):
        content = envelope.original_content or b""
        start = content.find(b"\r\nMessage-ID: <")
        end = content.find(b">", start)
        if start < 0 or end < 0:
            return "554 5.6.0 no Message-ID"
        self.received[content[start + 15:end].decode()] += 1
        return "250 2.0.0 OK"


class Peers:
    """The three peers, each in its own process (``--serve-peer``), so that
    neither they nor the client threads of this process slow each other
    down: each takes commands (``mode X``, ``dump``) on its stdin."""

    def __init__(self) -> None:
        self.primary, self.backup1, self.backup2 = Peer("primary"), Peer("backup1"), Peer("backup2")
        self._procs: dict[str, subprocess.Popen] = {}
        for peer in self.all:
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--serve-peer", peer.name],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
            )
            self._procs[peer.name] = proc
            peer.port = int(self._ask(peer, None).split()[1])

    @property
    def all(self) -> tuple[Peer, Peer, Peer]:
        return self.primary, self.backup1, self.backup2

    def _ask(self, peer: Peer, command: str | None) -> str:
        proc = self._procs[peer.name]
        assert proc.stdin is not None and proc.stdout is not None
        if command is not None:
            proc.stdin.write(command + "\n")
            proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer {peer.name} exited ({proc.poll()})")
        return line.strip()

    def set_mode(self, peer: Peer, mode: str) -> None:
        self._ask(peer, f"mode {mode}")

    def collect(self) -> None:
        """Each peer's counts per Message-ID, into ``peer.received``."""
        for peer in self.all:
            peer.received = collections.Counter(json.loads(self._ask(peer, "dump")))

    def stop(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def serve_peer(name: str) -> int:
    """``--serve-peer NAME``: one peer on a free port (printed as ``PORT n``),
    commands on stdin, one answer line each."""
    peer = Peer(name)
    loop = asyncio.new_event_loop()

    async def open_server() -> None:
        peer.server = await loop.create_server(
            lambda: SMTP(peer, decode_data=False, hostname=peer.name),
            host="127.0.0.1", port=peer.port, reuse_address=True,
        )
        peer.port = peer.server.sockets[0].getsockname()[1]

    async def command(line: str) -> str:
        word, _, arg = line.partition(" ")
        if word == "mode":
            if arg == "down":
                if peer.server is not None:
                    peer.server.close()
                    peer.server = None
            elif peer.server is None:
                await open_server()
            peer.mode = "up" if arg == "down" else arg
            return "ok"
        if word == "dump":
            return json.dumps(peer.received)
        return f"error unknown command {line!r}"

    loop.run_until_complete(open_server())
    print(f"PORT {peer.port}", flush=True)

    def read_commands() -> None:
        for line in sys.stdin:
            answer = asyncio.run_coroutine_threadsafe(command(line.strip()), loop).result(30)
            print(answer, flush=True)
        loop.call_soon_threadsafe(loop.stop)

    threading.Thread(target=read_commands, daemon=True).start()
    loop.run_forever()
    return 0


# -- the load ----------------------------------------------------------------


class Load:
    """Client threads; each message has a unique Message-ID."""

    def __init__(self, port: int, clients: int) -> None:
        self.port = port
        self.accepted: set[str] = set()
        self.attempts = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(clients)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _client(self, n: int) -> None:
        counter = 0
        while not self._stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as smtp:
                    for _ in range(random.randint(1, 5)):  # sessions of one or several messages
                        counter += 1
                        message_id = f"c{n}.{counter}@chaos"
                        body = (
                            f"From: a@example.com\r\nTo: b@example.com\r\nMessage-ID: <{message_id}>\r\n"
                            f"Subject: chaos {message_id}\r\n\r\nbody\r\n"
                        )
                        with self._lock:
                            self.attempts += 1
                        smtp.sendmail("a@example.com", ["b@example.com"], body)
                        with self._lock:
                            self.accepted.add(message_id)
                        if self._stop.is_set():
                            break
            except (OSError, smtplib.SMTPException):
                self._stop.wait(0.05)  # relay down or restarting


# -- the relay ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Relay:
    def __init__(self, directory: Path, peers: Peers, workers: int, concurrency: int) -> None:
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        config = directory / "config.yaml"
        config.write_text("{}\n")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("SMTP_DUP_", "SMTPDUP_"))},
            "SMTP_DUP_CONFIG": str(config),
            "SMTP_DUP_SMTP_LISTEN": f"127.0.0.1:{self.port}",
            "SMTP_DUP_SMTP_SHUTDOWN_GRACE_SECONDS": "5",
            "SMTP_DUP_SMTP_WORKERS": str(workers),
            "SMTP_DUP_METRICS_LISTEN": "",
            "SMTP_DUP_RELAY_DESTINATION_PRIMARY": f"127.0.0.1:{peers.primary.port}",
            "SMTP_DUP_RELAY_DESTINATION_BACKUPS": f"127.0.0.1:{peers.backup1.port},127.0.0.1:{peers.backup2.port}",
            "SMTP_DUP_RELAY_SPOOL_DIR": str(directory / "spool"),
            "SMTP_DUP_RELAY_TIMEOUT_SECONDS": str(RELAY_TIMEOUT_SECONDS),
            "SMTP_DUP_RELAY_BACKUP_CONCURRENCY": str(concurrency),
            "SMTP_DUP_RELAY_RETRY_INITIAL_SECONDS": "0.5",
            "SMTP_DUP_RELAY_RETRY_MAX_INTERVAL_SECONDS": "2",
            "SMTP_DUP_LOG_LEVEL": "warning",
        }
        if workers <= 1:
            del self.env["SMTP_DUP_SMTP_WORKERS"]

    def start(self, timeout: float = 20.0) -> float:
        """Start; returns the seconds until it accepts SMTP."""
        self.starts += 1
        started = time.monotonic()
        with open(self.directory / "relay.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "smtpdup"], env=self.env, cwd=ROOT,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
            )
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay exited with {self.proc.returncode}; see {self.directory / 'relay.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"220"):
                        return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"relay did not accept SMTP within {timeout} s")

    def kill(self, signum: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signum)  # the workers too, with smtp.workers > 1
        except ProcessLookupError:
            pass
        return self.proc.wait(30)

    def pending(self) -> int:
        """Messages still in the spool (each holds one or more pending copies)."""
        msg = self.directory / "spool" / "msg"
        return sum(1 for name in os.listdir(msg) if not name.endswith(".state")) if msg.exists() else 0


# -- the run -----------------------------------------------------------------


def run(cycles: int, clients: int, min_up: float, max_up: float, flap: float,
        drain_timeout: float, workers: int, seed: int | None, directory: Path,
        progress=lambda text: None, concurrency: int = BACKUP_CONCURRENCY) -> dict:
    rng = random.Random(seed)
    random.seed(seed)
    peers = Peers()
    relay = Relay(directory, peers, workers, concurrency)
    load = Load(relay.port, clients)
    stop_flapping = threading.Event()

    def flapper() -> None:
        while not stop_flapping.wait(flap):
            peers.set_mode(peers.backup2, rng.choice(MODES))

    flapping = threading.Thread(target=flapper, daemon=True)
    started = time.monotonic()
    start_seconds = []
    try:
        start_seconds.append(relay.start())
        load.start()
        flapping.start()
        for cycle in range(1, cycles + 1):
            time.sleep(rng.uniform(min_up, max_up))
            relay.kill()
            start_seconds.append(relay.start())
            if cycle % 10 == 0 or cycle == cycles:
                progress(f"cycle {cycle}/{cycles}: {len(load.accepted)} accepted, "
                         f"{relay.pending()} messages in the spool")
        load.stop()
        stop_flapping.set()
        flapping.join(flap + 10)
        peers.set_mode(peers.backup2, "up")
        load_seconds = time.monotonic() - started
        # The last run: everything must drain.
        drain_started = time.monotonic()
        drained = None
        while time.monotonic() - drain_started < drain_timeout:
            if relay.pending() == 0:
                drained = time.monotonic() - drain_started
                break
            # Listing msg/ costs about 0.75 µs per file: with 80,000
            # messages (160,000 files) a poll every 0.1 s would take half a
            # core from the relay on a 2-core machine.
            time.sleep(DRAIN_POLL_SECONDS)
        status = relay.kill(signal.SIGTERM)
        accepted = set(load.accepted)
        peers.collect()
        figures = {
            "cycles": cycles,
            "workers": workers,
            "clients": clients,
            "load_seconds": round(load_seconds, 1),
            "attempted": load.attempts,
            "accepted": len(accepted),
            "lost": {p.name: len(accepted - p.received.keys()) for p in peers.all},
            "duplicates": {p.name: sum(n - 1 for n in p.received.values() if n > 1) for p in peers.all},
            "duplicated_messages": {p.name: sum(1 for n in p.received.values() if n > 1) for p in peers.all},
            "backup_concurrency": concurrency,
            # The pool is shared by the backups: at most backup_concurrency
            # copies in flight per process at a kill, all backups together.
            "duplicate_bound": cycles * concurrency * max(1, workers),
            "drain_seconds": None if drained is None else round(drained, 1),
            "left_in_spool": relay.pending(),
            "exit_status_on_sigterm": status,
            "max_start_seconds": round(max(start_seconds), 2),
        }
    finally:
        load.stop()
        stop_flapping.set()
        if relay.proc is not None and relay.proc.poll() is None:
            relay.kill()
        peers.stop()
    bound = figures["duplicate_bound"]
    figures["ok"] = (
        not any(figures["lost"].values())
        and figures["drain_seconds"] is not None
        and figures["duplicates"]["primary"] == 0
        and figures["duplicates"]["backup1"] + figures["duplicates"]["backup2"] <= bound
        and status == 0
    )
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="chaos.py", description=__doc__.split("\n\n")[0],
        epilog="Exit status 0 when nothing was lost, the spool drained and duplicates stayed within the bound.",
    )
    parser.add_argument("--cycles", type=int, default=300, help="kill -9 cycles (default 300)")
    parser.add_argument("--clients", type=int, default=12, help="client threads (default 12)")
    parser.add_argument("--min-up", type=float, default=0.5, help="shortest run between kills, s (default 0.5)")
    parser.add_argument("--max-up", type=float, default=3.0, help="longest run between kills, s (default 3)")
    parser.add_argument("--flap", type=float, default=1.0, help="backup 2 changes mode this often, s (default 1)")
    parser.add_argument("--drain-timeout", type=float, default=60.0, help="seconds allowed to drain (default 60)")
    parser.add_argument("--workers", type=int, default=1, help="smtp.workers of the relay (default 1)")
    parser.add_argument("--backup-concurrency", type=int, default=BACKUP_CONCURRENCY,
                        help=f"relay.backup_concurrency (default {BACKUP_CONCURRENCY}, the relay's default)")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for a repeatable schedule")
    parser.add_argument("--dir", default=None, help="working directory (default: a temporary one, removed)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--serve-peer", metavar="NAME", help=argparse.SUPPRESS)  # internal: one peer
    args = parser.parse_args()
    if args.serve_peer:
        return serve_peer(args.serve_peer)
    with tempfile.TemporaryDirectory(prefix="smtpdup-chaos-") as tmp:
        directory = Path(args.dir or tmp)
        directory.mkdir(parents=True, exist_ok=True)
        figures = run(args.cycles, args.clients, args.min_up, args.max_up, args.flap, args.drain_timeout,
                      args.workers, args.seed, directory,
                      progress=lambda text: print(text, file=sys.stderr, flush=True),
                      concurrency=args.backup_concurrency)
    if args.json:
        print(json.dumps(figures))
    else:
        width = max(len(k) for k in figures)
        for key, value in figures.items():
            print(f"{key:<{width}}  {value}")
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
