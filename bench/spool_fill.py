#!/usr/bin/env python3
"""Write a backlog straight into a relay's spool, for the drain bench.

    python bench/spool_fill.py --spool DIR --messages N --backup 127.0.0.1:PORT [--backup ...]

Each message gets one copy per ``--backup`` (its ``Destination.name``),
written and committed through ``smtpdup.spool`` as the relay would, minus
the per-message fsync: one ``sync()`` at the end makes the whole backlog
durable, which is what a bench fill needs and ~50x faster. Run it with the
environment (``PYTHONPATH``) of the relay that will drain it, while no relay
uses the spool. Exit 3 when this smtpdup's spool API is not the one written
against (the bench then fills the spool through the relay instead).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smtpclient import make_content  # noqa: E402

API_MISMATCH = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/spool_fill.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spool", required=True)
    parser.add_argument("--messages", type=int, required=True)
    parser.add_argument("--backup", action="append", required=True, help="a backup's Destination.name")
    parser.add_argument("--size", type=int, default=1024, help="body bytes per message (default 1024)")
    parser.add_argument("--sender", default="bench@example.com")
    parser.add_argument("--recipient", default="rcpt@example.net")
    args = parser.parse_args(argv)
    try:
        from smtpdup import spool as sp

        spool = sp.Spool(args.spool)
        make = (sp.new_queue_id, sp.Envelope, sp.Target, spool.create, spool.sync_directory)
    except (ImportError, AttributeError, TypeError) as exc:
        print(f"spool_fill: this smtpdup's spool API differs: {exc}", file=sys.stderr)
        return API_MISMATCH
    new_queue_id, Envelope, Target, create, sync_directory = make
    content = b"Received: from bench.example (bench [127.0.0.1]) by spool_fill; backlog\r\n" + make_content(args.size)
    recipients = (args.recipient,)
    real_fsync = os.fsync
    os.fsync = lambda fd: None  # one sync() at the end instead
    started = time.perf_counter()
    try:
        for n in range(args.messages):
            envelope = Envelope(queue_id=new_queue_id(), sender=args.sender, recipients=recipients,
                                client="127.0.0.1", received_at=time.time())
            try:
                f = create(envelope, [Target(name, recipients) for name in args.backup])
                with f:
                    f.write(content)
                    f.commit()
            except TypeError as exc:
                if n == 0:
                    print(f"spool_fill: this smtpdup's spool API differs: {exc}", file=sys.stderr)
                    return API_MISMATCH
                raise
        sync_directory()
    finally:
        os.fsync = real_fsync
    os.sync()
    seconds = time.perf_counter() - started
    print(f"{args.messages} messages, {args.messages * len(args.backup)} copies in {seconds:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
