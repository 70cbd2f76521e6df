"""Outbound TLS and AUTH against real peers: aiosmtpd upstreams (STARTTLS,
implicit TLS, AUTH PLAIN/LOGIN) with certificates made by the test's own
CA, as the primary and as backups.

``starttls=may`` is opportunistic and unverified; ``require`` and
``smtps://`` verify the certificate against ``relay.tls_ca_file`` and check
the host name; credentials never cross the network in clear.
"""

from __future__ import annotations

import logging
import os
import smtplib

import postfix_tools
import pytest
from conftest import MESSAGE, Stored, Upstream, client, make_certificates, wait_until

from smtpdup import report

SENDER = "alice@example.com"
RECIPIENT = "bob@example.com"
PASSWORD = "s3cret-Pa55"


def send(service, recipients=(RECIPIENT,)):
    with client(service) as smtp:
        return smtp.sendmail(SENDER, list(recipients), MESSAGE)


def send_refused(service) -> tuple[int, bytes]:
    """A message the relay must refuse at MAIL: the code and text it gave."""
    with client(service) as smtp:
        smtp.ehlo()
        code, text = smtp.mail(SENDER)
        smtp.rset()
    return code, text


def log_lines(caplog, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == message]


def no_password_in(caplog) -> bool:
    return all(PASSWORD not in repr(r.__dict__) for r in caplog.records)


def pending_replies(service) -> list[str]:
    return [e["last_reply"] or "" for e in report.queue_entries(service.spool) if e["state"] == "pending"]


def wait_for_backup_attempt(caplog) -> logging.LogRecord:
    wait_until(lambda: log_lines(caplog, "backup_attempt"), what="a backup attempt")
    return log_lines(caplog, "backup_attempt")[0]


def plain(upstream) -> str:
    return f"smtp://127.0.0.1:{upstream.port}"


def with_auth(upstream, scheme: str = "smtp", user: str = "relay", query: str = "") -> str:
    return f"{scheme}://{user}:{PASSWORD}@127.0.0.1:{upstream.port}{query}"


# --- starttls=may: opportunistic --------------------------------------------


def test_may_encrypts_when_the_primary_offers_starttls(upstreams, relay, certificates):
    primary = upstreams("primary", tls=certificates)
    service = relay(f"{plain(primary)}?starttls=may")
    assert send(service) == {}
    [stored] = primary.wait_for(1)
    assert stored.tls, "the session was not encrypted"
    assert stored.body_without_trace == MESSAGE
    commands = primary.commands()
    assert commands.index("STARTTLS") < commands.index("MAIL")
    assert all(e["tls"] for e in primary.events() if e["command"] == "MAIL")


def test_may_is_unverified(upstreams, relay, other_certificates, certificates):
    """A certificate from a CA nobody trusts is fine for opportunistic TLS."""
    primary = upstreams("primary", tls=other_certificates)
    service = relay(f"{plain(primary)}?starttls=may", relay_tls_ca_file=str(certificates.ca))
    assert send(service) == {}
    assert primary.wait_for(1)[0].tls


def test_may_delivers_in_plain_text_without_starttls(upstreams, relay):
    primary = upstreams("primary")
    service = relay(f"{plain(primary)}?starttls=may")
    assert send(service) == {}
    [stored] = primary.wait_for(1)
    assert not stored.tls
    assert "STARTTLS" not in primary.commands()


def test_may_falls_back_to_plain_text_when_the_handshake_fails(upstreams, relay, certificates, caplog):
    """The server offers STARTTLS but cannot complete a handshake (it speaks
    only TLS 1.1): opportunistic TLS delivers in plain text, on a new
    connection, as Postfix does."""
    primary = upstreams("primary", tls=certificates, tls_max_version="TLSv1_1")
    service = relay(f"{plain(primary)}?starttls=may")
    assert send(service) == {}
    [stored] = primary.wait_for(1)
    assert not stored.tls
    commands = primary.commands()
    assert commands.index("STARTTLS") < commands.index("MAIL")
    assert commands.count("EHLO") == 2  # the second session, plain text, no STARTTLS
    assert commands[commands.index("STARTTLS") + 1:].count("STARTTLS") == 0


def test_no_credentials_after_a_failed_handshake(upstreams, relay, certificates, caplog):
    primary = upstreams("primary", tls=certificates, tls_max_version="TLSv1_1", auth=f"relay:{PASSWORD}",
                        auth_in_clear=True)
    service = relay(with_auth(primary))
    with caplog.at_level("DEBUG", logger="smtpdup"):
        code, _ = send_refused(service)
    assert code == 451
    assert "AUTH" not in primary.commands() and "MAIL" not in primary.commands()
    reply = log_lines(caplog, "primary_unavailable")[0].reply
    assert "not sending credentials without TLS (the TLS handshake failed)" in reply


def test_require_fails_cleanly_when_the_handshake_fails(upstreams, relay, certificates, caplog):
    primary = upstreams("primary", tls=certificates, tls_max_version="TLSv1_1")
    service = relay(f"{plain(primary)}?starttls=require", relay_tls_ca_file=str(certificates.ca))
    with caplog.at_level("DEBUG", logger="smtpdup"):
        code, _ = send_refused(service)
    assert code == 451
    assert "MAIL" not in primary.commands()
    assert "TLS handshake failed" in log_lines(caplog, "primary_unavailable")[0].reply


def test_may_encrypts_backup_copies(upstreams, relay, certificates):
    primary = upstreams("primary")
    backup = upstreams("backup", tls=certificates)
    service = relay(primary.address, [f"{plain(backup)}?starttls=may"])
    assert send(service) == {}
    [stored] = backup.wait_for(1)
    assert stored.tls
    assert stored.rcpt_tos == [RECIPIENT]


# --- starttls=require and smtps://: verified ---------------------------------


def test_require_with_a_trusted_certificate_delivers_encrypted(upstreams, relay, certificates):
    primary = upstreams("primary", tls=certificates)
    backup = upstreams("backup", tls=certificates)
    service = relay(f"{plain(primary)}?starttls=require", [f"{plain(backup)}?starttls=require"],
                    relay_tls_ca_file=str(certificates.ca))
    assert send(service) == {}
    assert primary.wait_for(1)[0].tls
    assert backup.wait_for(1)[0].tls


def test_require_refuses_an_untrusted_primary_and_says_why(upstreams, relay, certificates, other_certificates,
                                                           caplog):
    primary = upstreams("primary", tls=other_certificates)
    service = relay(f"{plain(primary)}?starttls=require", relay_tls_ca_file=str(certificates.ca))
    with caplog.at_level("DEBUG", logger="smtpdup"):
        code, _ = send_refused(service)
    assert code == 451
    assert primary.count() == 0
    assert "MAIL" not in primary.commands()
    [line] = log_lines(caplog, "primary_unavailable")
    assert line.reply.startswith("451 ")
    assert f"127.0.0.1:{primary.port}" in line.reply
    assert "certificate verify failed" in line.reply


def test_require_refuses_an_untrusted_backup_and_keeps_the_copy(upstreams, relay, certificates,
                                                                other_certificates, caplog):
    primary = upstreams("primary")
    backup = upstreams("backup", tls=other_certificates)
    service = relay(primary.address, [f"{plain(backup)}?starttls=require"], relay_tls_ca_file=str(certificates.ca))
    with caplog.at_level("DEBUG", logger="smtpdup"):
        assert send(service) == {}
        attempt = wait_for_backup_attempt(caplog)
    assert attempt.reply.startswith("451 ") and "certificate verify failed" in attempt.reply
    assert f"127.0.0.1:{backup.port}" in attempt.reply
    [reply] = pending_replies(service)
    assert "certificate verify failed" in reply
    assert backup.count() == 0
    assert "MAIL" not in backup.commands()


def test_require_checks_the_host_name(upstreams, relay, certificates, tmp_path, caplog):
    """A certificate from the trusted CA, but for another name."""
    elsewhere = make_certificates(tmp_path / "tls", "elsewhere", names="DNS:mail.example", signer=certificates)
    primary = upstreams("primary", tls=elsewhere)
    service = relay(f"{plain(primary)}?starttls=require", relay_tls_ca_file=str(certificates.ca))
    with caplog.at_level("DEBUG", logger="smtpdup"):
        code, _ = send_refused(service)
    assert code == 451
    assert primary.count() == 0 and "MAIL" not in primary.commands()
    reply = log_lines(caplog, "primary_unavailable")[0].reply
    assert "certificate verify failed" in reply and "127.0.0.1" in reply


def test_may_does_not_check_the_host_name(upstreams, relay, certificates, tmp_path):
    elsewhere = make_certificates(tmp_path / "tls", "elsewhere", names="DNS:mail.example", signer=certificates)
    primary = upstreams("primary", tls=elsewhere)
    service = relay(plain(primary), relay_tls_ca_file=str(certificates.ca))
    assert send(service) == {}
    assert primary.wait_for(1)[0].tls


def test_require_uses_the_system_store_without_a_ca_file(upstreams, relay, certificates, caplog):
    """No relay.tls_ca_file: the test CA is not in the system store."""
    primary = upstreams("primary", tls=certificates)
    service = relay(f"{plain(primary)}?starttls=require")
    with caplog.at_level("DEBUG", logger="smtpdup"):
        code, _ = send_refused(service)
    assert code == 451
    assert "certificate verify failed" in log_lines(caplog, "primary_unavailable")[0].reply


def test_require_refuses_a_server_without_starttls(upstreams, relay, certificates, caplog):
    primary = upstreams("primary")
    service = relay(f"{plain(primary)}?starttls=require", relay_tls_ca_file=str(certificates.ca))
    with caplog.at_level("DEBUG", logger="smtpdup"):
        code, _ = send_refused(service)
    assert code == 451
    assert "does not offer STARTTLS" in log_lines(caplog, "primary_unavailable")[0].reply
    assert "MAIL" not in primary.commands()


def test_smtps_primary_and_backup_deliver(upstreams, relay, certificates):
    primary = upstreams("primary", tls=certificates, smtps=True)
    backup = upstreams("backup", tls=certificates, smtps=True)
    service = relay(f"smtps://127.0.0.1:{primary.port}", [f"smtps://127.0.0.1:{backup.port}"],
                    relay_tls_ca_file=str(certificates.ca))
    assert send(service) == {}
    [at_primary] = primary.wait_for(1)
    [at_backup] = backup.wait_for(1)
    assert at_primary.tls and at_backup.tls
    assert at_primary.body_without_trace == at_backup.body_without_trace == MESSAGE


def test_smtps_refuses_an_untrusted_primary(upstreams, relay, certificates, other_certificates, caplog):
    primary = upstreams("primary", tls=other_certificates, smtps=True)
    service = relay(f"smtps://127.0.0.1:{primary.port}", relay_tls_ca_file=str(certificates.ca))
    with caplog.at_level("DEBUG", logger="smtpdup"):
        code, _ = send_refused(service)
    assert code == 451
    assert primary.count() == 0
    assert primary.commands() == []  # not even EHLO went over an unverified channel
    assert not log_lines(caplog, "session_failed")
    assert "certificate verify failed" in log_lines(caplog, "primary_unavailable")[0].reply


def test_smtps_against_a_plain_server_fails_cleanly(upstreams, relay, certificates, caplog):
    primary = upstreams("primary")
    service = relay(f"smtps://127.0.0.1:{primary.port}", relay_tls_ca_file=str(certificates.ca),
                    relay_timeout_seconds=2)
    with caplog.at_level("DEBUG", logger="smtpdup"):
        code, _ = send_refused(service)
    assert code == 451
    assert not log_lines(caplog, "session_failed")
    assert "TLS" in log_lines(caplog, "primary_unavailable")[0].reply


# --- AUTH ---------------------------------------------------------------------


def test_auth_plain_over_starttls_as_primary(upstreams, relay, certificates, caplog):
    primary = upstreams("primary", tls=certificates, auth=f"relay:{PASSWORD}", auth_mechanisms="PLAIN")
    service = relay(with_auth(primary, query="?starttls=require"), relay_tls_ca_file=str(certificates.ca))
    with caplog.at_level("DEBUG", logger="smtpdup"):
        assert send(service) == {}
        [stored] = primary.wait_for(1)
    assert stored.tls and stored.auth_login == "relay"
    assert [e["tls"] for e in primary.events() if e["command"] == "AUTH"] == [True]
    assert no_password_in(caplog)


def test_auth_login_over_smtps_as_backup(upstreams, relay, certificates, caplog):
    primary = upstreams("primary")
    backup = upstreams("backup", tls=certificates, smtps=True, auth=f"archive:{PASSWORD}",
                       auth_mechanisms="LOGIN")
    service = relay(primary.address, [with_auth(backup, scheme="smtps", user="archive")],
                    relay_tls_ca_file=str(certificates.ca))
    with caplog.at_level("DEBUG", logger="smtpdup"):
        assert send(service) == {}
        [stored] = backup.wait_for(1)
    assert stored.tls and stored.auth_login == "archive"
    assert no_password_in(caplog)


def test_auth_over_opportunistic_tls_as_backup(upstreams, relay, certificates):
    primary = upstreams("primary")
    backup = upstreams("backup", tls=certificates, auth=f"relay:{PASSWORD}")
    service = relay(primary.address, [with_auth(backup)])  # starttls=may by default
    assert send(service) == {}
    [stored] = backup.wait_for(1)
    assert stored.tls and stored.auth_login == "relay"


@pytest.mark.parametrize("query", ["", "?starttls=may", "?starttls=off"])
def test_credentials_are_never_sent_in_clear_to_the_primary(upstreams, relay, caplog, query):
    """The server offers AUTH without STARTTLS; the relay does not use it."""
    primary = upstreams("primary", auth=f"relay:{PASSWORD}", auth_in_clear=True)
    service = relay(with_auth(primary, query=query))
    with caplog.at_level("DEBUG", logger="smtpdup"):
        code, _ = send_refused(service)
    assert code == 451
    commands = primary.commands()
    assert "EHLO" in commands and "AUTH" not in commands and "MAIL" not in commands
    assert primary.count() == 0
    [line] = log_lines(caplog, "primary_unavailable")
    assert "without TLS" in line.reply and f"127.0.0.1:{primary.port}" in line.reply
    assert no_password_in(caplog)


def test_credentials_are_never_sent_in_clear_to_a_backup(upstreams, relay, caplog):
    primary = upstreams("primary")
    backup = upstreams("backup", auth=f"relay:{PASSWORD}", auth_in_clear=True)
    service = relay(primary.address, [with_auth(backup)])
    with caplog.at_level("DEBUG", logger="smtpdup"):
        assert send(service) == {}
        attempt = wait_for_backup_attempt(caplog)
    assert "without TLS" in attempt.reply
    assert "AUTH" not in backup.commands() and "MAIL" not in backup.commands()
    assert backup.count() == 0
    assert len(pending_replies(service)) == 1  # kept, retried: a reload can fix it
    assert no_password_in(caplog)


def test_a_wrong_password_is_a_temporary_failure_naming_the_user(upstreams, relay, certificates, caplog):
    primary = upstreams("primary", tls=certificates, auth="relay:another-password")
    service = relay(with_auth(primary, query="?starttls=require"), relay_tls_ca_file=str(certificates.ca))
    with caplog.at_level("DEBUG", logger="smtpdup"):
        code, _ = send_refused(service)
    assert code == 451  # never a 5xx that would bounce the client's mail
    assert primary.count() == 0
    [line] = log_lines(caplog, "primary_unavailable")
    assert "refused AUTH as relay" in line.reply and "535" in line.reply
    assert no_password_in(caplog)


def test_the_relay_reuses_an_encrypted_primary_session(upstreams, relay, certificates):
    primary = upstreams("primary", tls=certificates, auth=f"relay:{PASSWORD}")
    service = relay(with_auth(primary, query="?starttls=require"), relay_tls_ca_file=str(certificates.ca))
    with client(service) as smtp:
        for _ in range(3):
            assert smtp.sendmail(SENDER, [RECIPIENT], MESSAGE) == {}
    stored = primary.wait_for(3)
    assert all(s.tls and s.auth_login == "relay" for s in stored)
    assert primary.commands().count("STARTTLS") == 1
    assert primary.commands().count("AUTH") == 1


def test_smtplib_client_sees_the_primary_refusal_text_unchanged(upstreams, relay, certificates):
    """A 5xx from an encrypted primary still reaches the client as it is."""
    primary = upstreams("primary", tls=certificates)
    primary.set_rules(rcpt={RECIPIENT: "550 5.1.1 no such user here"})
    service = relay(f"{plain(primary)}?starttls=require", relay_tls_ca_file=str(certificates.ca))
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        send(service)
    assert refused.value.recipients[RECIPIENT] == (550, b"5.1.1 no such user here")


# --- a real Postfix -------------------------------------------------------------
#
# One private Postfix instance (Debian's package, loopback ports) for the
# module: a listener that requires STARTTLS (smtpd_tls_security_level =
# encrypt) and one in wrapper mode (smtps). It relays what it accepts to an
# aiosmtpd sink (relayhost), so a test sees the message after Postfix's own
# queue and delivery, with Postfix's Received header telling how it came in.

postfix_unavailable = postfix_tools.postfix_available()


@pytest.fixture(scope="module")
def postfix(tmp_path_factory, certificates):
    """(instance, sink): Postfix with listeners "starttls" and "smtps"
    relaying to an aiosmtpd sink; all stopped by PID at the end."""
    if postfix_unavailable:
        pytest.skip(postfix_unavailable)
    sink = Upstream(tmp_path_factory.mktemp("postfix-sink"), "sink").start()
    instance = None
    try:
        instance = postfix_tools.start_postfix(
            listeners={
                "starttls": "",
                "smtps": "-o smtpd_tls_wrappermode=yes",
            },
            settings={
                "relayhost": f"[127.0.0.1]:{sink.port}",
                "smtpd_tls_chain_files": f"{certificates.key}, {certificates.cert}",
                "smtpd_tls_security_level": "encrypt",
                "smtpd_tls_received_header": "yes",
            },
        )
        yield instance, sink
    finally:
        if instance is not None:
            instance.stop()
        sink.stop()


def arrived_at_sink(sink, subject: bytes) -> Stored:
    """The message with ``subject`` once Postfix has delivered it to the sink."""

    def find():
        return [m for m in sink.messages() if b"Subject: " + subject + b"\r\n" in m.content]

    [stored] = wait_until(find, what=f"{subject.decode()} relayed by Postfix")
    return stored


def message(subject: bytes) -> bytes:
    return MESSAGE.replace(b"Subject: test\r\n", b"Subject: " + subject + b"\r\n")


def postfix_received(stored: Stored) -> bytes:
    """Postfix's own Received header (the first: Postfix prepends it)."""
    assert stored.content.startswith(b"Received: from "), stored.content[:200]
    return stored.content.split(b"\r\nReceived: ", 1)[0]


@pytest.mark.postfix
def test_postfix_requiring_starttls_as_primary(postfix, relay, certificates):
    instance, sink = postfix
    port = instance.ports["starttls"]
    service = relay(f"smtp://127.0.0.1:{port}?starttls=require", relay_tls_ca_file=str(certificates.ca))
    subject = b"primary over STARTTLS " + os.urandom(4).hex().encode()
    with client(service) as smtp:
        smtp.sendmail(SENDER, [RECIPIENT], message(subject))
        code, text = smtp.noop()
    stored = arrived_at_sink(sink, subject)
    assert stored.mail_from == SENDER and stored.rcpt_tos == [RECIPIENT]
    received = postfix_received(stored)
    assert b"by postfix.test (Postfix) with ESMTPS" in received, received
    assert b"(smtpdup)" in stored.content  # the relay's own trace header, further down
    assert stored.content.endswith(message(subject).split(b"\r\n\r\n", 1)[1])


@pytest.mark.postfix
def test_postfix_refuses_the_relay_in_plain_text(postfix, relay):
    """The control: this Postfix really requires STARTTLS, and its own
    refusal reaches the client."""
    instance, sink = postfix
    service = relay(f"smtp://127.0.0.1:{instance.ports['starttls']}?starttls=off")
    with client(service) as smtp:
        smtp.ehlo()
        code, text = smtp.mail(SENDER)
    assert code == 530 and b"STARTTLS" in text, (code, text)


@pytest.mark.postfix
def test_postfix_in_wrapper_mode_as_backup(postfix, upstreams, relay, certificates):
    instance, sink = postfix
    primary = upstreams("primary")
    service = relay(primary.address, [f"smtps://127.0.0.1:{instance.ports['smtps']}"],
                    relay_tls_ca_file=str(certificates.ca))
    subject = b"backup over smtps " + os.urandom(4).hex().encode()
    with client(service) as smtp:
        assert smtp.sendmail(SENDER, [RECIPIENT], message(subject)) == {}
    primary.wait_for(1)
    stored = arrived_at_sink(sink, subject)
    assert stored.rcpt_tos == [RECIPIENT]
    assert b"by postfix.test (Postfix) with ESMTPS" in postfix_received(stored)
    wait_until(lambda: not report.queue_entries(service.spool), what="the backup copy to settle")
