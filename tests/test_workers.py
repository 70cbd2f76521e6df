"""smtp.workers > 1: several relay processes on one socket, as a whole.

The relay runs as `python -m smtpdup` in its own process group; upstreams
are aiosmtpd processes. Each message carries smtpdup's Received header with
its queue id, which shows whether anything arrived twice."""

import json
import os
import re
import signal
import smtplib
import urllib.request

import gevent
import pytest
from conftest import free_port, relay_environ, run_smtpdup, wait_until

QUEUE_ID = re.compile(rb"\bid ([0-9a-f]{20});")
NEVER = {"relay_retry_initial_seconds": 3600, "relay_retry_max_interval_seconds": 3600}


@pytest.fixture
def relays(smtpdup):
    """Factory: ``relays(environ)`` -> the supervisor started and listening
    (``harness.Smtpdup``); its whole process group is killed at teardown."""

    def make(environ):
        return smtpdup(environ).start(wait="listening")

    return make


def send_many(address, connections: int, per_connection: int) -> None:
    def session(n: int) -> None:
        with smtplib.SMTP(*address, timeout=30) as smtp:
            for i in range(per_connection):
                body = f"Subject: {n}-{i}\r\n\r\nmessage {n}-{i}\r\n".encode()
                assert smtp.sendmail("alice@example.com", ["bob@example.com"], body) == {}

    gevent.joinall([gevent.spawn(session, n) for n in range(connections)], raise_error=True)


def queue_ids(upstream) -> list[bytes]:
    return [QUEUE_ID.search(m.content).group(1) for m in upstream.messages()]


def test_two_workers_relay_everything_once_and_sum_their_metrics(upstreams, relays, tmp_path):
    primary, backup = upstreams("primary"), upstreams("backup")
    metrics_port = free_port()
    environ = relay_environ(tmp_path, primary.address, [backup.address], smtp_workers=2,
                            smtp_listen=f"127.0.0.1:{free_port()}", metrics_listen=f"127.0.0.1:{metrics_port}",
                            log_level="info")
    relay = relays(environ)
    send_many(relay.address, connections=8, per_connection=5)
    primary.wait_for(40)
    backup.wait_for(40)
    assert sorted(queue_ids(primary)) == sorted(set(queue_ids(primary)))
    assert sorted(queue_ids(backup)) == sorted(queue_ids(primary))
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    assert 'smtpdup_transactions_total{outcome="accepted"} 40.0' in scrape
    wait_until(lambda: 'outcome="delivered"} 40.0' in urllib.request.urlopen(
        f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode(), what="40 deliveries counted")
    assert relay.stop() == 0
    [started] = [json.loads(line) for line in relay.log().splitlines() if '"workers_started"' in line]
    assert len(started["pids"]) == 2


def test_workers_share_the_backlog_without_double_delivery(upstreams, relays, tmp_path):
    primary, backup = upstreams("primary"), upstreams("backup")
    backup.set_rules(mail="451 4.3.2 down for maintenance")
    listen = f"127.0.0.1:{free_port()}"
    environ = relay_environ(tmp_path, primary.address, [backup.address], smtp_workers=2,
                            smtp_listen=listen, **NEVER)
    relay = relays(environ)
    send_many(relay.address, connections=4, per_connection=5)
    spool = tmp_path / "spool" / "msg"
    # Every message is committed before its client hears 250; the backup,
    # backed off after its first 451, leaves the others without an attempt.
    assert len([n for n in os.listdir(spool) if not n.endswith(".state")]) == 20
    wait_until(lambda: any(n.endswith(".state") for n in os.listdir(spool)), what="a copy deferred")
    assert relay.kill(group=True) == -signal.SIGKILL

    backup.set_rules()
    relay = relays(environ)
    result = run_smtpdup(["queue", "flush"], environ, timeout=60)
    assert result.returncode == 0, result.stderr
    backup.wait_for(20, timeout=30)
    wait_until(lambda: not os.listdir(spool), what="the spool to empty")
    assert sorted(queue_ids(backup)) == sorted(queue_ids(primary))
    assert len(set(queue_ids(backup))) == 20
    assert relay.stop() == 0


def _children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


def test_a_worker_that_dies_is_replaced_and_reload_reaches_every_worker(upstreams, relays, tmp_path):
    primary, backup, second = upstreams("primary"), upstreams("backup"), upstreams("second")
    config = tmp_path / "relay.yaml"
    config.write_text(f"log:\n  level: info\nrelay:\n  destination_backups: [{backup.address!r}]\n")
    environ = relay_environ(tmp_path, primary.address, smtp_workers=2, smtp_listen=f"127.0.0.1:{free_port()}")
    del environ["SMTP_DUP_RELAY_DESTINATION_BACKUPS"], environ["SMTP_DUP_LOG_LEVEL"]
    environ["SMTP_DUP_CONFIG"] = str(config)
    relay = relays(environ)
    supervisor = relay.proc.pid
    workers = wait_until(lambda: len(_children(supervisor)) == 2 and _children(supervisor), what="two workers")
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in _children(supervisor) and len(_children(supervisor)) == 2,
               what="the dead worker replaced")
    send_many(relay.address, connections=4, per_connection=2)
    backup.wait_for(8)

    # SIGHUP: the new backup list and log level reach both workers (the
    # supervisor checks them first). The relay logs each worker's reload,
    # then only warnings: no more backup_attempt lines.
    config.write_text(f"log:\n  level: warning\nrelay:\n  destination_backups: [{second.address!r}]\n")
    os.kill(supervisor, signal.SIGHUP)

    def reloads() -> int:
        return relay.log().count('"reloaded"')

    wait_until(lambda: reloads() >= 2, what="both workers reloaded")
    attempts_logged = relay.log().count('"backup_attempt"')
    assert attempts_logged >= 8
    before = backup.count()
    send_many(relay.address, connections=4, per_connection=2)
    second.wait_for(8)
    assert backup.count() == before
    assert relay.stop() == 0
    assert relay.log().count('"backup_attempt"') == attempts_logged


def test_each_worker_cuts_its_silent_clients(upstreams, relays, tmp_path):
    """A worker runs the sweeper that ends sessions past their deadline:
    six connections, whichever worker accepted each, all hear 421 4.4.2."""
    primary = upstreams("primary")
    environ = relay_environ(tmp_path, primary.address, smtp_workers=2, smtp_idle_timeout_seconds=0.4,
                            smtp_listen=f"127.0.0.1:{free_port()}")
    relay = relays(environ)
    clients = [smtplib.SMTP(*relay.address, timeout=30) for _ in range(6)]
    try:
        for smtp in clients:
            assert smtp.ehlo()[0] == 250
        for smtp in clients:
            code, text = smtp.getreply()
            assert (code, text[:5]) == (421, b"4.4.2")
    finally:
        for smtp in clients:
            smtp.close()
