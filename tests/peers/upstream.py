"""A scriptable upstream SMTP server for tests: aiosmtpd in its own process.

It runs outside the test process on purpose: the tests run under gevent's
monkey-patching, aiosmtpd under asyncio, and the two do not share a thread.

    python upstream.py --store DIR --rules FILE --port-file FILE [--no-smtputf8] [--no-pipelining]

Listens on 127.0.0.1, port 0, and writes the port to --port-file once it
accepts connections. Each accepted message becomes DIR/<n>.json (envelope,
MAIL options, the session's EHLO name) plus DIR/<n>.eml (the content exactly
as received, dot-stuffing undone by aiosmtpd). The rules file (JSON, read
again at every command so a test can change behaviour while it runs):

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

from aiosmtpd.smtp import SMTP

# Bounded sizes, so a broken test cannot fill the disk.
DATA_SIZE_LIMIT = 200 * 1024 * 1024


class Handler:
    def __init__(self, store: str, rules_path: str, pipelining: bool = True) -> None:
        self.pipelining = pipelining
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
        }
        with open(base + ".json.tmp", "w", encoding="utf-8") as f:
            json.dump(meta, f)
        os.rename(base + ".eml.tmp", base + ".eml")
        os.rename(base + ".json.tmp", base + ".json")  # the .json marks a complete message
        return "250 2.0.0 OK stored"


async def serve(args: argparse.Namespace) -> None:
    handler = Handler(args.store, args.rules, pipelining=not args.no_pipelining)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(
            handler,
            data_size_limit=DATA_SIZE_LIMIT,
            enable_SMTPUTF8=not args.no_smtputf8,
            decode_data=False,
            hostname="upstream.test",
            ident="upstream",
        ),
        host="127.0.0.1",
        port=0,
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
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
