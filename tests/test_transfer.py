"""send_copy: one backup copy over an open session to a real SMTP server
(aiosmtpd in its own process), and what became of each recipient."""

import pytest

from smtpdup.destination import parse_destination
from smtpdup.reply import Reply
from smtpdup.transfer import send_copy
from smtpdup.upstream import Upstream

CONTENT = [b"Subject: one\r\n", b"\r\nfirst block\r\n", b"last block\r\n"]


class Settings:
    timeout_seconds = 5.0
    tls_ca_file = ""


def session(server) -> Upstream:
    upstream = Upstream.for_destination(parse_destination(server.address), Settings(), "relay.test")
    upstream.connect()
    return upstream


def test_each_recipient_by_its_reply_and_the_content_whole(upstreams):
    backup = upstreams("backup")
    backup.set_rules(rcpt={"carol@example.com": "550 5.1.1 no such user", "dave@example.com": "451 4.2.0 later"})
    upstream = session(backup)
    try:
        attempt = send_copy(upstream, "alice@example.com", {"SIZE": "42"},
                            ["bob@example.com", "carol@example.com", "dave@example.com"], iter(CONTENT))
        assert attempt.mail_accepted and not attempt.site_failure
        assert attempt.delivered == ["bob@example.com"]
        assert attempt.refused == [("carol@example.com", Reply(550, "5.1.1", "no such user"))]
        assert attempt.deferred == ["dave@example.com"]
        assert attempt.reply is not None and attempt.reply.is_completed
        [stored] = backup.wait_for(1)
        assert stored.rcpt_tos == ["bob@example.com"]
        assert stored.content == b"".join(CONTENT)
        assert upstream.reusable
    finally:
        upstream.quit()


def test_a_4xx_to_mail_is_a_site_failure_and_the_session_stays_usable(upstreams):
    backup = upstreams("backup")
    backup.set_rules(mail="451 4.3.2 down for maintenance")
    upstream = session(backup)
    try:
        attempt = send_copy(upstream, "alice@example.com", {}, ["bob@example.com"], iter(CONTENT))
        assert attempt.site_failure and not attempt.mail_accepted
        assert attempt.deferred == ["bob@example.com"]
        assert attempt.reply == Reply(451, "4.3.2", "down for maintenance")
        assert upstream.reusable and not upstream.in_transaction  # RSET went through
    finally:
        upstream.quit()
    assert backup.count() == 0


def test_a_broken_spool_file_drops_the_session_without_a_final_dot(upstreams):
    backup = upstreams("backup")
    upstream = session(backup)

    def broken():
        yield CONTENT[0]
        yield CONTENT[1]
        raise OSError("spool file is truncated")

    with pytest.raises(OSError):
        send_copy(upstream, "alice@example.com", {}, ["bob@example.com"], broken())
    assert not upstream.connected
    assert backup.count() == 0
    assert "DATA" in backup.commands()
