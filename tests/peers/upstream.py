"""A scriptable upstream SMTP server for tests: aiosmtpd in its own process.

It runs outside the test process on purpose: the tests run under gevent's
monkey-patching, aiosmtpd under asyncio, and the two do not share a thread.

    python upstream.py --store DIR --rules FILE --port-file FILE [--no-smtputf8] [--no-pipelining]
                       [--tls-cert PEM --tls-key PEM [--smtps] [--tls-max-version V]] [--auth USER:PASSWORD
                       [--auth-mechanisms PLAIN,LOGIN] [--auth-in-clear]] [--events FILE]

Listens on 127.0.0.1, port 0, and writes the port to --port-file once it
accepts connections. Each accepted message becomes DIR/<n>.json (envelope,
MAIL options, the session's EHLO name, whether the session was encrypted,
the authenticated user) plus DIR/<n>.eml (the content exactly as received,
dot-stuffing undone by aiosmtpd).

TLS: with --tls-cert/--tls-key it offers STARTTLS; with --smtps as well it
speaks TLS from the first byte instead (implicit TLS, port-465 style).
AUTH: with --auth it accepts that one identity (PLAIN and LOGIN, or the
--auth-mechanisms given), advertised only once the session is encrypted
unless --auth-in-clear. --events FILE gets one JSON line per command the
server receives: {"command": "AUTH", "tls": false} (the verb only, never
its arguments), so a test can tell what a client sent and when.

The rules file (JSON, read again at every command so a test can change
behaviour while it runs):

    {"mail": "451 4.3.0 busy",                      # reply to every MAIL
     "rcpt": {"bob@x": "550 5.1.1 no such user"},   # reply per recipient
     "rcpt_domains": {"y.example": "550 5.1.2 bad"},
     "data": ["451 4.3.0 later", "451 4.3.0 later"], # final replies, used up one per message
     "data_delay_seconds": 3}                        # wait before the final reply
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

# Bounded sizes, so a broken test cannot fill the disk.
DATA_SIZE_LIMIT = 200 * 1024 * 1024


class Handler:
    def __init__(self, store: str, rules_path: str, pipelining: bool = True, implicit_tls: bool = False) -> None:
        self.pipelining = pipelining
        self.implicit_tls = implicit_tls
        self.store = store
        self.rules_path = rules_path
        self.count = 0
        self.data_used = 0  # how many scripted final replies were used

    def rules(self) -> dict:
        try:
            with open(self.rules_path, encoding="utf-8") as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.pipelining:
            # aiosmtpd reads pipelined commands one by one anyway; saying so
            # lets clients (the relay's backup delivery) pipeline.
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        reply = self.rules().get("mail")
        if reply:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        rules = self.rules()
        reply = rules.get("rcpt", {}).get(address)
        if reply is None:
            domain = address.rpartition("@")[2].lower()
            reply = rules.get("rcpt_domains", {}).get(domain)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        rules = self.rules()
        delay = rules.get("data_delay_seconds")
        if delay:
            await asyncio.sleep(float(delay))
        scripted = rules.get("data") or []
        if self.data_used < len(scripted):
            reply = scripted[self.data_used]
            self.data_used += 1
            if reply and not reply.startswith("2"):
                return reply
        self.count += 1
        base = os.path.join(self.store, f"{self.count:06d}")
        content = envelope.original_content or b""
        with open(base + ".eml.tmp", "wb") as f:
            f.write(content)
        meta = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "mail_options": envelope.mail_options,
            "ehlo": session.host_name,
            "peer": list(session.peer)[:2],
            "tls": self.implicit_tls or session.ssl is not None,
            "auth_login": _login(session),
        }
        with open(base + ".json.tmp", "w", encoding="utf-8") as f:
            json.dump(meta, f)
        os.rename(base + ".eml.tmp", base + ".eml")
        os.rename(base + ".json.tmp", base + ".json")  # the .json marks a complete message
        return "250 2.0.0 OK stored"


def _login(session) -> str | None:
    data = session.auth_data
    login = getattr(data, "login", None)
    return login.decode("utf-8", "replace") if isinstance(login, bytes) else login


class Authenticator:
    """Accepts exactly one user name and password."""

    def __init__(self, identity: str) -> None:
        user, _, password = identity.partition(":")
        self.user, self.password = user.encode(), password.encode()

    def __call__(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
            self.user, self.password)
        if ok:
            return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False)  # aiosmtpd answers 535 5.7.8


class RecordingSMTP(SMTP):
    """aiosmtpd's SMTP, appending each command's verb (and whether the
    session was encrypted then) to an events file."""

    def __init__(self, *args, events: str | None = None, implicit_tls: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._events = events
        self._implicit_tls = implicit_tls
        if events:
            for verb, method in list(self._smtp_methods.items()):
                self._smtp_methods[verb] = self._recorded(verb, method)

    def _recorded(self, verb: str, method):
        async def recorded(arg):
            encrypted = self._implicit_tls or self._tls_protocol is not None
            with open(self._events, "a", encoding="utf-8") as f:
                f.write(json.dumps({"command": verb, "tls": encrypted}) + "\n")
            return await method(arg)

        for attribute in ("__smtp_syntax__", "__smtp_syntax_extended__", "__smtp_syntax_when__"):
            setattr(recorded, attribute, getattr(method, attribute, None))
        return recorded


async def serve(args: argparse.Namespace) -> None:
    handler = Handler(args.store, args.rules, pipelining=not args.no_pipelining, implicit_tls=args.smtps)
    loop = asyncio.get_running_loop()
    tls_context = None
    if args.tls_cert:
        tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls_context.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls_max_version:
            # e.g. TLSv1_1: below what any current client accepts, so every
            # handshake fails (a broken TLS setup, as some servers have).
            tls_context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            tls_context.maximum_version = ssl.TLSVersion[args.tls_max_version]
    options = {}
    if args.auth:
        mechanisms = {m.strip().upper() for m in args.auth_mechanisms.split(",") if m.strip()}
        options.update(
            authenticator=Authenticator(args.auth),
            # Implicit TLS: aiosmtpd does not know the session is encrypted.
            auth_require_tls=not (args.auth_in_clear or args.smtps),
            auth_exclude_mechanism=[m for m in ("PLAIN", "LOGIN") if m not in mechanisms],
        )
    server = await loop.create_server(
        lambda: RecordingSMTP(
            handler,
            data_size_limit=DATA_SIZE_LIMIT,
            enable_SMTPUTF8=not args.no_smtputf8,
            decode_data=False,
            hostname="upstream.test",
            ident="upstream",
            tls_context=None if args.smtps else tls_context,
            events=args.events,
            implicit_tls=args.smtps,
            **options,
        ),
        host="127.0.0.1",
        port=0,
        ssl=tls_context if args.smtps else None,
    )
    port = server.sockets[0].getsockname()[1]
    with open(args.port_file + ".tmp", "w") as f:
        f.write(str(port))
    os.rename(args.port_file + ".tmp", args.port_file)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--rules", required=True)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--no-smtputf8", action="store_true")
    parser.add_argument("--no-pipelining", action="store_true")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--smtps", action="store_true")
    parser.add_argument("--tls-max-version", help="e.g. TLSv1_1")
    parser.add_argument("--auth", metavar="USER:PASSWORD")
    parser.add_argument("--auth-mechanisms", default="PLAIN,LOGIN")
    parser.add_argument("--auth-in-clear", action="store_true")
    parser.add_argument("--events")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
