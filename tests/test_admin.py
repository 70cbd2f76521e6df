"""The operator's commands against a running relay: `queue requeue | flush |
delete | show`, `report` as a cut-over gate, and both run as root against
the spool of a relay that runs as an unprivileged user.

Real peers only: the relay is `python -m smtpdup` in a subprocess, the
primary and backups are conftest's aiosmtpd processes, and the commands run
as subprocesses like an operator types them.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, START_TIMEOUT, WAIT_TIMEOUT, free_port, wait_until
from test_cli import relay_variables, run, send

from smtpdup.spool import Envelope, Spool, SpoolError, Target, new_queue_id

# A requeued copy or a flush reaches a running relay within its poll
# interval (1 s); this leaves room for a loaded machine.
PICKUP_TIMEOUT = 15.0
# How long a copy that must NOT move is watched.
QUIET_SECONDS = 1.5
# Retries so far away that only a flush or a requeue explains a delivery.
NEVER = {"SMTP_DUP_RELAY_RETRY_INITIAL_SECONDS": "3600", "SMTP_DUP_RELAY_RETRY_MAX_INTERVAL_SECONDS": "3600"}
UNKNOWN_USER = "550 5.1.1 <carol@example.com>: no such user"
TEST_USER = "smtpdup-test"


def queue(variables: dict, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run(["queue", *args], cwd, **variables)


def entries(variables: dict, cwd: Path) -> list[dict]:
    result = queue(variables, "list", "--json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def report(variables: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return run(["report", *args], cwd, **variables)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr


# --------------------------------------------------------------------------
# The spool side of requeue, flush and the admin view


def dead_letter(spool: Spool, destination: str, recipients: tuple[str, ...], received_at: float) -> str:
    envelope = Envelope(new_queue_id(), "alice@example.com", recipients, "192.0.2.1", received_at=received_at)
    with spool.create(envelope, [Target(destination, recipients)]) as f:
        f.write(b"Subject: old\r\n\r\nthe body\r\n")
        f.commit()
    message = spool.load(envelope.queue_id)
    copy = message.update(0, attempts=7)
    spool.dead_letter(message, copy, list(recipients), UNKNOWN_USER, received_at + 10)
    message.update(0, settled=True)
    spool.save(message)
    return f"{envelope.queue_id}.0"


def test_requeue_makes_a_new_pending_copy_that_a_running_relay_takes(tmp_path):
    relay_side = Spool(tmp_path / "spool")  # made before the requeue, like a running relay
    admin = Spool(tmp_path / "spool", create=False)
    old = time.time() - 7 * 86400
    dead_id = dead_letter(admin, "new:25", ("carol@example.com",), old)
    assert relay_side.take_requeued() == []
    assert admin.requeue("0123456789abcdef0123.0") is None  # no such dead letter

    new_id = admin.requeue(dead_id)
    assert new_id and new_id != dead_id and new_id.endswith(".0")
    [entry] = admin.entries()
    assert (entry.id, entry.state, entry.destination, entry.recipients) == (
        new_id, "pending", "new:25", ("carol@example.com",))
    assert (entry.attempts, entry.next_attempt) == (0, 0.0)  # due now, attempts reset
    assert entry.envelope.received_at > old + 6 * 86400  # expiry starts again
    [shown] = admin.entries(new_id)
    assert shown.origin == {"requeued_from": dead_id, "first_received_at": old}
    with admin.open_entry(shown) as f:
        assert f.read(shown.content_length) == b"Subject: old\r\n\r\nthe body\r\n"
    # History is kept: the journal says what became of the dead letter.
    [event] = [e for e in admin.journal_since(0) if e["event"] == "requeued"]
    assert (event["id"], event["new_id"], event["recipients"]) == (dead_id, new_id, ["carol@example.com"])

    # The relay takes it once; a relay started later finds it in msg/.
    [message] = relay_side.take_requeued()
    assert f"{message.queue_id}.0" == new_id and message.pending()[0].recipients == ("carol@example.com",)
    assert relay_side.take_requeued() == []
    assert Spool(tmp_path / "spool").take_requeued() == []
    assert admin.requeue(dead_id) is None  # the dead letter is gone


def test_flush_requests_name_their_destinations_and_merge(tmp_path):
    relay_side = Spool(tmp_path / "spool")
    admin = Spool(tmp_path / "spool", create=False)
    assert relay_side.take_flush() is None
    admin.request_flush("a:25")
    admin.request_flush("b:25")  # before the relay looked: both
    assert relay_side.take_flush().destinations == frozenset({"a:25", "b:25"})
    assert relay_side.take_flush() is None
    admin.request_flush()
    admin.request_flush("a:25")  # "every destination" absorbs it
    assert relay_side.take_flush().destinations is None


def test_an_admin_spool_is_never_created(tmp_path):
    with pytest.raises(SpoolError, match="does not exist"):
        Spool(tmp_path / "missing", create=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpoolError, match="not a smtpdup spool"):
        Spool(tmp_path / "empty", create=False)
    assert not (tmp_path / "missing").exists() and list((tmp_path / "empty").iterdir()) == []


# --------------------------------------------------------------------------
# The migration loop against a running relay


def test_the_migration_loop_refusal_report_requeue_resolved(tmp_path, upstreams, background):
    primary, backup = upstreams("primary"), upstreams("backup")
    backup.set_rules(rcpt={"carol@example.com": UNKNOWN_USER})
    variables = relay_variables(tmp_path, SMTP_DUP_RELAY_DESTINATION_PRIMARY=primary.address,
                                SMTP_DUP_RELAY_DESTINATION_BACKUPS=backup.address, SMTP_DUP_METRICS_LISTEN="")
    relay = background([], **variables)
    relay.wait_for_event("started")
    host, _, port = variables["SMTP_DUP_SMTP_LISTEN"].rpartition(":")
    assert send((host, int(port)), "migration", ["bob@example.com", "carol@example.com"]) == {}
    assert primary.wait_for(1)[0].rcpt_tos == ["bob@example.com", "carol@example.com"]
    [first] = backup.wait_for(1)
    assert first.rcpt_tos == ["bob@example.com"]
    [dead] = wait_until(lambda: [e for e in entries(variables, tmp_path) if e["state"] == "dead"],
                        what="carol's dead letter")
    assert dead["recipients"] == ["carol@example.com"] and dead["last_reply"] == UNKNOWN_USER

    # Readiness: NOT READY, naming the recipient; exit 1 gates a cut-over script.
    result = report(variables, tmp_path)
    assert result.returncode == 1, result.stderr
    assert "carol@example.com" in result.stdout and UNKNOWN_USER in result.stdout
    assert f"{backup.address}: NOT READY: 1 recipient refused, 1 copy dead-lettered" in result.stdout

    # The mailbox is made on the new server; the dead copy goes again.
    backup.set_rules()
    result = queue(variables, "requeue", "--dead", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("requeued 1 copy")
    [_, second] = backup.wait_for(2, timeout=PICKUP_TIMEOUT)
    assert second.rcpt_tos == ["carol@example.com"]  # a copy for that recipient alone
    assert second.content == first.content
    assert len(primary.messages()) == 1  # the primary is not involved
    wait_until(lambda: entries(variables, tmp_path) == [], what="the spool to empty")

    result = report(variables, tmp_path)
    assert result.returncode == 0, result.stdout
    assert any(line.split()[:2] == ["carol@example.com", "resolved"] for line in result.stdout.splitlines())
    assert f"{backup.address}: READY" in result.stdout
    result = report(variables, tmp_path, "--json")
    assert result.returncode == 0
    [entry] = json.loads(result.stdout)["backups"]
    assert entry["ready"] is True and entry["dead"] == 0
    assert [(r["recipient"], r["resolved"]) for r in entry["refused_recipients"]] == [("carol@example.com", True)]
    assert "Traceback" not in relay.log()


def test_requeue_flush_delete_and_show_by_id_and_destination(tmp_path, upstreams, background):
    primary, refusing = upstreams("primary"), upstreams("refusing")
    slow_a, slow_b = upstreams("slow-a"), upstreams("slow-b")
    refusing.set_rules(rcpt_domains={"example.com": "550 5.1.1 no such user"})
    for slow in (slow_a, slow_b):
        slow.set_rules(mail="451 4.3.0 try later")
    backups = [refusing.address, slow_a.address, slow_b.address]
    variables = relay_variables(tmp_path, SMTP_DUP_RELAY_DESTINATION_PRIMARY=primary.address,
                                SMTP_DUP_RELAY_DESTINATION_BACKUPS=",".join(backups),
                                SMTP_DUP_METRICS_LISTEN="", **NEVER)
    relay = background([], **variables)
    relay.wait_for_event("started")
    host, _, port = variables["SMTP_DUP_SMTP_LISTEN"].rpartition(":")
    assert send((host, int(port)), "first", ["bob@example.com"]) == {}
    assert send((host, int(port)), "second", ["carol@example.com"]) == {}

    def settled_listing():
        found = entries(variables, tmp_path)
        dead = [e for e in found if e["state"] == "dead"]
        waiting = [e for e in found if e["state"] == "pending"]
        # A 451 to MAIL backs the destination off: its first copy has an
        # attempt, the other waits for the back-off without one.
        tried = {e["destination"] for e in waiting if e["attempts"] >= 1}
        return found if len(dead) == 2 and len(waiting) == 4 and len(tried) == 2 else None

    listing = wait_until(settled_listing, what="2 dead copies, 4 pending, each slow backup tried")
    dead_first, dead_second = [e for e in listing if e["state"] == "dead"]
    assert dead_first["recipients"] == ["bob@example.com"]
    pending_a = [e for e in listing if e["destination"] == slow_a.address and e["attempts"] >= 1]

    # show: envelope, state, attempts with their replies, the header section.
    result = queue(variables, "show", dead_first["id"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert dead_first["id"] in out and "state:" in out and "dead" in out and refusing.address in out
    assert "550 5.1.1 no such user" in out and "alice@example.com" in out and "bob@example.com" in out
    assert "Subject: first" in out and "body of first" not in out
    result = queue(variables, "show", dead_first["id"], "--body", cwd=tmp_path)
    assert result.returncode == 0 and "Subject: first" in result.stdout and "body of first" in result.stdout
    result = queue(variables, "show", pending_a[0]["id"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "pending" in result.stdout and "451 4.3.0 try later" in result.stdout
    assert "deferred" in result.stdout  # the failed attempt, from the journal
    assert "body of" not in result.stdout
    assert "0123456789abcdef0123.0" in one_line_error(queue(variables, "show", "0123456789abcdef0123.0", cwd=tmp_path))

    # requeue: unknown IDs are named and nothing is done; a pending copy is no dead one.
    error = one_line_error(queue(variables, "requeue", dead_first["id"], "0123456789abcdef0123.0", "nonsense",
                                 cwd=tmp_path))
    assert "0123456789abcdef0123.0" in error and "nonsense" in error and dead_first["id"] not in error
    assert "pending, not dead" in one_line_error(queue(variables, "requeue", pending_a[0]["id"], cwd=tmp_path))
    assert "--destination" in one_line_error(queue(variables, "requeue", cwd=tmp_path))
    assert "127.0.0.1:1" in one_line_error(queue(variables, "requeue", "--destination", "127.0.0.1:1", cwd=tmp_path))
    assert len([e for e in entries(variables, tmp_path) if e["state"] == "dead"]) == 2

    # requeue by ID, then by destination.
    refusing.set_rules()
    result = queue(variables, "requeue", dead_first["id"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("requeued 1 copy")
    assert refusing.wait_for(1, timeout=PICKUP_TIMEOUT)[0].rcpt_tos == ["bob@example.com"]
    result = queue(variables, "requeue", "--destination", refusing.address, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.splitlines()[-1].startswith("requeued 1 copy"), result
    assert refusing.wait_for(2, timeout=PICKUP_TIMEOUT)[1].rcpt_tos == ["carol@example.com"]

    # flush --destination: only that backup's copies become due.
    slow_a.set_rules()
    slow_b.set_rules()
    result = queue(variables, "flush", "--destination", slow_a.address, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(m.rcpt_tos[0] for m in slow_a.wait_for(2, timeout=PICKUP_TIMEOUT)) == [
        "bob@example.com", "carol@example.com"]
    time.sleep(QUIET_SECONDS)  # the other backup's copies must stay put
    assert slow_b.count() == 0
    assert len([e for e in entries(variables, tmp_path) if e["destination"] == slow_b.address]) == 2

    # delete: unknown IDs named, then by destination; --dead with none left.
    assert "ffffffffffffffffffff" in one_line_error(queue(variables, "delete", "ffffffffffffffffffff", cwd=tmp_path))
    result = queue(variables, "delete", "--destination", slow_b.address, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "deleted 2 copies", result
    assert [e for e in entries(variables, tmp_path) if e["destination"] == slow_b.address] == []
    result = queue(variables, "delete", "--dead", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "deleted 0 copies"
    assert slow_b.count() == 0
    assert "Traceback" not in relay.log()


def test_queue_and_report_never_create_a_spool(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    for command in (["queue", "list"], ["queue", "flush"], ["queue", "requeue", "--dead"], ["report"]):
        error = one_line_error(run(command, tmp_path, SMTP_DUP_CONFIG=str(empty)))
        assert "relay.spool_dir (default)" in error and str(tmp_path / "spool") in error
        assert not (tmp_path / "spool").exists()
    error = one_line_error(run(["queue", "list"], tmp_path, SMTP_DUP_CONFIG=str(empty),
                               SMTP_DUP_RELAY_SPOOL_DIR=str(tmp_path / "elsewhere")))
    assert "relay.spool_dir (SMTP_DUP_RELAY_SPOOL_DIR)" in error and str(tmp_path / "elsewhere") in error
    assert not (tmp_path / "elsewhere").exists()


# --------------------------------------------------------------------------
# Root's commands against the spool of a relay running as a service user


def _runtime_requirements() -> list[str]:
    """The runtime pins of requirements.txt (the block before the test-only marker)."""
    pins = []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.startswith("# --- test only"):
            break
        line = line.split("#", 1)[0].strip()
        if line:
            pins.append(line)
    return pins


@pytest.fixture(scope="session")
def service_user():
    """(uid, gid, python) for a relay run as an unprivileged system user.

    The suite's interpreter may live where that user cannot read it
    (/root/...), so a venv is made from the system Python in a directory
    everyone can read, with the runtime pins (PyPI or pip's cache) and this
    checkout's package copied in. Once per session; removed at the end, as
    is the user when this fixture made it."""
    if os.geteuid() != 0:
        pytest.skip("needs root: starts the relay as another user and runs the commands as root")
    created = False
    try:
        user = pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", TEST_USER], check=True, timeout=START_TIMEOUT)
        created = True
        user = pwd.getpwnam(TEST_USER)
    system_python = shutil.which("python3", path="/usr/bin:/usr/local/bin:/bin") or sys.executable
    venv = Path(tempfile.mkdtemp(prefix="smtpdup-venv-"))
    try:
        venv.chmod(0o755)
        subprocess.run([system_python, "-m", "venv", str(venv)], check=True, timeout=120)
        python = venv / "bin" / "python"
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        *_runtime_requirements()], check=True, timeout=600)
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True, timeout=60).stdout.strip()
        shutil.copytree(ROOT / "smtpdup", Path(site) / "smtpdup",
                        ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run(["chmod", "-R", "a+rX", str(venv)], check=True, timeout=60)
        yield user.pw_uid, user.pw_gid, str(python)
    finally:
        shutil.rmtree(venv, ignore_errors=True)
        if created:
            subprocess.run(["userdel", TEST_USER], timeout=START_TIMEOUT)


def root_owned(directory: Path) -> list[str]:
    found = []
    for parent, dirs, files in os.walk(directory):
        for name in [*dirs, *files]:
            path = os.path.join(parent, name)
            if os.lstat(path).st_uid == 0:
                found.append(path)
    return found


def test_root_commands_act_as_the_spool_owner_and_never_disturb_the_relay(service_user, upstreams, smtpdup):
    uid, gid, python = service_user
    primary, refusing, slow = upstreams("primary"), upstreams("refusing"), upstreams("slow")
    refusing.set_rules(rcpt={"carol@example.com": UNKNOWN_USER})
    slow.set_rules(mail="451 4.3.0 try later")
    # Under /tmp, not pytest's root-only directory: the service user must reach its state directory.
    work = Path(tempfile.mkdtemp(prefix="smtpdup-admin-"))
    try:
        work.chmod(0o755)
        state = work / "state"  # like systemd's StateDirectory=: owned by the user, the spool not made yet
        state.mkdir()
        os.chown(state, uid, gid)
        config = work / "config.yaml"
        config.write_text("{}\n")
        config.chmod(0o644)
        listen = f"127.0.0.1:{free_port()}"
        variables = {
            "SMTP_DUP_CONFIG": str(config),
            "SMTP_DUP_SMTP_LISTEN": listen,
            "SMTP_DUP_METRICS_LISTEN": "",
            "SMTP_DUP_RELAY_SPOOL_DIR": str(state / "spool"),
            "SMTP_DUP_RELAY_DESTINATION_PRIMARY": primary.address,
            "SMTP_DUP_RELAY_DESTINATION_BACKUPS": f"{refusing.address},{slow.address}",
            **NEVER,
        }

        # Before the relay's first start: an error, and nothing created as root.
        error = one_line_error(run(["queue", "list"], work, **variables))
        assert "relay.spool_dir" in error and str(state / "spool") in error
        assert list(state.iterdir()) == []

        relay = smtpdup(variables, cwd=state, python=python)
        relay.start(user=uid, group=gid, extra_groups=[])
        relay.wait_for_event("started")
        assert (state / "spool").stat().st_uid == uid
        host, _, port = listen.rpartition(":")
        assert send((host, int(port)), "one", ["bob@example.com", "carol@example.com"]) == {}
        assert refusing.wait_for(1)[0].rcpt_tos == ["bob@example.com"]

        def state_of_copies():
            found = entries(variables, work)
            dead = [e for e in found if e["state"] == "dead"]
            waiting = [e for e in found if e["state"] == "pending" and e["attempts"] >= 1]
            return (dead, waiting) if len(dead) == 1 and len(waiting) == 1 else None

        [dead], [waiting] = wait_until(state_of_copies, what="a dead and a retrying copy")

        # Every command, as root.
        for args in (["list"], ["show", dead["id"]], ["show", waiting["id"], "--body"], ["flush"],
                     ["flush", "--destination", slow.address]):
            result = queue(variables, *args, cwd=work)
            assert result.returncode == 0, (args, result.stderr)
        result = report(variables, work)
        assert result.returncode == 1 and "carol@example.com" in result.stdout, result
        assert report(variables, work, "--json").returncode == 1
        refusing.set_rules()
        result = queue(variables, "requeue", dead["id"], cwd=work)
        assert result.returncode == 0, result.stderr
        assert refusing.wait_for(2, timeout=PICKUP_TIMEOUT)[1].rcpt_tos == ["carol@example.com"]
        result = queue(variables, "delete", waiting["id"], cwd=work)
        assert result.returncode == 0, result.stderr
        assert queue(variables, "requeue", "--dead", cwd=work).returncode == 0
        assert queue(variables, "delete", "--dead", cwd=work).returncode == 0
        assert report(variables, work).returncode == 0

        # The relay keeps delivering and recording what it delivers. The
        # slow backup is backed off (451 to MAIL) for an hour: the operator
        # who fixed it ends the back-off with a flush.
        slow.set_rules()
        assert queue(variables, "flush", "--destination", slow.address, cwd=work).returncode == 0
        assert send((host, int(port)), "two", ["dave@example.com"]) == {}
        assert primary.wait_for(2)[1].rcpt_tos == ["dave@example.com"]
        assert refusing.wait_for(3)[2].rcpt_tos == ["dave@example.com"]
        assert slow.wait_for(1)[0].rcpt_tos == ["dave@example.com"]
        wait_until(lambda: entries(variables, work) == [], what="the spool to empty")

        assert root_owned(state) == []
        spool_failures = [line for line in relay.log().splitlines() if '"spool_' in line and '_failed"' in line]
        assert spool_failures == []
        assert "Traceback" not in relay.log()
        assert relay.proc.poll() is None
        assert relay.stop(timeout=WAIT_TIMEOUT) == 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
