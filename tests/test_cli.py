"""The command line end to end: `python -m smtpdup ...` as subprocesses.

Every process runs with the test process's environment less any SMTP_DUP_*
variable, in a temporary directory, and is stopped by its PID when a test
ends. Upstream servers are conftest's aiosmtpd processes or `smtpdup sink`.
"""

import os
import signal
import smtplib
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import RUN_TIMEOUT, START_TIMEOUT, WAIT_TIMEOUT, clean_environ, free_port, run_smtpdup, wait_until

PASSWORD = "s3cret"


def run(args: list[str], cwd: Path, **variables: str) -> subprocess.CompletedProcess:
    return run_smtpdup(args, variables, cwd)


def relay_variables(tmp_path: Path, config_file: Path | None = None, **variables: str) -> dict[str, str]:
    """A relay on a free port, metrics on another, its spool under tmp_path;
    ``variables`` (SMTP_DUP_...) added or overriding."""
    if config_file is None:
        config_file = tmp_path / "empty.yaml"
        config_file.write_text("{}\n")
    return {
        "SMTP_DUP_CONFIG": str(config_file),
        "SMTP_DUP_SMTP_LISTEN": f"127.0.0.1:{free_port()}",
        "SMTP_DUP_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
        "SMTP_DUP_RELAY_SPOOL_DIR": str(tmp_path / "spool"),
        "SMTP_DUP_RELAY_RETRY_INITIAL_SECONDS": "0.2",
        "SMTP_DUP_RELAY_RETRY_MAX_INTERVAL_SECONDS": "0.5",
        **variables,
    }


def address(variables: dict[str, str], key: str = "SMTP_DUP_SMTP_LISTEN") -> tuple[str, int]:
    host, _, port = variables[key].rpartition(":")
    return host, int(port)


def send(relay_address: tuple[str, int], subject: str, recipients=("bob@example.com",)) -> dict:
    with smtplib.SMTP(*relay_address, timeout=WAIT_TIMEOUT) as smtp:
        return smtp.sendmail("alice@example.com", list(recipients),
                             f"Subject: {subject}\r\n\r\nbody of {subject}\r\n".encode())


def readyz(variables: dict[str, str]) -> int:
    host, port = address(variables, "SMTP_DUP_METRICS_LISTEN")
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=WAIT_TIMEOUT) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def read_reply(sock: socket.socket) -> bytes:
    """One complete (possibly multiline) SMTP reply."""
    data = b""
    while not data.endswith(b"\r\n") or data.split(b"\r\n")[-2][3:4] == b"-":
        chunk = sock.recv(4096)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


# --------------------------------------------------------------------------
# --version and --help


def test_version(tmp_path):
    result = run(["--version"], tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("smtpdup ") and result.stdout.split()[1][0].isdigit()


HELP = {
    "smtpdup": ([], ["--config", "--version", "check", "queue", "report", "sink", "demo", "SMTP_DUP_"]),
    "run": (["run"], ["--config", "SIGHUP", "SMTP_DUP_<SECTION>_<KEY>"]),
    "check": (["check"], ["--config", "masked", "SMTP_DUP_<SECTION>_<KEY>"]),
    "queue": (["queue"], ["--config", "list", "flush", "requeue", "delete", "show"]),
    "queue list": (["queue", "list"], ["--config", "--json"]),
    "queue flush": (["queue", "flush"], ["--config", "--destination"]),
    "queue requeue": (["queue", "requeue"], ["--config", "ID", "--dead", "--destination", "postsuper -r"]),
    "queue delete": (["queue", "delete"], ["--config", "ID", "--dead", "--destination"]),
    "queue show": (["queue", "show"], ["--config", "ID", "--body"]),
    "report": (["report"], ["--config", "--since", "--json", "SMTP_DUP_<SECTION>_<KEY>"]),
    "sink": (["sink"], ["--listen", "--maildir", "--domain", "X-Envelope-From"]),
    "demo": (["demo"], ["--dir", "--listen", "demo-mail", "127.0.0.1:2525", "swaks"]),
}


@pytest.mark.parametrize("name", HELP)
def test_help_of_every_command(tmp_path, name):
    command, mentions = HELP[name]
    result = run([*command, "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: smtpdup {' '.join(command)}".rstrip())
    for word in mentions:
        assert word in result.stdout, f"{word!r} not in the help of {command}"


# --------------------------------------------------------------------------
# smtpdup check


def test_check_prints_effective_configuration_with_sources_and_masked_password(tmp_path):
    config = tmp_path / "relay.yaml"
    config.write_text(f"relay:\n  destination_primary: smtp://user:{PASSWORD}@127.0.0.1:2526\n"
                      f"  timeout_seconds: 7\n")
    result = run(["check", "--config", str(config)], tmp_path,
                 SMTP_DUP_RELAY_DESTINATION_BACKUPS=f"smtps://archive:{PASSWORD}@archive.example,new.example:25")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert PASSWORD not in result.stdout
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if not line.startswith("#")}
    assert str(config) in result.stdout.splitlines()[0]
    assert lines["relay.destination_primary"].split("=", 1)[1].split() == [
        "smtp://user:***@127.0.0.1:2526", f"({config})"]
    assert lines["relay.destination_backups"].endswith("(SMTP_DUP_RELAY_DESTINATION_BACKUPS)")
    assert "smtps://archive:***@archive.example:465" in lines["relay.destination_backups"]
    assert lines["relay.timeout_seconds"].split("=", 1)[1].split() == ["7", f"({config})"]
    assert lines["relay.backup_concurrency"].split("=", 1)[1].split() == ["32", "(default)"]


def test_environment_overrides_the_file_found_in_the_working_directory(tmp_path):
    (tmp_path / "config.yaml").write_text(
        "smtp:\n  domain: file.example\nrelay:\n  destination_primary: 127.0.0.1:2526\n  timeout_seconds: 7\n")
    result = run(["check"], tmp_path, SMTP_DUP_RELAY_TIMEOUT_SECONDS="3")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if not line.startswith("#")}
    found = str(tmp_path / "config.yaml")
    assert found in result.stdout.splitlines()[0]
    assert lines["relay.timeout_seconds"].split("=", 1)[1].split() == ["3", "(SMTP_DUP_RELAY_TIMEOUT_SECONDS)"]
    assert lines["smtp.domain"].split("=", 1)[1].split() == ["file.example", f"({found})"]
    assert lines["relay.destination_primary"].split("=", 1)[1].split() == ["127.0.0.1:2526", f"({found})"]


# Each case: files to write in the working directory, arguments before the
# command, environment, and what the one line must name.
BAD_CONFIGS = {
    "missing primary": ({}, [], {"SMTP_DUP_CONFIG": "empty.yaml"},
                        ["relay.destination_primary", "SMTP_DUP_RELAY_DESTINATION_PRIMARY"]),
    "unknown key in file": ({"c.yaml": "relay:\n  destination_primary: h:25\n  timeout_secnds: 3\n"},
                            ["--config", "c.yaml"], {},
                            ["relay.timeout_secnds", "did you mean relay.timeout_seconds", "c.yaml"]),
    "unknown environment variable": ({}, [], {"SMTP_DUP_CONFIG": "empty.yaml",
                                              "SMTP_DUP_RELAY_DESTINATION_PRIMARY": "h:25",
                                              "SMTP_DUP_RELAY_TIMEOUT_SECNDS": "3"},
                                     ["SMTP_DUP_RELAY_TIMEOUT_SECNDS", "SMTP_DUP_RELAY_TIMEOUT_SECONDS"]),
    "wrong type in environment": ({}, [], {"SMTP_DUP_CONFIG": "empty.yaml",
                                           "SMTP_DUP_RELAY_DESTINATION_PRIMARY": "h:25",
                                           "SMTP_DUP_RELAY_TIMEOUT_SECONDS": "ten"},
                                  ["relay.timeout_seconds", "SMTP_DUP_RELAY_TIMEOUT_SECONDS", "'ten'"]),
    "unparsable destination in environment": (
        {}, [], {"SMTP_DUP_CONFIG": "empty.yaml",
                 "SMTP_DUP_RELAY_DESTINATION_PRIMARY": f"smtp://user:{PASSWORD}@h:99999"},
        ["relay.destination_primary", "SMTP_DUP_RELAY_DESTINATION_PRIMARY", "port"]),
    "unparsable destination in file": (
        {"config.yaml": "relay:\n  destination_primary: h:25\n  destination_backups: [h2:25, 'smtp//x']\n"},
        [], {}, ["relay.destination_backups", "config.yaml", "smtp//x"]),
    "wrong type in the file found in the working directory": (
        {"config.yaml": "relay:\n  destination_primary: h:25\nsmtp:\n  max_recipients: many\n"},
        [], {}, ["smtp.max_recipients", "config.yaml", "'many'"]),
    "YAML syntax error": ({"c.yaml": "relay:\n  destination_primary: [h:25\n"}, ["--config", "c.yaml"], {},
                          ["c.yaml", "YAML syntax error", "line"]),
    "--config file missing": ({}, ["--config", "nowhere.yaml"], {}, ["nowhere.yaml", "--config", "no such file"]),
    "SMTP_DUP_CONFIG file missing": ({}, [], {"SMTP_DUP_CONFIG": "nowhere.yaml"},
                                     ["nowhere.yaml", "SMTP_DUP_CONFIG", "no such file"]),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_configuration_exits_2_with_one_line(tmp_path, case):
    files, options, variables, names = BAD_CONFIGS[case]
    (tmp_path / "empty.yaml").write_text("")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    environ = clean_environ(SMTP_DUP_SMTP_LISTEN="127.0.0.1:0", SMTP_DUP_METRICS_LISTEN="", **variables)
    # `check` and the relay itself, side by side.
    processes = {
        command: subprocess.Popen([sys.executable, "-m", "smtpdup", *options, *command], cwd=tmp_path,
                                  env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command in (("check",), ())
    }
    try:
        for command, process in processes.items():
            stdout, stderr = process.communicate(timeout=RUN_TIMEOUT)
            what = f"smtpdup {' '.join(command)}: {stderr!r}"
            assert process.returncode == 2, what
            assert stdout == "", what
            assert len(stderr.splitlines()) == 1 and stderr.endswith("\n"), what
            assert stderr.startswith("smtpdup: config: "), what
            for name in names:
                assert name in stderr, f"{name!r} missing from {what}"
            assert "Traceback" not in stderr and PASSWORD not in stderr, what
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=START_TIMEOUT)


def test_spool_dir_that_is_a_file_exits_2_with_one_line(tmp_path):
    (tmp_path / "spool").write_text("not a directory\n")
    result = run([], tmp_path, **relay_variables(tmp_path, SMTP_DUP_RELAY_DESTINATION_PRIMARY="127.0.0.1:1",
                                                  SMTP_DUP_RELAY_DESTINATION_BACKUPS="127.0.0.1:2"))
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("smtpdup: spool: ") and str(tmp_path / "spool") in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [[], ["sink", "--maildir", "mail"], ["demo", "--dir", "mail"]],
                         ids=["relay", "sink", "demo"])
def test_busy_listen_address_exits_2_with_one_line(tmp_path, command):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        variables = relay_variables(tmp_path, SMTP_DUP_RELAY_DESTINATION_PRIMARY="127.0.0.1:1",
                                    SMTP_DUP_SMTP_LISTEN=busy, SMTP_DUP_METRICS_LISTEN="")
        result = run(command + (["--listen", busy] if command else []), tmp_path, **variables)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("smtpdup: ") and busy in result.stderr
    assert result.stderr.endswith(": Address already in use\n") and "Traceback" not in result.stderr
    if not command:
        assert "smtp.listen (SMTP_DUP_SMTP_LISTEN)" in result.stderr


# --------------------------------------------------------------------------
# The relay running


def test_relay_delivers_and_drains_on_sigterm(tmp_path, upstreams, background):
    primary, backup = upstreams("primary"), upstreams("backup")
    variables = relay_variables(tmp_path, SMTP_DUP_RELAY_DESTINATION_PRIMARY=primary.address,
                                SMTP_DUP_RELAY_DESTINATION_BACKUPS=backup.address,
                                SMTP_DUP_SMTP_SHUTDOWN_GRACE_SECONDS="8")
    relay = background([], **variables)
    relay.wait_for_event("started")
    relay_address = address(variables)
    assert readyz(variables) == 200

    assert send(relay_address, "first") == {}
    [at_primary] = primary.wait_for(1)
    [at_backup] = backup.wait_for(1)
    assert at_primary.body_without_trace == at_backup.body_without_trace == b"Subject: first\r\n\r\nbody of first\r\n"

    # An idle client, and one in a transaction, when SIGTERM comes.
    busy = smtplib.SMTP(*relay_address, timeout=WAIT_TIMEOUT)
    with socket.create_connection(relay_address, timeout=WAIT_TIMEOUT) as idle, busy.sock:
        assert read_reply(idle).startswith(b"220 ")
        idle.sendall(b"EHLO idle.example\r\n")
        assert read_reply(idle).startswith(b"250")
        busy.ehlo()
        assert busy.mail("alice@example.com")[0] == 250
        assert busy.rcpt("carol@example.com")[0] == 250

        relay.signal(signal.SIGTERM)
        idle_reply = read_reply(idle)
        assert idle_reply.startswith(b"421 4.3.2 "), idle_reply
        assert idle.recv(100) == b""  # and closed
        wait_until(lambda: readyz(variables) == 503, what="/readyz to answer 503 while draining")
        # The transaction in flight may finish within the grace.
        code, _ = busy.data(b"Subject: in flight\r\n\r\nfinished while draining\r\n")
        assert code == 250
        # Then it is idle, and told so.
        code, text = busy.docmd("NOOP")
        assert (code, text[:5]) == (421, b"4.3.2")
    assert relay.wait(timeout=10) == 0
    assert primary.wait_for(2)[1].rcpt_tos == ["carol@example.com"]
    stopped = [e for e in relay.events() if e.get("event") == "stopped"]
    assert len(stopped) == 1
    assert "Traceback" not in relay.log()


def test_sighup_reloads_the_backup_list_and_keeps_the_old_one_when_invalid(tmp_path, upstreams, background):
    primary, old_backup, new_backup = upstreams("primary"), upstreams("old"), upstreams("new")
    config = tmp_path / "relay.yaml"

    def write_config(backups: str) -> None:
        text = f"relay:\n  destination_primary: {primary.address}\n  destination_backups: {backups}\n"
        (tmp_path / "relay.yaml.tmp").write_text(text)
        (tmp_path / "relay.yaml.tmp").replace(config)

    write_config(f"[{old_backup.address}]")
    variables = relay_variables(tmp_path, config_file=config)
    relay = background([], **variables)
    relay.wait_for_event("started")
    relay_address = address(variables)
    send(relay_address, "one")
    old_backup.wait_for(1)

    # An invalid file: logged, the relay keeps serving with the old list.
    write_config("[127.0.0.1:notaport]")
    relay.signal(signal.SIGHUP)
    failed = relay.wait_for_event("reload_failed")
    assert "relay.destination_backups" in failed["error"] and str(config) in failed["error"]
    send(relay_address, "two")
    assert old_backup.wait_for(2)[1].body_without_trace.startswith(b"Subject: two\r\n")
    assert primary.count() == 2

    # A valid one: the next message is copied to the new backup only.
    write_config(f"[{new_backup.address}]")
    relay.signal(signal.SIGHUP)
    relay.wait_for_event("reloaded")
    send(relay_address, "three")
    [copy] = new_backup.wait_for(1)
    assert copy.body_without_trace.startswith(b"Subject: three\r\n")
    assert primary.wait_for(3) and old_backup.count() == 2

    relay.signal(signal.SIGTERM)
    assert relay.wait() == 0
    assert "Traceback" not in relay.log()


# --------------------------------------------------------------------------
# smtpdup sink


def test_sink_stores_envelope_and_content_as_meant(tmp_path, background):
    # Neither a broken ./config.yaml nor SMTP_DUP_* variables concern a sink.
    (tmp_path / "config.yaml").write_text("relay: [broken\n")
    port = free_port()
    maildir = tmp_path / "mail"
    sink = background(["sink", "--listen", f"127.0.0.1:{port}", "--maildir", str(maildir)],
                      SMTP_DUP_BOGUS="1", SMTP_DUP_CONFIG=str(tmp_path / "nowhere.yaml"))
    sink.wait_for_text("listening on 127.0.0.1:")

    # Lines that start with dots, a line holding a single dot, UTF-8, and
    # enough of them that dot-stuffed lines straddle the sink's reads.
    lines = ["Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=", "", ".leading dot", "..two dots", ".", "Grüße, 日本"]
    lines += [f".{n:06d} " + "x" * (n % 97) for n in range(4000)]
    content = ("\r\n".join(lines) + "\r\n").encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=WAIT_TIMEOUT) as smtp:
        assert smtp.sendmail("alice@example.com", ["bob@example.com", "carol@example.org"], content) == {}
        smtp.sendmail("", ["dave@example.net"], b"Subject: bounce\r\n\r\n.\r\n")

    stored = sorted((maildir / "new").iterdir())
    assert len(stored) == 2
    assert stored[0].read_bytes() == (
        b"X-Envelope-From: <alice@example.com>\r\n"
        b"X-Envelope-To: <bob@example.com>, <carol@example.org>\r\n" + content
    )
    assert stored[1].read_bytes() == (
        b"X-Envelope-From: <>\r\nX-Envelope-To: <dave@example.net>\r\nSubject: bounce\r\n\r\n.\r\n"
    )
    assert list((maildir / "tmp").iterdir()) == []
    sink.signal(signal.SIGTERM)
    assert sink.wait() == 0
    assert "Traceback" not in sink.log()


def test_sink_undoes_dot_stuffing_however_the_content_is_split(tmp_path):
    # In-process, deterministic: every split point of the wire content, and
    # one byte at a time (over a socket, splits fall where they may).
    from smtpdup.sink import Maildir, SinkSession

    wire = b".a\r\n..\r\nb.\r\n...c\r\n\r\n..\r\n"
    meant = b"a\r\n.\r\nb.\r\n..c\r\n\r\n.\r\n"
    splits = [[wire[:n], wire[n:]] for n in range(len(wire) + 1)] + [[bytes([b]) for b in wire]]
    maildir = Maildir(str(tmp_path / "mail"))
    for chunks in splits:
        session = SinkSession(maildir, "127.0.0.1")
        session.mail("a@example.com", {})
        session.rcpt("b@example.com", {})
        session.data()
        for chunk in chunks:
            session.data_chunk(chunk)
        name = session.data_end().text.rpartition(" ")[2]
        stored = (tmp_path / "mail" / "new" / name).read_bytes()
        assert stored.partition(b"X-Envelope-To: <b@example.com>\r\n")[2] == meant, chunks
