"""One SMTP client session to one destination (the primary or a backup).

Built on smtplib; under gevent's monkey-patching its sockets are
cooperative, so this module never imports gevent. It owns connecting
(plain, STARTTLS, implicit TLS, AUTH), the envelope commands, streaming
content after DATA, and turning every smtplib/socket failure into a
``Reply`` or an ``UpstreamError`` carrying one. It never logs and never
decides policy: the relay and the delivery scheduler do.

Content handed to :meth:`Upstream.send` is already in wire form (CRLF line
ends, dot-stuffed), so it is written to the socket as it is: no per-line
work and no copy.

smtplib opens the session (greeting, EHLO, STARTTLS, AUTH); from then on the
replies are read off our own receive buffer (``reply.take_reply``): one
recv() and a slice or two per reply instead of smtplib's file object.
"""

from __future__ import annotations

import os
import smtplib
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from .destination import Destination
from .reply import Reply, ReplyError, take_reply

# Bytes asked of the socket per read. What a broken peer can make us buffer
# is bounded by reply.take_reply: a line at 8 KiB, a reply at 64 KiB (RFC
# 5321 §4.5.3.1.5 allows a line 512 octets).
RECV_BYTES = 16384


class UpstreamError(Exception):
    """The destination could not be reached or broke the session.

    ``reply`` is what the failure means in SMTP terms (a 4xx unless the
    destination itself said otherwise); the session to the destination is
    unusable afterwards.
    """

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def send_all(sock: socket.socket, data: bytes) -> None:
    """sendall, with a fast path: one send() usually takes all of a
    command or a reply, and gevent's sendall costs a getsockopt and a
    timer per call on top. Raises OSError."""
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


def send_parts(sock: socket.socket, parts: list[bytes], tls: bool = False) -> None:
    """Send ``parts`` in order, in one write where the socket allows
    (sendmsg; a TLS socket gets them joined). Raises OSError."""
    if len(parts) == 1:
        send_all(sock, parts[0])
        return
    if tls:
        send_all(sock, b"".join(parts))
        return
    sent = sock.sendmsg(parts)
    if sent < sum(map(len, parts)):
        for part in parts:
            if sent >= len(part):
                sent -= len(part)
                continue
            sock.sendall(memoryview(part)[sent:])
            sent = 0


def _unavailable(destination: Destination, what: str) -> UpstreamError:
    return UpstreamError(Reply(451, "4.4.1", f"{destination.name} unavailable: {what}"))


class _HandshakeFailed(Exception):
    """An opportunistic (starttls=may) TLS handshake failed: try in plain text."""


# What smtplib.login can do, in its order of preference.
_AUTH_MECHANISMS = frozenset({"CRAM-MD5", "PLAIN", "LOGIN"})


class _KeepsGreeting:
    """smtplib connects in its constructor (the only way to give it the
    host name that TLS checks) and drops the greeting; this keeps it."""

    greeting: tuple[int, bytes] = (0, b"")

    def connect(self, host: str = "localhost", port: int = 0, source_address=None) -> tuple[int, bytes]:
        self.greeting = super().connect(host, port, source_address)  # type: ignore[misc]
        return self.greeting


class _SMTP(_KeepsGreeting, smtplib.SMTP):
    pass


class _SMTPS(_KeepsGreeting, smtplib.SMTP_SSL):
    pass


def _tls_version(sock: socket.socket) -> str:
    version = getattr(sock, "version", None)
    return (version() if callable(version) else None) or "TLS"


# Client TLS contexts are costly to build (the system store is parsed each
# time) and safe to share: one per (verify, CA file and its mtime).
_CONTEXTS: dict[tuple[bool, str, int], ssl.SSLContext] = {}


def tls_context(verify: bool, ca_file: str = "") -> ssl.SSLContext:
    """A client TLS context: verified against ``ca_file`` (or the system
    store) with the host name checked when ``verify``, else opportunistic
    (encrypted, unverified). Raises OSError or ssl.SSLError for a CA file
    that cannot be loaded."""
    stamp = os.stat(ca_file).st_mtime_ns if verify and ca_file else 0
    key = (verify, ca_file if verify else "", stamp)
    context = _CONTEXTS.get(key)
    if context is None:
        if verify:
            context = ssl.create_default_context(cafile=ca_file or None)
        else:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if len(_CONTEXTS) > 8:
            _CONTEXTS.clear()
        _CONTEXTS[key] = context
    return context


class RelaySettings(Protocol):
    """What a session takes from the configuration's ``relay`` section
    (``config.RelayConfig``), besides the destination."""

    @property
    def timeout_seconds(self) -> float: ...

    @property
    def tls_ca_file(self) -> str: ...


class Upstream:
    """A client session to ``destination``; connect lazily, reuse often.

    Every method that talks to the destination returns the destination's
    ``Reply`` or raises :class:`UpstreamError` (after which the session is
    closed). ``timeout_seconds`` bounds the connect and every read and write.
    After :meth:`connect`, ``greeting`` holds the destination's 220 reply,
    ``tls`` the TLS version in use (None: plain text) and ``authenticated``
    whether AUTH succeeded.
    """

    def __init__(
        self,
        destination: Destination,
        *,
        timeout_seconds: float,
        local_hostname: str,
        tls_ca_file: str = "",
    ) -> None:
        self.destination = destination
        self.timeout_seconds = timeout_seconds
        self.local_hostname = local_hostname
        self.tls_ca_file = tls_ca_file
        self.greeting: Reply | None = None
        self.tls: str | None = None
        self.authenticated = False
        self._plain_because = ""  # why a session is in plain text, for an error
        self._smtp: smtplib.SMTP | None = None
        # Where the session stands, so that it can be handed to another
        # user (relay.PrimaryPool): ``busy`` while a command waits for its
        # reply (a greenlet killed there leaves it set), ``in_transaction``
        # from a 2xx to MAIL to the final dot or RSET, ``in_data`` from a
        # 354 to the final dot.
        self.busy = False
        self.in_transaction = False
        self.in_data = False
        self._sock: socket.socket | None = None  # smtplib's, once the session is open
        self._received = bytearray()  # what the destination sent, not yet taken
        self._key = (destination, timeout_seconds, local_hostname, tls_ca_file)

    @classmethod
    def for_destination(cls, destination: Destination, relay: RelaySettings, local_hostname: str) -> Upstream:
        """A session to ``destination`` as the configuration has it (the
        relay, the delivery scheduler and ``smtpdup check --connect`` alike):
        ``relay.timeout_seconds``, ``relay.tls_ca_file`` and smtp.domain as
        ``local_hostname``, the EHLO name. Not connected yet."""
        return cls(destination, timeout_seconds=relay.timeout_seconds, local_hostname=local_hostname,
                   tls_ca_file=relay.tls_ca_file)

    @staticmethod
    def key_for(destination: Destination, relay: RelaySettings, local_hostname: str) -> tuple:
        """``key()`` of the session ``for_destination`` builds from the same
        arguments."""
        return (destination, relay.timeout_seconds, local_hostname, relay.tls_ca_file)

    # -- connection -----------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._smtp is not None

    @property
    def reusable(self) -> bool:
        """Connected, and no reply or content is owed either way: another
        transaction may start here (after an RSET if ``in_transaction``)."""
        return self._smtp is not None and not self.busy and not self.in_data

    def key(self) -> tuple:
        """What makes two sessions interchangeable: same destination, seen
        with the same settings."""
        return self._key

    @property
    def extensions(self) -> list[str]:
        """The EHLO reply's extension lines, as the destination sent them
        (after STARTTLS: the second EHLO's); empty after HELO."""
        smtp = self._smtp
        if smtp is None or not smtp.ehlo_resp:
            return []
        return smtp.ehlo_resp.decode("utf-8", "replace").splitlines()[1:]

    def connect(self) -> None:
        """Open the session: greeting, EHLO (HELO as a fallback), STARTTLS
        and AUTH as the destination asks. Raises UpstreamError.

        ``starttls=may`` is opportunistic: a destination that does not offer
        STARTTLS, refuses it, or fails the TLS handshake gets the session in
        plain text (after a handshake failure, on a new connection), as
        Postfix's ``smtp_tls_security_level = may`` does. Credentials are
        never sent in plain text.
        """
        try:
            self._open(self.destination.starttls)
        except _HandshakeFailed:
            self._open("off", plain_because="the TLS handshake failed")

    def _open(self, starttls: str, plain_because: str = "") -> None:
        dest = self.destination
        self.busy = self.in_transaction = self.in_data = False
        self._plain_because = plain_because or (
            "starttls=off" if dest.starttls == "off" else "the destination does not offer STARTTLS")
        self.greeting, self.tls, self.authenticated = None, None, False
        try:
            # The host name goes to smtplib's constructor (which connects):
            # smtplib names the TLS peer (SNI, the certificate's host name
            # check) only after what its constructor was given.
            if dest.scheme == "smtps":
                context = self._context(verify=True)
                smtp: _SMTP | _SMTPS = _SMTPS(
                    dest.host, dest.port, timeout=self.timeout_seconds,
                    local_hostname=self.local_hostname, context=context,
                )
            else:
                smtp = _SMTP(dest.host, dest.port, timeout=self.timeout_seconds, local_hostname=self.local_hostname)
        except smtplib.SMTPConnectError as exc:
            # A greeting other than 220 (smtplib has closed the socket).
            raise UpstreamError(Reply.from_smtplib(exc.smtp_code, exc.smtp_error)) from None
        except (OSError, smtplib.SMTPException, ValueError) as exc:
            raise _unavailable(dest, _describe(exc)) from None
        self._smtp = smtp
        try:
            # In lockstep Nagle's algorithm meets the peer's delayed ACK and
            # stalls every small command by ~40 ms.
            smtp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.greeting = Reply.from_smtplib(*smtp.greeting)
            if dest.scheme == "smtps":
                self.tls = _tls_version(smtp.sock)
            self._hello()
            if dest.scheme == "smtp" and starttls != "off":
                self._starttls(smtp, starttls)
            if dest.username:
                self._login()
            self._take_over(smtp)
        except _HandshakeFailed:
            self.abort()
            raise
        except UpstreamError:
            self.abort()
            raise
        except (OSError, smtplib.SMTPException, ValueError) as exc:
            self.abort()
            raise _unavailable(dest, _describe(exc)) from None

    def _take_over(self, smtp: smtplib.SMTP) -> None:
        """From here on, replies are read off our own buffer; anything
        smtplib's file object had already read goes there first."""
        self._sock = smtp.sock
        self._received.clear()
        reader = smtp.file
        if reader is not None:
            timeout = smtp.sock.gettimeout()
            smtp.sock.settimeout(0.0)  # take what is buffered, wait for nothing
            try:
                self._received += reader.read1(RECV_BYTES) or b""
            except (OSError, ValueError):
                pass
            finally:
                smtp.sock.settimeout(timeout)
            smtp.file = None
            reader.close()

    def _read_reply(self) -> Reply:
        """The destination's next reply. Raises OSError, SMTPException or
        ReplyError."""
        received = self._received
        reply = take_reply(received) if received else None
        while reply is None:
            assert self._sock is not None
            data = self._sock.recv(RECV_BYTES)
            if not data:
                raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
            received += data
            reply = take_reply(received)
        return reply

    def _starttls(self, smtp: smtplib.SMTP, starttls: str) -> None:
        dest = self.destination
        if not smtp.has_extn("starttls"):
            if starttls == "require":
                raise UpstreamError(Reply(451, "4.7.5", f"{dest.name} does not offer STARTTLS (starttls=require)"))
            return
        context = self._context(verify=starttls == "require")
        try:
            smtp.starttls(context=context)
        except smtplib.SMTPResponseException as exc:
            # Refused (454 TLS not available, ...): the destination's words.
            if starttls == "may":
                self._plain_because = "the destination refused STARTTLS"
                return
            refusal = Reply.from_smtplib(exc.smtp_code, exc.smtp_error)
            raise UpstreamError(Reply(451, "4.7.5", f"{dest.name} refused STARTTLS: {refusal}")) from None
        except smtplib.SMTPException:
            raise  # the session broke before the handshake
        except (socket.timeout, TimeoutError):
            raise  # a plain-text attempt would wait as long again
        except OSError as exc:
            # The handshake failed: an SSLError, or the server hung up
            # (ECONNRESET) because it could not complete its side.
            if starttls == "may" and not isinstance(exc, ssl.SSLCertVerificationError):
                raise _HandshakeFailed() from None
            if isinstance(exc, ssl.SSLError):
                raise
            raise _unavailable(dest, f"TLS handshake failed: {_describe(exc)}") from None
        self.tls = _tls_version(smtp.sock)
        self._hello()

    def _context(self, verify: bool) -> ssl.SSLContext:
        try:
            return tls_context(verify, self.tls_ca_file)
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise UpstreamError(Reply(
                451, "4.7.5", f"{self.destination.name}: cannot load relay.tls_ca_file {self.tls_ca_file}: {reason}"
            )) from None

    def _login(self) -> None:
        """AUTH with the destination's user and password: only over TLS (a
        password never crosses the network in clear), only with a mechanism
        both sides know. A refusal becomes a 4xx (the mail is not at fault:
        the configuration is), as Postfix's smtp_sasl_auth_soft_bounce."""
        smtp, dest = self._smtp, self.destination
        assert smtp is not None and dest.username is not None
        if self.tls is None:
            raise UpstreamError(Reply(
                451, "4.7.0", f"{dest.name}: not sending credentials without TLS ({self._plain_because})"))
        if not smtp.has_extn("auth"):
            raise UpstreamError(Reply(451, "4.7.0", f"{dest.name} does not offer AUTH"))
        offered = smtp.esmtp_features["auth"].upper().split()
        if not set(offered) & _AUTH_MECHANISMS:
            raise UpstreamError(Reply(
                451, "4.7.0",
                f"{dest.name} offers AUTH {' '.join(offered)}; smtpdup speaks {', '.join(sorted(_AUTH_MECHANISMS))}"))
        try:
            smtp.login(dest.username, dest.password or "")
        except smtplib.SMTPAuthenticationError as exc:
            refusal = Reply.from_smtplib(exc.smtp_code, exc.smtp_error)
            raise UpstreamError(Reply(
                451, "4.7.0", f"{dest.name} refused AUTH as {dest.username}: {refusal}")) from None
        self.authenticated = True

    def _hello(self) -> None:
        assert self._smtp is not None
        code, message = self._smtp.ehlo()
        if code != 250:
            code, message = self._smtp.helo()
            if code != 250:
                raise UpstreamError(Reply.from_smtplib(code, message))

    def supports(self, extension: str) -> bool:
        """Whether the destination advertised ``extension`` (e.g. "smtputf8")."""
        return self._smtp is not None and self._smtp.has_extn(extension)

    def abort(self) -> None:
        """Drop the connection without another word: used to make sure a
        message is *not* delivered (the final dot is never sent)."""
        smtp, self._smtp = self._smtp, None
        self._sock = None
        if smtp is not None:
            smtp.close()

    def quit(self) -> None:
        """End the session politely; errors are irrelevant by now."""
        smtp = self._smtp
        if smtp is None:
            return
        try:
            if self._sock is not None and not self.busy:
                send_all(self._sock, b"QUIT\r\n")
                self._read_reply()
        except (OSError, smtplib.SMTPException, ReplyError):
            pass
        finally:
            self.abort()

    # -- commands -------------------------------------------------------

    def command(self, line: bytes | list[bytes]) -> Reply:
        """Send one command line (without CRLF; or the pieces of one) and
        read its reply."""
        sock = self._sock
        if sock is None:
            raise _unavailable(self.destination, "not connected")
        self.busy = True
        try:
            if isinstance(line, bytes):
                send_all(sock, line + b"\r\n")
            else:
                send_parts(sock, [*line, b"\r\n"], self.tls is not None)
            reply = self._read_reply()
        except (OSError, smtplib.SMTPException, ReplyError) as exc:
            self.abort()
            raise _unavailable(self.destination, _describe(exc)) from None
        self.busy = False
        if reply.code == 421:
            # The destination is closing the session: it cannot be reused.
            self.abort()
        return reply

    def commands(self, lines: list[bytes]) -> list[Reply]:
        """Send several command lines in one write and read a reply for
        each, in order (RFC 2920 PIPELINING; only for destinations that
        advertise it)."""
        sock = self._sock
        if sock is None:
            raise _unavailable(self.destination, "not connected")
        self.busy = True
        try:
            send_all(sock, b"".join(line + b"\r\n" for line in lines))
            replies = [self._read_reply() for _ in lines]
        except (OSError, smtplib.SMTPException, ReplyError) as exc:
            self.abort()
            raise _unavailable(self.destination, _describe(exc)) from None
        self.busy = False
        if any(reply.code == 421 for reply in replies):
            self.abort()
        return replies

    def _mail_line(self, sender: str, params: Mapping[str, str | None]) -> bytes | Reply:
        """The MAIL command with the parameters this destination
        understands: SIZE, BODY=8BITMIME and SMTPUTF8 go on only where
        advertised. A message that needs SMTPUTF8 for a destination
        without it gets 553 5.6.7 instead."""
        words = [b"MAIL FROM:<" + sender.encode("utf-8", "surrogateescape") + b">"]
        if "SMTPUTF8" in params:
            if not self.supports("smtputf8"):
                return Reply(553, "5.6.7", f"{self.destination.name} does not support SMTPUTF8")
            words.append(b"SMTPUTF8")
        body = params.get("BODY")
        if body and self.supports("8bitmime"):
            words.append(b"BODY=" + body.encode("ascii", "replace"))
        size = params.get("SIZE")
        if size and self.supports("size"):
            words.append(b"SIZE=" + size.encode("ascii", "replace"))
        return b" ".join(words)

    def mail(self, sender: str, params: Mapping[str, str | None]) -> Reply:
        """MAIL FROM (see _mail_line); nothing is sent for a 553 5.6.7."""
        line = self._mail_line(sender, params)
        if isinstance(line, Reply):
            return line
        reply = self.command(line)
        self.in_transaction = reply.is_completed
        return reply

    def rcpt(self, recipient: str) -> Reply:
        return self.command(_rcpt_line(recipient))

    def open_transaction(
        self, sender: str, params: Mapping[str, str | None], recipients: list[str]
    ) -> tuple[Reply, list[Reply], Reply | None]:
        """MAIL, a RCPT per recipient and DATA, for a backup copy.

        Returns the MAIL reply, the RCPT replies (one per recipient, or none
        when MAIL failed) and the DATA reply, None when DATA was not sent or
        there is nothing to send. In one write where the destination offers
        PIPELINING; else one by one, stopping where a client must.
        """
        line = self._mail_line(sender, params)
        if isinstance(line, Reply):
            return line, [], None
        if not self.supports("pipelining"):
            mail = self.command(line)
            if not mail.is_completed:
                return mail, [], None
            rcpts = [self.rcpt(recipient) for recipient in recipients]
            if not any(r.is_completed for r in rcpts):
                return mail, rcpts, None
            return mail, rcpts, self.data()
        replies = self.commands([line, *map(_rcpt_line, recipients), b"DATA"])
        mail, rcpts, data = replies[0], replies[1:-1], replies[-1]
        self.in_transaction = mail.is_completed
        self.in_data = data.code == 354
        if not mail.is_completed:
            rcpts = []
        if data.code == 354 and not any(r.is_completed for r in rcpts):
            # A server that took DATA without a recipient gets an empty
            # message ended at once (RFC 2920 §3.1), which it must refuse.
            self.end_data(True)
            data = None
        elif data.code != 354 and not any(r.is_completed for r in rcpts):
            data = None
        return mail, rcpts, data

    def data(self) -> Reply:
        """DATA; a 354 means content may follow."""
        reply = self.command(b"DATA")
        self.in_data = reply.code == 354
        return reply

    def send(self, content: bytes | list[bytes]) -> None:
        """Stream wire-form content (or its pieces, in one write) after a
        354. Raises UpstreamError."""
        sock = self._sock
        if sock is None:
            raise _unavailable(self.destination, "not connected")
        try:
            if isinstance(content, bytes):
                send_all(sock, content)
            else:
                send_parts(sock, content, self.tls is not None)
        except OSError as exc:
            self.abort()
            raise _unavailable(self.destination, _describe(exc)) from None

    def end_data(self, ends_with_crlf: bool, last: bytes | list[bytes] = b"") -> Reply:
        """Send ``last`` (the end of the content, if any, or its pieces)
        and the final dot in one write; return the destination's verdict.

        ``ends_with_crlf`` says whether the content ends a line; if not, a
        CRLF is added first so the dot stands alone.
        """
        dot = b"." if ends_with_crlf else b"\r\n."
        reply = self.command(last + dot if isinstance(last, bytes) else [*last, dot])
        self.in_transaction = self.in_data = False
        return reply

    def rset(self) -> Reply:
        reply = self.command(b"RSET")
        if reply.is_completed:
            self.in_transaction = False
        return reply


@dataclass(frozen=True)
class Probe:
    """What one session to a destination showed (``smtpdup check --connect``):
    its greeting, EHLO extension lines, TLS version (None: plain text) and
    whether AUTH succeeded; or ``error``, the reply that ended it."""

    greeting: Reply | None
    extensions: tuple[str, ...] = ()
    tls: str | None = None
    authenticated: bool = False
    error: Reply | None = None


def probe(destination: Destination, relay: RelaySettings, local_hostname: str) -> Probe:
    """Open a session to ``destination`` as a delivery would (greeting,
    EHLO, STARTTLS, AUTH), note what it offers and QUIT: no transaction."""
    upstream = Upstream.for_destination(destination, relay, local_hostname)
    try:
        upstream.connect()
    except UpstreamError as exc:
        return Probe(upstream.greeting, error=exc.reply)
    try:
        return Probe(upstream.greeting, tuple(upstream.extensions), upstream.tls, upstream.authenticated)
    finally:
        upstream.quit()


def _rcpt_line(recipient: str) -> bytes:
    return b"RCPT TO:<" + recipient.encode("utf-8", "surrogateescape") + b">"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        # "certificate verify failed: unable to get local issuer certificate",
        # "... Hostname mismatch, certificate is not valid for 'mx.example'."
        return f"TLS certificate verify failed: {exc.verify_message or exc.reason}".rstrip(".")
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").replace("_", " ").lower()
        return f"TLS handshake failed: {reason}" if reason else f"TLS failed: {_first_line(exc)}"
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return "connection lost" + (f" ({exc})" if str(exc) else "")
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ssl.SSLError):
        return exc.strerror.lower()  # "connection refused", not "[Errno 111] Connection refused"
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
