"""An upstream SMTP server for tests that keeps the exact bytes it is sent.

aiosmtpd (tests/peers/upstream.py) undoes dot-stuffing and may take a bare
LF for a line end, so it cannot show what went over the wire. This one does
as little as possible, in plain blocking Python, one thread per connection:

    python raw_upstream.py --store DIR --port-file FILE

Listens on 127.0.0.1, port 0, and writes the port to --port-file once it
accepts connections. Commands are read up to LF; every command line (as
received, CRLF included) is appended to DIR/commands.log. After DATA the
content is read up to the first CRLF.CRLF, strictly, and each message
becomes DIR/<n>.eml (the wire bytes after the 354 up to and including the
CRLF before the final dot: still dot-stuffed, nothing changed) plus
DIR/<n>.json (envelope), in the layout conftest's Upstream reads.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socketserver
import threading

# Bounded sizes, so a broken test cannot fill memory or the disk.
MAX_LINE = 4096
MAX_MESSAGE = 20 * 1024 * 1024
TERMINATOR = b"\r\n.\r\n"


class Handler(socketserver.BaseRequestHandler):
    server: "Server"

    def handle(self) -> None:
        sock = self.request
        sock.settimeout(60)
        sock.sendall(b"220 raw.test ESMTP\r\n")
        buffer = b""
        envelope: dict = {"mail_from": None, "rcpt_tos": [], "mail_options": [], "ehlo": ""}
        while True:
            while b"\n" not in buffer:
                if len(buffer) > MAX_LINE:
                    return
                data = sock.recv(65536)
                if not data:
                    return
                buffer += data
            line, _, buffer = buffer.partition(b"\n")
            line += b"\n"
            self.server.log_command(line)
            verb, _, arg = line.rstrip(b"\r\n").partition(b" ")
            verb = verb.upper()
            if verb == b"EHLO":
                envelope["ehlo"] = arg.decode(errors="replace")
                sock.sendall(b"250-raw.test\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 PIPELINING\r\n")
            elif verb == b"HELO":
                envelope["ehlo"] = arg.decode(errors="replace")
                sock.sendall(b"250 raw.test\r\n")
            elif verb == b"MAIL":
                address, _, options = arg[5:].partition(b" ")
                envelope = {"mail_from": address.strip(b"<>").decode(errors="replace"), "rcpt_tos": [],
                            "mail_options": options.decode(errors="replace").split(), "ehlo": envelope["ehlo"]}
                sock.sendall(b"250 2.1.0 OK\r\n")
            elif verb == b"RCPT":
                envelope["rcpt_tos"].append(arg[3:].strip(b"<>").decode(errors="replace"))
                sock.sendall(b"250 2.1.5 OK\r\n")
            elif verb == b"DATA":
                sock.sendall(b"354 go ahead\r\n")
                stream = b"\r\n" + buffer  # the DATA line's CRLF begins the terminator
                while (end := stream.find(TERMINATOR)) < 0:
                    if len(stream) > MAX_MESSAGE:
                        return
                    data = sock.recv(65536)
                    if not data:
                        return
                    stream += data
                content, buffer = stream[2 : end + 2], stream[end + len(TERMINATOR) :]
                self.server.store_message(envelope, content)
                sock.sendall(b"250 2.0.0 OK stored\r\n")
            elif verb in (b"RSET", b"NOOP"):
                sock.sendall(b"250 2.0.0 OK\r\n")
            elif verb == b"QUIT":
                sock.sendall(b"221 2.0.0 Bye\r\n")
                return
            else:
                sock.sendall(b"500 5.5.2 what\r\n")


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, store: str) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.store = store
        self.lock = threading.Lock()
        self.numbers = itertools.count(1)

    def log_command(self, line: bytes) -> None:
        with self.lock, open(os.path.join(self.store, "commands.log"), "ab") as f:
            f.write(line)

    def store_message(self, envelope: dict, content: bytes) -> None:
        with self.lock:
            base = os.path.join(self.store, f"{next(self.numbers):06d}")
        with open(base + ".eml.tmp", "wb") as f:
            f.write(content)
        with open(base + ".json.tmp", "w", encoding="utf-8") as f:
            json.dump(envelope, f)
        os.rename(base + ".eml.tmp", base + ".eml")
        os.rename(base + ".json.tmp", base + ".json")  # the .json marks a complete message


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--port-file", required=True)
    args = parser.parse_args()
    server = Server(args.store)
    with open(args.port_file + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(args.port_file + ".tmp", args.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
