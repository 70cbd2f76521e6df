"""`smtpdup check` refuses what `smtpdup run` refuses, with the same line;
`check --connect` opens a session to every destination and sends no mail.

Every command is `python -m smtpdup ...` as a subprocess (stopped by its PID
if it outlives its bound), configured by SMTP_DUP_* variables alone; the
destinations are conftest's aiosmtpd upstreams.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

PASSWORD = "s3cret-Pa55"
# `check` answers at once; `run` exits at once when it refuses to start.
COMMAND_TIMEOUT = 30.0


def environ(tmp_path: Path, **variables: str) -> dict[str, str]:
    """The process environment without SMTP_DUP_*, plus a minimal valid
    relay configuration (spool under tmp_path) and ``variables``."""
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTP_DUP_")}
    env.update({
        "SMTP_DUP_CONFIG": str(config),
        "SMTP_DUP_SMTP_LISTEN": f"127.0.0.1:{free_port()}",
        "SMTP_DUP_METRICS_LISTEN": "",
        "SMTP_DUP_RELAY_DESTINATION_PRIMARY": "127.0.0.1:1",
        "SMTP_DUP_RELAY_SPOOL_DIR": str(tmp_path / "spool"),
        "SMTP_DUP_RELAY_TIMEOUT_SECONDS": "5",
        **variables,
    })
    return env


def smtpdup(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """Run `python -m smtpdup ARGS` to its end; a process still running after
    COMMAND_TIMEOUT (a relay that started although it should have refused)
    is killed by its PID and reported as status None."""
    proc = subprocess.Popen([sys.executable, "-m", "smtpdup", *args], cwd=cwd, env=env, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = proc.communicate(timeout=COMMAND_TIMEOUT)
        status = proc.returncode
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=COMMAND_TIMEOUT)
        status = None
    return subprocess.CompletedProcess(proc.args, status, stdout, stderr)


# --- check refuses what run refuses -----------------------------------------------


def _missing_certificate(tmp_path, certificates, other_certificates):
    return {"SMTP_DUP_SMTP_TLS_CERT_FILE": str(tmp_path / "missing.pem"),
            "SMTP_DUP_SMTP_TLS_KEY_FILE": str(certificates.key)}, "smtp.tls_cert_file"


def _missing_key(tmp_path, certificates, other_certificates):
    return {"SMTP_DUP_SMTP_TLS_CERT_FILE": str(certificates.cert),
            "SMTP_DUP_SMTP_TLS_KEY_FILE": str(tmp_path / "missing.key")}, "smtp.tls_key_file"


def _key_not_matching(tmp_path, certificates, other_certificates):
    return {"SMTP_DUP_SMTP_TLS_CERT_FILE": str(certificates.cert),
            "SMTP_DUP_SMTP_TLS_KEY_FILE": str(other_certificates.key)}, "smtp.tls_key_file"


def _encrypted_key(tmp_path, certificates, other_certificates):
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", str(certificates.key), "-aes256", "-passout", "pass:x",
                    "-out", str(encrypted)], check=True, capture_output=True, timeout=COMMAND_TIMEOUT)
    return {"SMTP_DUP_SMTP_TLS_CERT_FILE": str(certificates.cert),
            "SMTP_DUP_SMTP_TLS_KEY_FILE": str(encrypted)}, "smtp.tls_key_file"


def _certificate_not_pem(tmp_path, certificates, other_certificates):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    return {"SMTP_DUP_SMTP_TLS_CERT_FILE": str(garbage),
            "SMTP_DUP_SMTP_TLS_KEY_FILE": str(certificates.key)}, "smtp.tls_cert_file"


def _missing_ca_file(tmp_path, certificates, other_certificates):
    return {"SMTP_DUP_RELAY_TLS_CA_FILE": str(tmp_path / "missing-ca.pem")}, "relay.tls_ca_file"


def _ca_file_without_certificates(tmp_path, certificates, other_certificates):
    empty = tmp_path / "empty-ca.pem"
    empty.write_text("# no certificate here\n")
    return {"SMTP_DUP_RELAY_TLS_CA_FILE": str(empty)}, "relay.tls_ca_file"


def _ca_file_a_directory(tmp_path, certificates, other_certificates):
    return {"SMTP_DUP_RELAY_TLS_CA_FILE": str(tmp_path)}, "relay.tls_ca_file"


def _spool_a_file(tmp_path, certificates, other_certificates):
    (tmp_path / "spool-file").write_text("not a directory\n")
    return {"SMTP_DUP_RELAY_SPOOL_DIR": str(tmp_path / "spool-file")}, "relay.spool_dir"


def _spool_under_a_file(tmp_path, certificates, other_certificates):
    (tmp_path / "a-file").write_text("not a directory\n")
    return {"SMTP_DUP_RELAY_SPOOL_DIR": str(tmp_path / "a-file" / "spool")}, "relay.spool_dir"


REFUSED = [_missing_certificate, _missing_key, _key_not_matching, _encrypted_key, _certificate_not_pem, _missing_ca_file,
           _ca_file_without_certificates, _ca_file_a_directory, _spool_a_file, _spool_under_a_file]


@pytest.mark.parametrize("case", REFUSED, ids=[case.__name__.strip("_") for case in REFUSED])
def test_check_and_run_refuse_the_same_with_the_same_line(tmp_path, certificates, other_certificates, case):
    variables, key = case(tmp_path, certificates, other_certificates)
    env = environ(tmp_path, **variables)
    checked = smtpdup(["check"], env, tmp_path)
    started = smtpdup([], env, tmp_path)
    for what, result in (("check", checked), ("run", started)):
        assert result.returncode == 2, f"{what} exited {result.returncode}: {result.stderr}"
        lines = result.stderr.splitlines()
        assert len(lines) == 1, f"{what}: {result.stderr}"
        assert key in lines[0] and "Traceback" not in result.stderr, f"{what}: {lines[0]}"
    assert checked.stderr == started.stderr
    assert checked.stdout == ""  # nothing printed as if the configuration were valid


def test_check_names_the_mismatched_key_and_its_certificate(tmp_path, certificates, other_certificates):
    env = environ(tmp_path, SMTP_DUP_SMTP_TLS_CERT_FILE=str(certificates.cert),
                  SMTP_DUP_SMTP_TLS_KEY_FILE=str(other_certificates.key))
    result = smtpdup(["check"], env, tmp_path)
    assert result.returncode == 2
    assert result.stderr == (f"smtpdup: config: smtp.tls_key_file (SMTP_DUP_SMTP_TLS_KEY_FILE): "
                             f"{other_certificates.key} does not match the certificate in {certificates.cert}\n")


def test_check_spool_that_is_a_file_names_the_key_and_the_path(tmp_path):
    spool = tmp_path / "spool"
    spool.write_text("not a directory\n")
    result = smtpdup(["check"], environ(tmp_path), tmp_path)
    assert result.returncode == 2
    assert result.stderr == (f"smtpdup: spool: relay.spool_dir (SMTP_DUP_RELAY_SPOOL_DIR): "
                             f"{spool} exists and is not a directory\n")


def test_check_accepts_a_good_tls_setup_and_creates_no_spool(tmp_path, certificates):
    spool = tmp_path / "not-yet" / "spool"
    env = environ(tmp_path, SMTP_DUP_SMTP_TLS_CERT_FILE=str(certificates.cert),
                  SMTP_DUP_SMTP_TLS_KEY_FILE=str(certificates.key),
                  SMTP_DUP_RELAY_TLS_CA_FILE=str(certificates.ca), SMTP_DUP_RELAY_SPOOL_DIR=str(spool))
    result = smtpdup(["check"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "configuration is valid" in result.stdout
    assert not (tmp_path / "not-yet").exists()  # creatable, and not created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.yaml"]


def test_check_leaves_an_existing_spool_as_it_was(tmp_path):
    spool = tmp_path / "spool"
    (spool / "tmp").mkdir(parents=True)
    result = smtpdup(["check"], environ(tmp_path), tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in spool.rglob("*")) == ["tmp"]


# --- check --connect -----------------------------------------------------------------


def test_check_connect_names_the_destination_that_is_down(tmp_path, upstreams, certificates):
    primary = upstreams("primary")
    secure = upstreams("secure", tls=certificates, auth=f"relay:{PASSWORD}")
    down = upstreams("down")
    down.stop()  # keeps its address: nothing listens there now
    backups = [f"smtp://relay:{PASSWORD}@127.0.0.1:{secure.port}?starttls=require", down.address]
    env = environ(tmp_path, SMTP_DUP_RELAY_DESTINATION_PRIMARY=primary.address,
                  SMTP_DUP_RELAY_DESTINATION_BACKUPS=",".join(backups),
                  SMTP_DUP_RELAY_TLS_CA_FILE=str(certificates.ca))
    result = smtpdup(["check", "--connect"], env, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    [summary] = result.stderr.splitlines()
    assert down.address in summary and "1 of 3" in summary
    assert primary.address not in summary and str(secure.port) not in summary
    out = result.stdout
    # Each reachable destination: its greeting and EHLO extensions.
    primary_part = out.split(f"# primary {primary.address}\n", 1)[1].split("\n#", 1)[0]
    assert "greeting: 220 upstream.test" in primary_part
    assert "PIPELINING" in primary_part and "SMTPUTF8" in primary_part and "STARTTLS" not in primary_part
    secure_part = out.split(f"# backup smtp://relay@127.0.0.1:{secure.port}?starttls=require\n", 1)[1]
    secure_part = secure_part.split("\n#", 1)[0]
    assert "tls: TLSv1" in secure_part and "auth: as relay" in secure_part
    assert "AUTH" in secure_part  # the extensions after STARTTLS
    down_part = out.split(f"# backup {down.address}\n", 1)[1]
    assert "FAILED" in down_part and "connection refused" in down_part
    assert PASSWORD not in out + result.stderr
    # Sessions without a transaction, ended by QUIT.
    for upstream in (primary, secure):
        commands = upstream.commands()
        assert "EHLO" in commands and commands[-1] == "QUIT", commands
        assert "MAIL" not in commands and "RCPT" not in commands and "DATA" not in commands
        assert upstream.count() == 0
    assert secure.commands() == ["EHLO", "STARTTLS", "EHLO", "AUTH", "QUIT"]


def test_check_connect_exits_0_when_every_destination_answers(tmp_path, upstreams, certificates):
    primary = upstreams("primary", tls=certificates, smtps=True)
    backup = upstreams("backup")
    env = environ(tmp_path, SMTP_DUP_RELAY_DESTINATION_PRIMARY=f"smtps://127.0.0.1:{primary.port}",
                  SMTP_DUP_RELAY_DESTINATION_BACKUPS=backup.address,
                  SMTP_DUP_RELAY_TLS_CA_FILE=str(certificates.ca))
    result = smtpdup(["check", "--connect"], env, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    assert result.stdout.count("  ok: ") == 2
    assert "MAIL" not in primary.commands() + backup.commands()


def test_check_connect_reports_a_refusal_such_as_an_untrusted_certificate(tmp_path, upstreams, certificates,
                                                                          other_certificates):
    primary = upstreams("primary", tls=other_certificates)
    env = environ(tmp_path, SMTP_DUP_RELAY_DESTINATION_PRIMARY=f"smtp://127.0.0.1:{primary.port}?starttls=require",
                  SMTP_DUP_RELAY_TLS_CA_FILE=str(certificates.ca))
    result = smtpdup(["check", "--connect"], env, tmp_path)
    assert result.returncode == 1
    assert "certificate verify failed" in result.stdout
    assert f"127.0.0.1:{primary.port}" in result.stderr
    assert "MAIL" not in primary.commands()


def test_check_connect_is_not_attempted_for_an_invalid_configuration(tmp_path, upstreams):
    primary = upstreams("primary")
    env = environ(tmp_path, SMTP_DUP_RELAY_DESTINATION_PRIMARY=primary.address,
                  SMTP_DUP_RELAY_TLS_CA_FILE=str(tmp_path / "missing.pem"))
    result = smtpdup(["check", "--connect"], env, tmp_path)
    assert result.returncode == 2
    assert primary.commands() == []
