"""Primary sessions shared across client sessions (relay.PrimaryPool): the
relay in this process, real upstream servers (aiosmtpd processes, Postfix's
smtp-sink) on 127.0.0.1, real clients."""

import smtplib
import socket

import postfix_tools
import pytest
from conftest import MESSAGE, client, relay_environ, wait_until

from smtpdup import config as config_module
from smtpdup import relay as relay_module


def send(service, sender="alice@example.com", recipients=("bob@example.com",), content=MESSAGE):
    with client(service) as smtp:
        return smtp.sendmail(sender, list(recipients), content)


def test_one_message_per_connection_shares_one_primary_session(upstreams, relay):
    primary, backup = upstreams("primary"), upstreams("backup")
    service = relay(primary.address, [backup.address])
    for n in range(4):
        assert send(service, f"s{n}@example.com") == {}
    stored = primary.wait_for(4)
    assert sorted(s.mail_from for s in stored) == [f"s{n}@example.com" for n in range(4)]
    backup.wait_for(4)
    commands = primary.commands()
    # One greeting and EHLO for four client connections, and no QUIT while
    # the session waits in the pool.
    assert commands.count("EHLO") == 1, commands
    assert commands.count("MAIL") == 4 and "QUIT" not in commands, commands
    assert len(service.relay.pool) == 1


def test_concurrent_clients_never_share_a_session(upstreams, relay):
    primary = upstreams("primary")
    service = relay(primary.address)
    first = client(service)
    try:
        first.ehlo()
        assert first.mail("first@example.com")[0] == 250
        assert first.rcpt("bob@example.com")[0] == 250
        # While the first client holds its session mid-envelope, a second
        # one gets a session of its own.
        assert send(service, "second@example.com") == {}
        assert first.data(b"Subject: first\r\n\r\nfirst\r\n")[0] == 250
    finally:
        first.quit()
    stored = primary.wait_for(2)
    assert sorted(s.mail_from for s in stored) == ["first@example.com", "second@example.com"]
    assert primary.commands().count("EHLO") == 2
    assert len(service.relay.pool) == 2


def test_a_client_leaving_mid_envelope_leaves_a_reset_session(upstreams, relay):
    primary = upstreams("primary")
    service = relay(primary.address)
    with client(service) as smtp:
        smtp.ehlo()
        assert smtp.mail("left@example.com")[0] == 250
        assert smtp.rcpt("gone@example.com")[0] == 250
    # The client said QUIT in the middle of its envelope: the session goes
    # back to the pool after an RSET, and the next client's envelope is its own.
    wait_until(lambda: len(service.relay.pool) == 1, what="the session back in the pool")
    assert send(service, "next@example.com", ["r@example.com"]) == {}
    [stored] = primary.wait_for(1)
    assert (stored.mail_from, stored.rcpt_tos) == ("next@example.com", ["r@example.com"])
    commands = primary.commands()
    assert commands.count("EHLO") == 1 and "RSET" in commands, commands
    assert commands.index("RSET") < commands.index("DATA")


def test_a_client_gone_mid_data_never_leaves_its_session_to_another(upstreams, relay):
    primary = upstreams("primary")
    service = relay(primary.address)
    with socket.create_connection(service.address, timeout=10) as sock:
        sock.recv(1024)
        sock.sendall(b"EHLO c\r\nMAIL FROM:<cut@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        buffer = b""
        while b"354" not in buffer:
            chunk = sock.recv(4096)
            assert chunk, buffer
            buffer += chunk
        sock.sendall(b"Subject: cut\r\n\r\nhalf a message")
    # The session that was in DATA is dropped (no final dot); the next
    # client gets a new one and only its message is delivered.
    wait_until(lambda: "QUIT" not in primary.commands() and len(service.relay.pool) == 0
               and primary.commands().count("DATA") == 1, what="the cut session dropped")
    assert send(service, "whole@example.com") == {}
    [stored] = primary.wait_for(1)
    assert stored.mail_from == "whole@example.com"
    assert primary.commands().count("EHLO") == 2


pytestmark_postfix = pytest.mark.skipif(not postfix_tools.available(), reason="smtp-sink not installed")


@pytestmark_postfix
@pytest.mark.parametrize("how", ["idle-timeout", "restart"])
def test_a_pooled_session_the_primary_closed_is_reopened_transparently(tmp_path, relay, how):
    """smtp-sink -t 1 drops a session idle for a second; a restarted sink
    resets every old one. Either way the next client is not told."""
    extra = ("-t", "1") if how == "idle-timeout" else ()
    sink = postfix_tools.start_sink(tmp_path / "dumps", extra_args=extra)
    try:
        service = relay(sink.address)
        assert send(service, "one@example.com") == {}
        assert len(service.relay.pool) == 1
        if how == "restart":
            sink.stop()
            sink = postfix_tools.start_sink(tmp_path / "dumps", port=sink.port)
        else:
            wait_until(lambda: _peer_closed(service), timeout=5, what="smtp-sink's idle timeout")
        assert send(service, "two@example.com") == {}
        wait_until(lambda: any(b"<two@example.com>" in dump for dump in sink.dumps()), what="the second message")
    finally:
        sink.stop()


def _peer_closed(service) -> bool:
    """The pooled session's socket reads EOF (peeked, nothing consumed)."""
    [(_, upstream)] = service.relay.pool._idle
    sock = upstream._smtp.sock
    sock.settimeout(0.1)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (TimeoutError, socket.timeout):
        return False
    except OSError:
        return True
    finally:
        sock.settimeout(upstream.timeout_seconds)


def test_idle_sessions_are_quit_after_the_idle_time(upstreams, relay, monkeypatch):
    monkeypatch.setattr(relay_module, "POOL_IDLE_SECONDS", 0.3)
    primary = upstreams("primary")
    service = relay(primary.address)
    assert send(service) == {}
    wait_until(lambda: "QUIT" in primary.commands(), timeout=5, what="the idle session QUIT")
    assert len(service.relay.pool) == 0
    # The next client opens a new session.
    assert send(service, "later@example.com") == {}
    primary.wait_for(2)
    assert primary.commands().count("EHLO") == 2


def test_the_pool_is_bounded(upstreams, relay, monkeypatch):
    monkeypatch.setattr(relay_module, "POOL_MAX_IDLE", 2)
    primary = upstreams("primary")
    service = relay(primary.address)
    clients = [client(service) for _ in range(4)]
    try:
        for n, smtp in enumerate(clients):
            smtp.ehlo()
            assert smtp.mail(f"c{n}@example.com")[0] == 250
    finally:
        for smtp in clients:
            smtp.quit()
    wait_until(lambda: primary.commands().count("QUIT") == 2, what="two sessions beyond the bound QUIT")
    assert len(service.relay.pool) == 2
    # The pooled ones were left mid-envelope: RSET before they were pooled
    # (sessions given back at the same moment may be RSET, then QUIT).
    assert primary.commands().count("RSET") >= 2, " ".join(primary.commands())
    assert send(service) == {}
    assert primary.commands().count("EHLO") == 4


def test_reload_with_another_primary_drops_the_pooled_sessions(upstreams, relay, tmp_path):
    old, new = upstreams("old"), upstreams("new")
    service = relay(old.address)
    assert send(service, "before@example.com") == {}
    assert len(service.relay.pool) == 1
    service.reload(config_module.load(None, relay_environ(tmp_path, new.address)))
    wait_until(lambda: "QUIT" in old.commands(), what="the old primary's session QUIT")
    assert send(service, "after@example.com") == {}
    [stored] = new.wait_for(1)
    assert stored.mail_from == "after@example.com"
    assert [s.mail_from for s in old.messages()] == ["before@example.com"]


def test_a_session_in_use_at_reload_is_not_pooled_for_the_new_primary(upstreams, relay, tmp_path):
    old, new = upstreams("old"), upstreams("new")
    service = relay(old.address)
    smtp = client(service)
    try:
        smtp.ehlo()
        assert smtp.mail("held@example.com")[0] == 250
        service.reload(config_module.load(None, relay_environ(tmp_path, new.address)))
        assert smtp.rcpt("bob@example.com")[0] == 250
        assert smtp.data(MESSAGE)[0] == 250  # the transaction ends where it began
    finally:
        smtp.quit()
    wait_until(lambda: "QUIT" in old.commands(), what="the old session QUIT, not pooled")
    assert len(service.relay.pool) == 0
    assert send(service, "after@example.com") == {}
    assert [s.mail_from for s in new.wait_for(1)] == ["after@example.com"]


def test_shutdown_quits_the_pooled_sessions(upstreams, relay):
    primary = upstreams("primary")
    service = relay(primary.address)
    assert send(service) == {}
    assert "QUIT" not in primary.commands()
    service.stop(grace_seconds=0)
    wait_until(lambda: primary.commands()[-1:] == ["QUIT"], what="QUIT at shutdown")
    assert len(service.relay.pool) == 0


def test_a_pooled_session_keeps_its_tls_and_auth(upstreams, relay, certificates):
    """A session that did STARTTLS and AUTH is reused as it is: no second
    handshake, and the identity is the destination's own, not a client's."""
    primary = upstreams("primary", tls=certificates, auth="relay:secret")
    service = relay(f"smtp://relay:secret@127.0.0.1:{primary.port}?starttls=require",
                    relay_tls_ca_file=str(certificates.ca))
    for n in range(3):
        assert send(service, f"m{n}@example.com") == {}
    stored = primary.wait_for(3)
    assert all(s.tls and s.auth_login == "relay" for s in stored)
    commands = primary.commands()
    assert commands.count("STARTTLS") == 1 and commands.count("AUTH") == 1, commands


def test_primary_refusing_mail_leaves_the_session_reusable(upstreams, relay):
    primary = upstreams("primary")
    primary.set_rules(mail="550 5.7.1 not you")
    service = relay(primary.address)
    with pytest.raises(smtplib.SMTPSenderRefused):
        send(service, "refused@example.com")
    primary.set_rules()
    assert send(service, "accepted@example.com") == {}
    assert [s.mail_from for s in primary.wait_for(1)] == ["accepted@example.com"]
    assert primary.commands().count("EHLO") == 1


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_content_held_and_flushed_in_pieces_arrives_whole(upstreams, relay, certificates, tls):
    """Content reaches the primary in writes of several pieces (sendmsg,
    or joined over TLS): a message sent in many small writes, past the
    hold bounds, arrives byte for byte, and so does the next one."""
    primary = upstreams("primary", tls=certificates) if tls else upstreams("primary")
    address = f"smtp://127.0.0.1:{primary.port}" + ("?starttls=require" if tls else "")
    service = relay(address, relay_tls_ca_file=str(certificates.ca))
    lines = [b"Subject: pieces\r\n", b"\r\n"] + [b"%06d " % n + b"z" * 90 + b"\r\n" for n in range(3000)]
    with socket.create_connection(service.address, timeout=10) as sock:
        sock.recv(1024)
        sock.sendall(b"EHLO c\r\nMAIL FROM:<p@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        buffer = b""
        while b"354" not in buffer:
            buffer += sock.recv(4096)
        for n in range(0, len(lines), 7):  # ~700-byte writes: many small chunks
            sock.sendall(b"".join(lines[n : n + 7]))
        sock.sendall(b".\r\n")
        buffer = b""
        while b"\r\n" not in buffer:
            buffer += sock.recv(4096)
        assert buffer.startswith(b"250"), buffer
        sock.sendall(b"QUIT\r\n")
    assert send(service, "after@example.com") == {}
    stored = sorted(primary.wait_for(2), key=lambda s: s.mail_from)
    assert [s.mail_from for s in stored] == ["after@example.com", "p@example.com"]
    assert stored[1].body_without_trace == b"".join(lines)
    assert stored[1].tls is tls
