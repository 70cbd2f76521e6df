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
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from collections.abc import Mapping

from .config import Destination
from .reply import Reply

# RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets; smtplib reads
# up to its own _MAXLINE (8192) per line, which bounds what a broken peer
# can make us buffer.


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


def _unavailable(destination: Destination, what: str) -> UpstreamError:
    return UpstreamError(Reply(451, "4.4.1", f"{destination.name} unavailable: {what}"))


def tls_context(verify: bool, ca_file: str = "") -> ssl.SSLContext:
    """A client TLS context: verified against ``ca_file`` (or the system
    store) when ``verify``, else opportunistic (encrypted, unverified)."""
    if verify:
        return ssl.create_default_context(cafile=ca_file or None)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Upstream:
    """A client session to ``destination``; connect lazily, reuse often.

    Every method that talks to the destination returns the destination's
    ``Reply`` or raises :class:`UpstreamError` (after which the session is
    closed). ``timeout_seconds`` bounds the connect and every read and write.
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
        self._smtp: smtplib.SMTP | None = None

    # -- connection -----------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._smtp is not None

    def connect(self) -> None:
        """Open the session: greeting, EHLO (HELO as a fallback), STARTTLS
        and AUTH as the destination asks. Raises UpstreamError."""
        dest = self.destination
        try:
            if dest.scheme == "smtps":
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                    timeout=self.timeout_seconds,
                    local_hostname=self.local_hostname,
                    context=tls_context(True, self.tls_ca_file),
                )
            else:
                smtp = smtplib.SMTP(timeout=self.timeout_seconds, local_hostname=self.local_hostname)
            code, message = smtp.connect(dest.host, dest.port)
        except (OSError, smtplib.SMTPException) as exc:
            raise _unavailable(dest, _describe(exc)) from None
        self._smtp = smtp
        try:
            # In lockstep Nagle's algorithm meets the peer's delayed ACK and
            # stalls every small command by ~40 ms.
            smtp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if code != 220:
                raise UpstreamError(Reply.from_smtplib(code, message))
            self._hello()
            if dest.scheme == "smtp" and dest.starttls != "off":
                if smtp.has_extn("starttls"):
                    context = tls_context(dest.starttls == "require", self.tls_ca_file)
                    code, message = smtp.starttls(context=context)
                    if code != 220:
                        raise UpstreamError(Reply.from_smtplib(code, message))
                    self._hello()
                elif dest.starttls == "require":
                    raise UpstreamError(
                        Reply(451, "4.7.5", f"{dest.name} does not offer STARTTLS (starttls=require)")
                    )
            if dest.username:
                try:
                    smtp.login(dest.username, dest.password or "")
                except smtplib.SMTPAuthenticationError as exc:
                    raise UpstreamError(Reply.from_smtplib(exc.smtp_code, exc.smtp_error)) from None
                except smtplib.SMTPNotSupportedError:
                    raise UpstreamError(Reply(451, "4.7.0", f"{dest.name} does not offer AUTH")) from None
        except UpstreamError:
            self.abort()
            raise
        except (OSError, smtplib.SMTPException, ValueError) as exc:
            self.abort()
            raise _unavailable(dest, _describe(exc)) from None

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
        if smtp is not None:
            smtp.close()

    def quit(self) -> None:
        """End the session politely; errors are irrelevant by now."""
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            smtp.sock.sendall(b"QUIT\r\n")
            smtp.getreply()
        except (OSError, smtplib.SMTPException):
            pass
        finally:
            smtp.close()

    # -- commands -------------------------------------------------------

    def command(self, line: bytes) -> Reply:
        """Send one command line (without CRLF) and read its reply."""
        smtp = self._smtp
        if smtp is None:
            raise _unavailable(self.destination, "not connected")
        try:
            send_all(smtp.sock, line + b"\r\n")
            code, message = smtp.getreply()
        except (OSError, smtplib.SMTPException) as exc:
            self.abort()
            raise _unavailable(self.destination, _describe(exc)) from None
        if code == 421:
            # The destination is closing the session: it cannot be reused.
            self.abort()
        return Reply.from_smtplib(code, message)

    def commands(self, lines: list[bytes]) -> list[Reply]:
        """Send several command lines in one write and read a reply for
        each, in order (RFC 2920 PIPELINING; only for destinations that
        advertise it)."""
        smtp = self._smtp
        if smtp is None:
            raise _unavailable(self.destination, "not connected")
        try:
            send_all(smtp.sock, b"".join(line + b"\r\n" for line in lines))
            replies = [Reply.from_smtplib(*smtp.getreply()) for _ in lines]
        except (OSError, smtplib.SMTPException) as exc:
            self.abort()
            raise _unavailable(self.destination, _describe(exc)) from None
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
        return line if isinstance(line, Reply) else self.command(line)

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
            if mail.code // 100 != 2:
                return mail, [], None
            rcpts = [self.rcpt(recipient) for recipient in recipients]
            if not any(r.code // 100 == 2 for r in rcpts):
                return mail, rcpts, None
            return mail, rcpts, self.data()
        replies = self.commands([line, *map(_rcpt_line, recipients), b"DATA"])
        mail, rcpts, data = replies[0], replies[1:-1], replies[-1]
        if mail.code // 100 != 2:
            rcpts = []
        if data.code == 354 and not any(r.code // 100 == 2 for r in rcpts):
            # A server that took DATA without a recipient gets an empty
            # message ended at once (RFC 2920 §3.1), which it must refuse.
            self.command(b".")
            data = None
        elif data.code != 354 and not any(r.code // 100 == 2 for r in rcpts):
            data = None
        return mail, rcpts, data

    def data(self) -> Reply:
        """DATA; a 354 means content may follow."""
        return self.command(b"DATA")

    def send(self, content: bytes) -> None:
        """Stream wire-form content after a 354. Raises UpstreamError."""
        smtp = self._smtp
        if smtp is None:
            raise _unavailable(self.destination, "not connected")
        try:
            send_all(smtp.sock, content)
        except OSError as exc:
            self.abort()
            raise _unavailable(self.destination, _describe(exc)) from None

    def end_data(self, ends_with_crlf: bool, last: bytes = b"") -> Reply:
        """Send ``last`` (the end of the content, if any) and the final dot
        in one write; return the destination's verdict.

        ``ends_with_crlf`` says whether the content ends a line; if not, a
        CRLF is added first so the dot stands alone.
        """
        return self.command(last + (b"." if ends_with_crlf else b"\r\n."))

    def rset(self) -> Reply:
        return self.command(b"RSET")


def _rcpt_line(recipient: str) -> bytes:
    return b"RCPT TO:<" + recipient.encode("utf-8", "surrogateescape") + b">"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return "connection lost" + (f" ({exc})" if str(exc) else "")
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ssl.SSLError):
        return exc.strerror.lower()  # "connection refused", not "[Errno 111] Connection refused"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
