"""The relay end to end: a real client, the relay in this process, real
upstream servers (aiosmtpd processes) on 127.0.0.1."""

import contextlib
import json
import smtplib
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from conftest import MESSAGE, client, wait_until

from smtpdup import logs, metrics
from smtpdup.spool import BLANK_PREFIX


def send(service, sender, recipients, content=MESSAGE, **kwargs):
    with client(service) as smtp:
        return smtp.sendmail(sender, recipients, content, **kwargs)


def test_primary_and_backups_receive_the_same_content(upstreams, relay):
    primary, b1, b2 = upstreams("primary"), upstreams("b1"), upstreams("b2")
    service = relay(primary.address, [b1.address, b2.address])
    refused = send(service, "alice@example.com", ["bob@example.com", "carol@example.org"])
    assert refused == {}
    [at_primary] = primary.wait_for(1)
    [at_b1] = b1.wait_for(1)
    [at_b2] = b2.wait_for(1)
    for stored in (at_primary, at_b1, at_b2):
        assert stored.mail_from == "alice@example.com"
        assert stored.rcpt_tos == ["bob@example.com", "carol@example.org"]
        assert stored.body_without_trace == MESSAGE
        assert stored.content.count(b"Received: ") == 1
        assert stored.content == at_primary.content  # same trace header, same queue id
    assert b"by localhost (smtpdup)" in at_primary.content
    assert b"[127.0.0.1]" in at_primary.content


@pytest.mark.parametrize("received_header", [False, True], ids=["content-in-memory", "content-read-once"])
def test_backups_fed_from_memory_or_one_shared_read_get_the_primarys_bytes(upstreams, relay, received_header):
    """Without a Received header a small message is one chunk, handed to
    the backups from memory; with it, the first copy reads the spool file
    and the second reuses that read. Either way every backup gets exactly
    the primary's bytes."""
    primary, b1, b2 = upstreams("primary"), upstreams("b1"), upstreams("b2")
    service = relay(primary.address, [b1.address, b2.address], smtp_received_header=received_header)
    for n in range(3):
        assert send(service, "alice@example.com", ["bob@example.com"], MESSAGE + b"n=%d\r\n" % n) == {}
    at_primary = sorted(m.content for m in primary.wait_for(3))
    assert sorted(m.content for m in b1.wait_for(3)) == at_primary
    assert sorted(m.content for m in b2.wait_for(3)) == at_primary
    assert all((b"Received: " in c) == received_header for c in at_primary)


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined-backup", "lockstep-backup"])
def test_per_recipient_refusal_reaches_client_and_is_not_copied(upstreams, relay, pipelining):
    primary, backup = upstreams("primary"), upstreams("backup", pipelining=pipelining)
    primary.set_rules(rcpt={"nobody@example.com": "550 5.1.1 No such user here"})
    service = relay(primary.address, [backup.address])
    refused = send(service, "alice@example.com", ["bob@example.com", "nobody@example.com"])
    assert refused == {"nobody@example.com": (550, b"5.1.1 No such user here")}
    [copy] = backup.wait_for(1)
    assert copy.rcpt_tos == ["bob@example.com"]
    assert primary.messages()[0].rcpt_tos == ["bob@example.com"]


def test_primary_refusal_at_final_dot_reaches_client_and_nothing_is_copied(upstreams, relay):
    primary, backup = upstreams("primary"), upstreams("backup")
    primary.set_rules(data=["451 4.3.0 Queue file write error"])
    service = relay(primary.address, [backup.address])
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(service, "alice@example.com", ["bob@example.com"], b"Subject: first\r\n\r\nfirst\r\n")
    assert refused.value.smtp_code == 451
    assert refused.value.smtp_error == b"4.3.0 Queue file write error"
    # A second message goes through; only it reaches the backup.
    send(service, "alice@example.com", ["bob@example.com"], b"Subject: second\r\n\r\nsecond\r\n")
    [copy] = backup.wait_for(1)
    assert copy.body_without_trace == b"Subject: second\r\n\r\nsecond\r\n"
    # Nothing of the refused message is left (files named "_..." are blanks
    # prepared for messages to come).
    tmp = Path(service.spool.directory) / "tmp"
    assert [p.name for p in tmp.iterdir() if not p.name.startswith(BLANK_PREFIX)] == []


def test_primary_down_gives_451_at_mail(upstreams, relay):
    primary = upstreams("primary")
    primary.stop()
    service = relay(primary.address)
    with client(service) as smtp:
        smtp.ehlo()
        code, text = smtp.mail("alice@example.com")
    assert (code, text[:5]) == (451, b"4.4.1")


def test_three_messages_in_one_session_keep_their_own_envelopes(upstreams, relay):
    primary, backup = upstreams("primary"), upstreams("backup")
    service = relay(primary.address, [backup.address])
    with client(service) as smtp:
        smtp.sendmail("a@example.com", ["r1@example.com"], b"Subject: 1\r\n\r\none\r\n")
        smtp.mail("x@example.com")
        smtp.rcpt("wrong@example.com")
        smtp.rset()
        smtp.sendmail("b@example.com", ["r2@example.com", "r3@example.com"], b"Subject: 2\r\n\r\ntwo\r\n")
        smtp.sendmail("c@example.com", ["r4@example.com"], b"Subject: 3\r\n\r\nthree\r\n")
    for upstream in (primary, backup):
        stored = sorted(upstream.wait_for(3), key=lambda s: s.mail_from)
        assert [(s.mail_from, s.rcpt_tos) for s in stored] == [
            ("a@example.com", ["r1@example.com"]),
            ("b@example.com", ["r2@example.com", "r3@example.com"]),
            ("c@example.com", ["r4@example.com"]),
        ]
        assert [s.body_without_trace.split(b"\r\n")[-2] for s in stored] == [b"one", b"two", b"three"]


def read_replies(sock, count, timeout=10.0):
    """Read until ``count`` final reply lines arrived; returns them."""
    sock.settimeout(timeout)
    buffer = b""
    finals = []
    while len(finals) < count:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {finals}"
        buffer += chunk
        *lines, buffer = buffer.split(b"\r\n")
        finals += [line for line in lines if line[3:4] == b" "]
    return finals


@contextlib.contextmanager
def in_data(service):
    """A raw client connection that has just been told 354."""
    with socket.create_connection(service.address) as sock:
        read_replies(sock, 1)
        sock.sendall(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        assert read_replies(sock, 4)[-1][:3] == b"354"
        yield sock


def test_pipelined_transaction_in_one_write(upstreams, relay):
    primary = upstreams("primary")
    service = relay(primary.address)
    with socket.create_connection(service.address) as sock:
        assert read_replies(sock, 1)[0].startswith(b"220 ")
        sock.sendall(b"EHLO client.example\r\nMAIL FROM:<a@example.com>\r\n"
                     b"RCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n")
        replies = read_replies(sock, 5)
        assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"250", b"354"]
        sock.sendall(b"Subject: p\r\n\r\npipelined\r\n.\r\nMAIL FROM:<d@example.com>\r\n"
                     b"RCPT TO:<e@example.com>\r\nDATA\r\n")
        assert [r[:3] for r in read_replies(sock, 4)] == [b"250", b"250", b"250", b"354"]
        sock.sendall(b"second\r\n.\r\nQUIT\r\n")
        assert [r[:3] for r in read_replies(sock, 2)] == [b"250", b"221"]
    stored = primary.wait_for(2)
    assert [(s.mail_from, s.rcpt_tos) for s in stored] == [
        ("a@example.com", ["b@example.com", "c@example.com"]),
        ("d@example.com", ["e@example.com"]),
    ]


def test_ehlo_and_quit_cause_no_upstream_connection(relay):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    try:
        service = relay(f"127.0.0.1:{listener.getsockname()[1]}")
        with client(service) as smtp:
            assert smtp.ehlo()[0] == 250
            assert smtp.noop()[0] == 250
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


def test_client_gone_mid_data_leaves_nothing_anywhere(upstreams, relay):
    primary, backup = upstreams("primary"), upstreams("backup")
    service = relay(primary.address, [backup.address])
    with in_data(service) as sock:
        sock.sendall(b"Subject: cut\r\n\r\nhalf a message\r\n")
    wait_until(lambda: not service.server.sessions, what="the session to end")
    send(service, "a@example.com", ["b@example.com"], b"Subject: whole\r\n\r\nwhole\r\n")
    for upstream in (primary, backup):
        [stored] = upstream.wait_for(1)
        assert stored.body_without_trace == b"Subject: whole\r\n\r\nwhole\r\n"
    assert primary.count() == 1


def test_message_over_the_size_limit_is_refused_and_not_delivered(upstreams, relay):
    primary, backup = upstreams("primary"), upstreams("backup")
    service = relay(primary.address, [backup.address], smtp_max_message_bytes=1000)
    big = b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 20
    with client(service) as smtp:
        # Announced with SIZE=: refused at MAIL.
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            smtp.sendmail("a@example.com", ["b@example.com"], big)
        assert refused.value.smtp_code == 552
        # Not announced: refused after the content, which went nowhere.
        smtp.rset()
        assert smtp.mail("a@example.com")[0] == 250
        assert smtp.rcpt("b@example.com")[0] == 250
        code, text = smtp.data(big)
        assert (code, text[:5]) == (552, b"5.3.4")
        smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: small\r\n\r\nsmall\r\n")
    for upstream in (primary, backup):
        [stored] = upstream.wait_for(1)
        assert b"small" in stored.content


def test_dead_backup_changes_nothing_for_the_client(upstreams, relay):
    primary, dead = upstreams("primary"), upstreams("dead")
    dead.stop()
    service = relay(primary.address, [dead.address])
    assert send(service, "a@example.com", ["b@example.com"]) == {}
    primary.wait_for(1)


def test_slow_backup_does_not_hold_the_client(upstreams, relay):
    primary, slow = upstreams("primary"), upstreams("slow")
    slow.set_rules(data_delay_seconds=30)
    service = relay(primary.address, [slow.address])
    assert send(service, "a@example.com", ["b@example.com"]) == {}
    assert send(service, "a@example.com", ["c@example.com"]) == {}
    # The client has its answers while the backup still sits on the first copy.
    assert primary.count() == 2
    assert slow.count() == 0


def test_smtputf8_and_8bit_content_pass_through(upstreams, relay):
    primary, backup = upstreams("primary"), upstreams("backup")
    service = relay(primary.address, [backup.address])
    content = "Subject: Grüße\r\n\r\nÄpfel und Öl — 8 bit\r\n".encode()
    refused = send(service, "jörg@exämple.de", ["zoë@exämple.de"], content,
                   mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    assert refused == {}
    for upstream in (primary, backup):
        [stored] = upstream.wait_for(1)
        assert stored.mail_from == "jörg@exämple.de"
        assert stored.rcpt_tos == ["zoë@exämple.de"]
        assert "SMTPUTF8" in stored.mail_options and "BODY=8BITMIME" in stored.mail_options
        assert stored.body_without_trace == content


def test_smtputf8_message_for_a_primary_without_it_gets_553(upstreams, relay):
    primary = upstreams("primary", smtputf8=False)
    service = relay(primary.address)
    with client(service) as smtp:
        smtp.ehlo()
        code, text = smtp.mail("jörg@exämple.de", ["SMTPUTF8"])
    assert (code, text[:5]) == (553, b"5.6.7")


def test_bare_newlines_are_normalized_for_every_destination(upstreams, relay):
    primary, backup = upstreams("primary"), upstreams("backup")
    service = relay(primary.address, [backup.address])
    with in_data(service) as sock:
        sock.sendall(b"Subject: lf\r\n\r\nbare\nline\n.\nnot the end\r\n.\r\n")
        assert read_replies(sock, 1)[0][:3] == b"250"
    for upstream in (primary, backup):
        [stored] = upstream.wait_for(1)
        assert stored.body_without_trace == b"Subject: lf\r\n\r\nbare\r\nline\r\n.\r\nnot the end\r\n"


def test_bare_newlines_rejected_when_configured(upstreams, relay, caplog):
    primary = upstreams("primary")
    service = relay(primary.address, smtp_bare_newline="reject")
    caplog.set_level("INFO", logger="smtpdup")
    with in_data(service) as sock:
        sock.sendall(b"Subject: lf\r\n\r\nbare\nline\r\n.\r\n")
        assert read_replies(sock, 1)[0][:9] == b"550 5.5.2"
    send(service, "a@example.com", ["b@example.com"], b"Subject: ok\r\n\r\nok\r\n")
    [stored] = primary.wait_for(1)
    assert stored.body_without_trace == b"Subject: ok\r\n\r\nok\r\n"
    # The log says what the client heard, as JSON the way the relay writes it.
    refused, accepted = [
        json.loads(logs._JsonLineFormatter().format(r))
        for r in caplog.records
        if r.name == "smtpdup.relay" and r.getMessage() == "transaction"
    ]
    assert (refused["outcome"], refused["reply"]) == ("rejected", "550 5.5.2 Bare CR or LF in message content")
    assert (accepted["outcome"], accepted["reply"][:3]) == ("accepted", "250")


def test_message_too_big_is_logged_as_refused(upstreams, relay, caplog):
    primary = upstreams("primary")
    service = relay(primary.address, smtp_max_message_bytes=100)
    caplog.set_level("INFO", logger="smtpdup")
    with in_data(service) as sock:
        sock.sendall(b"x" * 200 + b"\r\n.\r\n")
        assert read_replies(sock, 1)[0][:9] == b"552 5.3.4"
    [line] = [r for r in caplog.records if r.getMessage() == "transaction"]
    assert (line.outcome, line.reply) == ("rejected", "552 5.3.4 Message too big")
    assert primary.count() == 0


def test_tcp_nodelay_on_inbound_and_primary_sockets(upstreams, relay):
    primary = upstreams("primary")
    service = relay(primary.address)
    with client(service) as smtp:
        smtp.ehlo()
        assert smtp.mail("a@example.com")[0] == 250
        [session] = list(service.server.sessions)
        assert session.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        upstream_sock = session.backend._primary._smtp.sock
        assert upstream_sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_idle_client_gets_421(upstreams, relay):
    primary = upstreams("primary")
    service = relay(primary.address, smtp_idle_timeout_seconds=0.3)
    with socket.create_connection(service.address) as sock:
        replies = read_replies(sock, 2)
    assert replies[1][:9] == b"421 4.4.2"


def test_client_outside_allowed_networks_gets_554(upstreams, relay):
    primary = upstreams("primary")
    service = relay(primary.address, smtp_allowed_networks="10.0.0.0/8")
    with socket.create_connection(service.address) as sock:
        assert read_replies(sock, 1)[0][:9] == b"554 5.7.1"


def test_connection_limit_gives_421(upstreams, relay):
    primary = upstreams("primary")
    service = relay(primary.address, smtp_max_connections=1)
    with client(service) as first:
        first.ehlo()
        with socket.create_connection(service.address) as sock:
            assert read_replies(sock, 1)[0][:9] == b"421 4.7.0"
        assert first.noop()[0] == 250


def _connections(outcome: str) -> float:
    return metrics.REGISTRY.get_sample_value("smtpdup_connections_total", {"outcome": outcome}) or 0.0


def test_connection_limit_and_draining_refusals_count_apart(upstreams, relay):
    """A connection over smtp.max_connections is over_limit; one that
    arrives while the relay drains (accepted just before the listener
    closed) is draining, and told so."""
    primary = upstreams("primary")
    service = relay(primary.address, smtp_max_connections=1)
    over_limit, draining = _connections("over_limit"), _connections("draining")
    with client(service) as first:
        first.ehlo()
        with socket.create_connection(service.address) as sock:
            assert read_replies(sock, 1)[0][:9] == b"421 4.7.0"
    assert (_connections("over_limit"), _connections("draining")) == (over_limit + 1, draining)
    service.server.draining = True  # as drain() sets it before closing the listener
    with socket.create_connection(service.address) as sock:
        assert read_replies(sock, 1)[0][:9] == b"421 4.3.2"
    assert (_connections("over_limit"), _connections("draining")) == (over_limit + 1, draining + 1)


@pytest.fixture
def certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return str(cert), str(key)


def test_starttls_inbound(upstreams, relay, certificate):
    primary = upstreams("primary")
    cert, key = certificate
    service = relay(primary.address, smtp_tls_cert_file=cert, smtp_tls_key_file=key, smtp_require_tls="true")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with client(service) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls")
        assert smtp.mail("a@example.com")[:2] == (530, b"5.7.0 Must issue a STARTTLS command first")
        smtp.starttls(context=context)
        smtp.ehlo()
        assert not smtp.has_extn("starttls")
        assert smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE) == {}
    [stored] = primary.wait_for(1)
    assert b"with ESMTPS id" in stored.content
    assert stored.body_without_trace == MESSAGE


def test_commands_pipelined_after_starttls_are_discarded(upstreams, relay, certificate):
    primary = upstreams("primary")
    cert, key = certificate
    service = relay(primary.address, smtp_tls_cert_file=cert, smtp_tls_key_file=key)
    with socket.create_connection(service.address) as sock:
        read_replies(sock, 1)
        sock.sendall(b"EHLO c\r\n")
        read_replies(sock, 1)
        sock.sendall(b"STARTTLS\r\nMAIL FROM:<injected@example.com>\r\n")
        assert read_replies(sock, 1)[0][:3] == b"220"
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        tls = context.wrap_socket(sock, server_hostname="localhost")
        tls.sendall(b"EHLO c\r\n")
        assert read_replies(tls, 1)[0][:3] == b"250"
        tls.sendall(b"RCPT TO:<b@example.com>\r\n")
        # The injected MAIL never ran: there is no transaction to add to.
        assert read_replies(tls, 1)[0][:3] == b"503"
        tls.sendall(b"QUIT\r\n")
        read_replies(tls, 1)


def test_one_log_line_per_transaction_without_the_body(upstreams, relay, caplog):
    primary, backup = upstreams("primary"), upstreams("backup")
    service = relay(primary.address, [backup.address])
    secret = b"Subject: s\r\n\r\nthe body is private 7f3a\r\n"
    with caplog.at_level("DEBUG", logger="smtpdup"):
        send(service, "alice@example.com", ["bob@example.com", "carol@example.com"], secret)
        backup.wait_for(1)
        wait_until(lambda: any(r.getMessage() == "backup_attempt" for r in caplog.records),
                   what="the backup attempt's log line")
    [line] = [r for r in caplog.records if r.getMessage() == "transaction"]
    assert line.sender == "alice@example.com"
    assert line.recipients == 2
    assert line.size == len(secret) + len(b".\r\n") - len(b".\r\n")  # content as the client sent it
    assert line.reply.startswith("250")
    assert line.client == "127.0.0.1"
    assert line.queue_id and line.duration_ms >= 0
    [attempt] = [r for r in caplog.records if r.getMessage() == "backup_attempt"]
    assert (attempt.queue_id, attempt.outcome, attempt.attempt) == (line.queue_id, "delivered", 1)
    assert all(b"private 7f3a".decode() not in repr(r.__dict__) for r in caplog.records)
