"""Replies read off our own receive buffer (reply.take_reply, and
Upstream's use of it): against smtplib's getreply as the reference, split
at every point, and over real sockets to scripted peers on loopback."""

import io
import smtplib
import socket
import threading

import pytest
from conftest import wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpdup.destination import Destination
from smtpdup.reply import MAX_REPLY_LINE_BYTES, Reply, ReplyError, take_reply
from smtpdup.upstream import Upstream, UpstreamError


def reference(wire: bytes) -> Reply:
    """What smtplib's getreply makes of ``wire``, as the relay turned it
    into a Reply before."""
    smtp = smtplib.SMTP()
    smtp.file = io.BytesIO(wire)
    return Reply.from_smtplib(*smtp.getreply())


def take_all(buffer: bytearray) -> list[Reply]:
    replies = []
    while (reply := take_reply(buffer)) is not None:
        replies.append(reply)
    return replies


@pytest.mark.parametrize("wire", [
    b"250 2.1.0 Ok\r\n",
    b"250 Ok\r\n",
    b"250\r\n",
    b"354 End data with <CR><LF>.<CR><LF>\r\n",
    b"550 5.1.1 <bob@example.com>: Recipient address rejected\r\n",
    b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 8BITMIME\r\n",
    b"451-4.3.0 first\r\n451-4.3.0 second\r\n451 4.3.0 third\r\n",
    b"550-5.7.1 one\r\n550 other words\r\n",
    b"250 2.0.0 Ok: queued as \xc3\xa9\xff\r\n",
    b"250 ok\n",  # a bare LF ends a line too
    b"250   spaced out \t \r\n",
    b"250 2.0.0\r\n",
    b"421 4.4.2 mx.example Error: timeout exceeded\r\n",
    b"250 a\rb\r\n",
])
def test_same_reply_as_smtplib(wire):
    buffer = bytearray(wire + b"250 next\r\n")
    assert take_reply(buffer) == reference(wire)
    assert buffer == b"250 next\r\n"  # exactly one reply taken


_line_text = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF, exclude_characters="\r\n"), max_size=60)


@st.composite
def replies(draw):
    code = draw(st.integers(200, 599))
    enhanced = draw(st.sampled_from(["", f"{code // 100}.0.0 ", f"{code // 100}.1.10 "]))
    lines = draw(st.lists(_line_text, min_size=1, max_size=5))
    ending = draw(st.sampled_from([b"\r\n", b"\n"]))
    wire = b"".join(
        f"{code}{'-' if n < len(lines) - 1 else ' '}{enhanced}{text}".encode() + ending
        for n, text in enumerate(lines)
    )
    return wire


@settings(max_examples=300, deadline=None)
@given(st.lists(replies(), min_size=1, max_size=4), st.data())
def test_any_split_gives_the_same_replies(wires, data):
    """Fed in pieces cut anywhere, the replies come out whole, in order,
    as smtplib reads them."""
    stream = b"".join(wires)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    buffer = bytearray()
    got = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        buffer += stream[start:end]
        got += take_all(buffer)
    assert got == [reference(wire) for wire in wires]
    assert buffer == b""


@pytest.mark.parametrize("partial", [b"", b"25", b"250", b"250 no line end", b"250-first\r\n", b"250-first\r\n250 la"])
def test_incomplete_reply_leaves_the_buffer_alone(partial):
    buffer = bytearray(partial)
    assert take_reply(buffer) is None
    assert buffer == partial


@pytest.mark.parametrize("wire", [b"hello\r\n", b"2x0 ok\r\n", b"099 ok\r\n", b"600 ok\r\n", b"\r\n", b"25\r\n"])
def test_not_a_reply_is_an_error(wire):
    with pytest.raises(ReplyError):
        take_reply(bytearray(wire))


def test_reply_size_is_bounded():
    with pytest.raises(ReplyError):
        take_reply(bytearray(b"250 " + b"x" * MAX_REPLY_LINE_BYTES))  # no line end in sight
    many = bytearray(b"250-" + b"y" * 100 + b"\r\n") * 1000  # 100 KiB, never a last line
    with pytest.raises(ReplyError):
        take_reply(many)


# --- Over real sockets ---------------------------------------------------------


class ScriptedPeer:
    """A one-connection SMTP peer on 127.0.0.1: a normal greeting and EHLO,
    then for each later command the next scripted answer, a list of byte
    strings sent with a pause between them (None: close the connection)."""

    def __init__(self, script):
        self.script = list(script)
        self.commands = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(10)
            conn.sendall(b"220 peer.test ESMTP\r\n")
            buffer = b""
            while True:
                while b"\r\n" not in buffer:
                    data = conn.recv(4096)
                    if not data:
                        return
                    buffer += data
                line, _, buffer = buffer.partition(b"\r\n")
                self.commands.append(line)
                if line.upper().startswith(b"EHLO"):
                    conn.sendall(b"250-peer.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                    continue
                if not self.script:
                    conn.sendall(b"250 2.0.0 default\r\n")
                    continue
                for piece in self.script.pop(0):
                    if piece is None:
                        return
                    conn.sendall(piece)
                    threading.Event().wait(0.05)

    def close(self):
        self.listener.close()
        self.thread.join(timeout=5)


@pytest.fixture
def peer():
    peers = []

    def make(*script):
        p = ScriptedPeer(script)
        peers.append(p)
        return p

    yield make
    for p in peers:
        p.close()


def connect(port: int) -> Upstream:
    upstream = Upstream(Destination("smtp", "127.0.0.1", port, "off", None, None),
                        timeout_seconds=5, local_hostname="relay.test")
    upstream.connect()
    return upstream


def test_a_multiline_reply_split_across_reads(peer):
    p = peer([b"250-2.1.0 first", b" line\r\n250-2.1.0 sec", b"ond\r\n", b"250 2.1.0 third\r\n"])
    upstream = connect(p.port)
    try:
        assert upstream.mail("a@example.com", {}) == Reply(250, "2.1.0", "first line\nsecond\nthird")
        assert upstream.rcpt("b@example.com") == Reply(250, "2.0.0", "default")
    finally:
        upstream.quit()


def test_pipelined_replies_in_one_read_are_each_their_own(peer):
    p = peer([b"250 2.1.0 mail ok\r\n550 5.1.1 no such user\r\n250 2.1.5 ok\r\n354 go ahead\r\n"], [], [], [])
    upstream = connect(p.port)
    try:
        mail, rcpts, data = upstream.open_transaction("a@example.com", {}, ["x@example.com", "y@example.com"])
        assert mail == Reply(250, "2.1.0", "mail ok")
        assert rcpts == [Reply(550, "5.1.1", "no such user"), Reply(250, "2.1.5", "ok")]
        assert data == Reply(354, "", "go ahead")
        assert upstream.in_data
    finally:
        upstream.abort()


@pytest.mark.parametrize("script", [
    [b"250-2.1.0 first\r\n", None],  # closed between lines of a reply
    [b"250 2.1.0 no line e", None],  # closed mid-line
    [None],  # closed before a word
])
def test_a_peer_closing_mid_reply_is_a_451_and_a_closed_session(peer, script):
    p = peer(script)
    upstream = connect(p.port)
    with pytest.raises(UpstreamError) as failed:
        upstream.mail("a@example.com", {})
    assert failed.value.reply.code == 451 and failed.value.reply.enhanced == "4.4.1"
    assert "connection lost" in failed.value.reply.text
    assert not upstream.connected


def test_garbage_from_the_peer_is_a_451(peer):
    p = peer([b"HTTP/1.1 400 Bad Request\r\n"])
    upstream = connect(p.port)
    with pytest.raises(UpstreamError) as failed:
        upstream.mail("a@example.com", {})
    assert failed.value.reply.code == 451 and "not an SMTP reply" in failed.value.reply.text
    assert not upstream.connected


def test_a_421_closes_the_session(peer):
    p = peer([b"421 4.4.2 peer.test closing\r\n"])
    upstream = connect(p.port)
    assert upstream.mail("a@example.com", {}) == Reply(421, "4.4.2", "peer.test closing")
    assert not upstream.connected


def test_quit_reads_its_reply_and_closes(peer):
    p = peer([b"221 2.0.0 Bye\r\n", None])
    upstream = connect(p.port)
    upstream.quit()
    assert not upstream.connected
    wait_until(lambda: p.commands[-1:] == [b"QUIT"], what="QUIT at the peer")
