"""Command line: argument parsing, subcommands, wiring and exit codes.

gevent's monkey-patching must happen before anything imports socket, ssl
or threading, so it is the first thing this module does (and
``tests/conftest.py`` does the same). Only this module prints to the
terminal and chooses exit codes: 0 success, 1 a runtime failure, 2 a user
mistake (bad configuration, bad arguments, unusable spool), always as one
line on stderr, never a traceback.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import errno  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import stat  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from . import __version__  # noqa: E402
from . import config as config_module  # noqa: E402
from . import logs  # noqa: E402
from .config import Config, ConfigError  # noqa: E402
from .destination import HostPort, parse_destination, parse_hostport  # noqa: E402
from .spool import SpoolError  # noqa: E402

EXIT_OK = 0
EXIT_NOT_READY = 1  # `report`: a backup is NOT READY
EXIT_USAGE = 2

DESCRIPTION = """\
smtpdup relays every message synchronously to a primary SMTP server (the
client gets the primary's own reply) and copies it asynchronously, durably,
to backup servers: for mail-server migrations and archives.

Without a subcommand it runs the relay."""

EPILOG = """\
configuration: --config PATH, else $SMTP_DUP_CONFIG, else ./config.yaml, else
/etc/smtp-dup/config.yaml; every key can be overridden by an environment
variable SMTP_DUP_<SECTION>_<KEY>, e.g. SMTP_DUP_RELAY_DESTINATION_PRIMARY.
See config.example.yaml and README.md."""


# The same note for subcommands that read the configuration, one paragraph
# that argparse wraps.
CONFIG_EPILOG = " ".join(EPILOG.split())


class UsageError(Exception):
    """A mistake in the command line, reported as one line."""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", metavar="PATH", default=argparse.SUPPRESS,
        help="configuration file (default: $SMTP_DUP_CONFIG, ./config.yaml, /etc/smtp-dup/config.yaml)",
    )
    parser = argparse.ArgumentParser(
        prog="smtpdup", description=DESCRIPTION, epilog=EPILOG, parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"smtpdup {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("run", parents=[common], epilog=CONFIG_EPILOG,
                   help="run the relay (the default)",
                   description="Run the relay until SIGTERM (drain) or SIGINT; SIGHUP reloads the configuration.")
    check = sub.add_parser(
        "check", parents=[common], epilog=CONFIG_EPILOG,
        help="validate the configuration and print it",
        description="Validate everything the relay checks at start (values, TLS certificate and key, "
                    "CA file, spool directory) and print every key with its value and source "
                    "(passwords masked). Exit status 0 when valid, 2 when not. Creates nothing.")
    check.add_argument("--connect", action="store_true",
                       help="also open a session to every destination (TLS and AUTH as configured), "
                            "print its greeting and EHLO extensions and QUIT without sending mail; "
                            "exit status 1 when any cannot be reached or refuses")

    queue = sub.add_parser("queue", parents=[common], epilog=CONFIG_EPILOG,
                           help="inspect or change the backup spool",
                           description="Inspect the backup spool, dead letters included. Safe while the relay runs.")
    queue_sub = queue.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    listing = queue_sub.add_parser("list", parents=[common], help="list pending and dead copies",
                                   description="List every copy in the spool: id, age, sender, recipients, "
                                               "destination, state (pending or dead), attempts, last reply.")
    listing.add_argument("--json", action="store_true", help="print a JSON array of copies")
    flush = queue_sub.add_parser("flush", parents=[common], help="make pending copies due now",
                                 description="Make every pending copy (or every one for DEST) due now; "
                                             "a running relay delivers them within seconds.")
    flush.add_argument("--destination", metavar="DEST", help="only the copies for this backup (as `queue list` shows it)")
    requeue = queue_sub.add_parser(
        "requeue", parents=[common], help="make dead copies pending again (like postsuper -r)",
        description="Make dead copies pending again and due now, attempts reset, their history kept "
                    "(like postsuper -r): each becomes a new copy (a new id) for its destination and its "
                    "dead recipients alone; a running relay delivers it within seconds. ID is a copy "
                    "(QUEUEID.N) or every dead copy of a message (QUEUEID).",
    )
    _selection(requeue, "requeue")
    delete = queue_sub.add_parser(
        "delete", parents=[common], help="delete copies, pending or dead",
        description="Delete copies: one copy (ID as shown by `queue list`, e.g. QUEUEID.0) or every copy "
                    "of a message (QUEUEID), pending or dead; --dead every dead copy; --destination "
                    "every copy, pending or dead, for that backup.",
    )
    _selection(delete, "delete")
    show = queue_sub.add_parser(
        "show", parents=[common], help="one copy in detail",
        description="One copy (QUEUEID.N; QUEUEID shows each copy of the message): envelope, destination, "
                    "state, every attempt with its time and reply, then the message's header section.",
    )
    show.add_argument("id", metavar="ID")
    show.add_argument("--body", action="store_true", help="print the whole message, body included")

    report = sub.add_parser("report", parents=[common], epilog=CONFIG_EPILOG,
                            help="migration readiness per backup",
                            description="Per backup: copies delivered, pending and dead-lettered, and the "
                                        "recipients and domains a backup refused although the primary "
                                        "accepted them.")
    report.add_argument("--since", default="24h", metavar="DURATION",
                        help="period to report on: a number with m, h or d (default: 24h)")
    report.add_argument("--json", action="store_true", help="print one JSON object")

    health = sub.add_parser(
        "health", parents=[common], epilog=CONFIG_EPILOG,
        help="probe the running relay (for container health checks)",
        description="Probe the relay that runs with this configuration: GET /healthz on metrics.listen "
                    "when metrics are enabled, else an SMTP connection to smtp.listen that must be "
                    "greeted (then QUIT). A wildcard listen address is probed on loopback. "
                    "Exit status 0 healthy, 1 not (a configuration error included).",
    )
    health.add_argument("--timeout", type=float, default=HEALTH_TIMEOUT_SECONDS, metavar="SECONDS",
                        help="give up after this long (default: %(default)s)")

    sink = sub.add_parser(
        "sink", help="a capturing SMTP server storing each message as a file",
        description="Accept every message (from loopback and private networks) and store it as a file "
                    "under MAILDIR/new/: two lines X-Envelope-From and X-Envelope-To, then the content "
                    "as the client meant it (dot-stuffing undone). For dry runs, demos and tests. "
                    "Reads no configuration file or SMTP_DUP_* variable; stop it with SIGTERM or Ctrl-C.",
    )
    sink.add_argument("--listen", required=True, metavar="HOST:PORT",
                      help="address to listen on, e.g. 127.0.0.1:2526 or [::1]:2526 (port 0: any free port)")
    sink.add_argument("--maildir", required=True, metavar="DIR",
                      help="directory to store messages in (DIR/tmp, DIR/new, DIR/cur are created)")
    sink.add_argument("--domain", default="sink.localhost", help="name in the greeting (default: %(default)s)")

    demo = sub.add_parser(
        "demo", help="the relay with a local primary and backup sink",
        description="Run the relay (on 127.0.0.1:2525 unless --listen says otherwise) with a primary sink "
                    "and a backup sink on free loopback ports, storing each message under DIR/primary/new/ "
                    "and DIR/backup/new/ (the spool is DIR/spool). Reads no configuration file or "
                    "SMTP_DUP_* variable; no metrics endpoint. Prints how to send a test message "
                    "(with swaks or Python); stop it with Ctrl-C or SIGTERM.",
    )
    demo.add_argument("--dir", default="demo-mail", help="where the sinks store mail (default: %(default)s)")
    demo.add_argument("--listen", default="127.0.0.1:2525", metavar="HOST:PORT",
                      help="address of the relay (default: %(default)s)")
    return parser


def _selection(parser: argparse.ArgumentParser, verb: str) -> None:
    """ID... | --dead | --destination DEST, exactly one of them."""
    parser.add_argument("ids", metavar="ID", nargs="*", help=f"copies or messages to {verb}")
    parser.add_argument("--dead", action="store_true", help=f"{verb} every dead copy")
    parser.add_argument("--destination", metavar="DEST",
                        help=f"{verb} every {'dead ' if verb == 'requeue' else ''}copy for this backup "
                             "(as `queue list` shows it)")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `smtpdup` console script and `python -m smtpdup`."""
    args = _parser().parse_args(argv)
    try:
        status = _dispatch(args)
    except (ConfigError, SpoolError, UsageError) as exc:
        print(f"smtpdup: {exc}", file=sys.stderr)
        status = EXIT_USAGE
    except KeyboardInterrupt:
        status = 130
    sys.exit(status)


def _dispatch(args: argparse.Namespace) -> int:
    command = args.command or "run"
    path = getattr(args, "config", None)
    if command == "run":
        from .preflight import validate

        config = config_module.load(path)
        validate(config)  # what `check` validates, word for word
        _setup_logs(config)
        try:
            if config.smtp.workers > 1:
                from .workers import prepare_metrics

                metrics_dir = prepare_metrics()  # before prometheus_client is imported
                from .workers import run_workers

                return run_workers(config, metrics_dir, lambda: config_module.load(path))
            from .service import run_relay

            return run_relay(config)
        except OSError as exc:
            raise _cannot_listen(exc, config) from None
    if command == "check":
        return _check(config_module.load(path), args.connect)
    if command == "queue":
        return _queue(args, config_module.load(path, require_primary=False))
    if command == "report":
        return _report(args, config_module.load(path, require_primary=False))
    if command == "health":
        return _health(path, args.timeout)
    if command == "sink":
        return _sink(_hostport(args.listen, "--listen"), args.maildir, args.domain)
    if command == "demo":
        return _demo(args.dir, _hostport(args.listen, "--listen"))
    raise UsageError(f"unknown command {command!r}")


def _check(config: Config, connect: bool) -> int:
    from .preflight import validate

    validate(config)
    source = f"file {config.path}" if config.path else "no file, defaults and environment only"
    print(f"# smtpdup {__version__}: configuration is valid ({source})")
    for line in config_module.describe(config):
        print(line)
    return _check_connect(config) if connect else EXIT_OK


def _check_connect(config: Config) -> int:
    """A session to every destination at once (each bounded by
    relay.timeout_seconds), reported in configuration order; 1 if any failed."""
    import gevent

    from .upstream import probe

    relay = config.relay
    assert relay.destination_primary is not None
    destinations = [("primary", relay.destination_primary)]
    destinations += [("backup", backup) for backup in relay.destination_backups]
    jobs = [gevent.spawn(probe, destination, relay, config.smtp.domain) for _, destination in destinations]
    gevent.joinall(jobs)
    failed = []
    for (role, destination), job in zip(destinations, jobs):
        result = job.value
        print(f"\n# {role} {destination.name}")
        if result is None:  # a bug in probe: say so, do not hide it
            print(f"  FAILED: {type(job.exception).__name__}: {job.exception}")
            failed.append(destination.name)
            continue
        if result.greeting is not None:
            print(f"  greeting: {result.greeting}")
        if result.error is not None:
            print(f"  FAILED: {result.error}")
            failed.append(destination.name)
            continue
        print(f"  tls: {result.tls or 'none (plain text)'}")
        if destination.username:
            print(f"  auth: as {destination.username}")
        print(f"  ehlo: {', '.join(result.extensions) or '(none: HELO only)'}")
        print("  ok: session opened and closed (QUIT) without a transaction")
    if failed:
        print(f"smtpdup: check --connect: {len(failed)} of {len(destinations)} destination(s) cannot be used: "
              f"{', '.join(failed)}", file=sys.stderr)
        return 1
    return EXIT_OK


# Below Docker's HEALTHCHECK --timeout (5s in the Dockerfile), so that the
# probe reports its own reason instead of being killed.
HEALTH_TIMEOUT_SECONDS = 4.0
# Where a wildcard listen address is reached from inside the same host.
_LOOPBACK_FOR = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def _health(path: str | None, timeout: float) -> int:
    """``smtpdup health``: 0 when the relay answers, 1 when not. Never 2,
    which Docker reserves: a broken configuration is unhealthy too."""
    try:
        config = config_module.load(path, require_primary=False)
    except ConfigError as exc:
        print(f"smtpdup health: unhealthy: {exc}", file=sys.stderr)
        return 1
    if config.metrics.listen is not None:
        healthy, what = _probe_healthz(config.metrics.listen, timeout)
    else:
        healthy, what = _probe_greeting(config.smtp.listen, timeout)
    if healthy:
        print(f"smtpdup health: healthy: {what}")
        return EXIT_OK
    print(f"smtpdup health: unhealthy: {what}", file=sys.stderr)
    return 1


def _probe_healthz(listen: HostPort, timeout: float) -> tuple[bool, str]:
    import http.client

    host = _LOOPBACK_FOR.get(listen.host, listen.host)
    where = f"http://{HostPort(host, listen.port)}/healthz (metrics.listen)"
    connection = http.client.HTTPConnection(host, listen.port, timeout=timeout)
    try:
        connection.request("GET", "/healthz")
        status = connection.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        return False, f"{where}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
    finally:
        connection.close()
    return status == 200, f"{where} answered {status}"


def _probe_greeting(listen: HostPort, timeout: float) -> tuple[bool, str]:
    import smtplib

    host = _LOOPBACK_FOR.get(listen.host, listen.host)
    where = f"{HostPort(host, listen.port)} (smtp.listen)"
    try:
        smtp = smtplib.SMTP(host, listen.port, timeout=timeout)
    except smtplib.SMTPConnectError as exc:
        reply = f"{exc.smtp_code} {exc.smtp_error.decode(errors='replace')}"
        # 554 5.7.1: the relay greets this address with its refusal (loopback
        # is outside smtp.allowed_networks): it is up and answering all the same.
        return exc.smtp_code == 554, f"{where} greeted with {reply}"
    except (OSError, smtplib.SMTPException) as exc:
        return False, f"{where}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
    try:
        smtp.quit()
    except (OSError, smtplib.SMTPException):
        smtp.close()
    return True, f"{where} greeted with 220"


def _setup_logs(config: Config) -> None:
    logs.setup(config.log.level, config.log.format)


def _hostport(text: str, option: str) -> HostPort:
    try:
        return parse_hostport(text)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _admin_spool(config: Config):
    """The spool for `queue` and `report`: never created. As root on a
    spool owned by another user, first become that user (groups, gid, uid),
    so that whatever these commands write belongs to the spool's owner and a
    relay running as that user is never disturbed."""
    from .spool import Spool

    path = config.relay.spool_dir
    where = f"relay.spool_dir ({config.sources.get('relay.spool_dir', 'default')})"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{where}: spool directory {os.path.abspath(path)} does not exist: the relay has not "
                         "run with this configuration (or fix relay.spool_dir / --config)") from None
    except OSError as exc:
        raise UsageError(f"{where}: cannot read {os.path.abspath(path)}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{where}: {os.path.abspath(path)} is not a directory")
    if os.geteuid() == 0 and st.st_uid != 0:
        # Paths are looked up from the spool itself: the working directory
        # (or a parent of the spool) may be closed to that user.
        os.chdir(path)
        _become(st.st_uid, st.st_gid)
        path = "."
    try:
        return Spool(path, create=False)
    except SpoolError as exc:
        raise UsageError(f"{where}: {exc}") from None


def _become(uid: int, gid: int) -> None:
    """Drop root for good: the groups of the user ``uid`` (or ``gid`` alone
    when it has no passwd entry), then its gid, then the uid."""
    import pwd

    try:
        user = pwd.getpwuid(uid)
        gid = user.pw_gid
        groups = os.getgrouplist(user.pw_name, gid)
    except KeyError:
        groups = [gid]
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _selected(args: argparse.Namespace, verb: str) -> None:
    """Exactly one of ID..., --dead, --destination."""
    given = [bool(args.ids), bool(getattr(args, "dead", False)), args.destination is not None]
    if sum(given) != 1:
        raise UsageError(f"queue {verb}: give IDs, --dead or --destination DEST (one of them)")


def _check_destination(destination: str, config: Config, entries) -> str:
    """``destination`` as the spool names it: a configured backup (its name
    or its configured form) or one that copies in the spool name. Else a
    UsageError listing the configured ones."""
    known = {b.name for b in config.relay.destination_backups} | {e.destination for e in entries}
    if destination in known:
        return destination
    try:
        name = parse_destination(destination).name
    except (ValueError, TypeError):
        name = None
    if name in known:
        return name
    configured = ", ".join(b.name for b in config.relay.destination_backups) or "none"
    raise UsageError(f"--destination: no backup destination {destination!r} in the configuration or the "
                     f"spool (configured backups: {configured})")


def _queue(args: argparse.Namespace, config: Config) -> int:
    from . import report

    spool = _admin_spool(config)
    action = args.queue_command
    if action == "list":
        entries = report.queue_entries(spool)
        if args.json:
            print(json.dumps(entries, ensure_ascii=False, indent=2))
        else:
            print(report.format_queue(entries), end="")
        return EXIT_OK
    if action == "flush":
        if args.destination is None:
            spool.request_flush()
            print("flush requested: a running relay makes every pending copy due within seconds")
            return EXIT_OK
        destination = _check_destination(args.destination, config, spool.entries())
        spool.request_flush(destination)
        print(f"flush requested: a running relay makes every pending copy for {destination} due within seconds")
        return EXIT_OK
    if action == "show":
        return _show(spool, args.id, args.body)
    _selected(args, action)
    everything = spool.entries()
    if args.destination is not None:
        destination = _check_destination(args.destination, config, everything)
        chosen = [e for e in everything if e.destination == destination]
    elif args.dead:
        chosen = everything
    else:
        chosen, unknown = [], []
        for id in dict.fromkeys(args.ids):
            mine = [e for e in everything if e.id == id or e.envelope.queue_id == id]
            if action == "requeue" and mine and not any(e.state == "dead" for e in mine):
                raise UsageError(f"queue requeue: {id} is pending, not dead (`smtpdup queue flush` makes it due now)")
            if not mine:
                unknown.append(id)
            chosen += mine
        if unknown:
            raise UsageError(f"queue {action}: no copy or message with id {', '.join(unknown)} "
                             "(see `smtpdup queue list`); nothing done")
    if action == "requeue":
        return _requeue(spool, [e for e in chosen if e.state == "dead"])
    if args.dead:
        chosen = [e for e in chosen if e.state == "dead"]
    removed = 0
    for entry in chosen:
        removed += spool.delete(entry.id) if entry.state == "pending" else spool.delete_dead(entry.id)
    print(f"deleted {_plural(removed, 'copy', 'copies')}")
    return EXIT_OK


def _requeue(spool, dead) -> int:
    done = 0
    for entry in dead:
        new_id = spool.requeue(entry.id)
        if new_id is not None:
            done += 1
            print(f"{entry.id} -> {new_id} ({entry.destination}: {', '.join(entry.recipients)})")
    print(f"requeued {_plural(done, 'copy', 'copies')}: a running relay delivers "
          f"{'it' if done == 1 else 'them'} within seconds")
    return EXIT_OK


# At most this much of a message is read for its header section.
SHOW_HEADER_MAX_BYTES = 1024 * 1024


def _show(spool, id: str, body: bool) -> int:
    from . import report

    entries = spool.entries(id)
    if not entries:
        raise UsageError(f"queue show: no copy or message with id {id} (see `smtpdup queue list`)")
    for n, entry in enumerate(entries):
        first = entry.origin.get("first_received_at", entry.envelope.received_at)
        since = min(float(first) if isinstance(first, (int, float)) else entry.envelope.received_at,
                    entry.envelope.received_at) - 60
        events = list(spool.journal_since(since))
        chain = set(report.lineage(entry.id, events))
        history = sorted((e for e in events if e.get("id") in chain), key=lambda e: e["t"])
        if n:
            print()
        print(report.format_show(entry, history), end="")
        out = sys.stdout.buffer
        try:
            with spool.open_entry(entry) as f:
                head = f.read(min(entry.content_length, SHOW_HEADER_MAX_BYTES))
                if body:
                    print("\nmessage:", flush=True)
                    out.write(head)
                    remaining = entry.content_length - len(head)
                    while remaining > 0:
                        block = f.read(min(remaining, 1 << 20))
                        if not block:
                            break
                        out.write(block)
                        remaining -= len(block)
                else:
                    end = head.find(b"\r\n\r\n")
                    header = head if end < 0 else head[: end + 2]
                    rest = entry.content_length - len(header) - (2 if end >= 0 else 0)
                    print(f"\nheader section ({rest} bytes of body not shown, --body shows them):"
                          if rest > 0 else "\nheader section (no body):", flush=True)
                    out.write(header)
        except FileNotFoundError:
            raise UsageError(f"queue show: {entry.id} left the spool meanwhile (delivered or deleted)") from None
        out.flush()
    return EXIT_OK


def _report(args: argparse.Namespace, config: Config) -> int:
    from . import report

    try:
        seconds = report.parse_duration(args.since)
    except ValueError as exc:
        raise UsageError(f"--since: {exc}") from None
    spool = _admin_spool(config)
    since = time.time() - seconds
    names = [b.name for b in config.relay.destination_backups]
    reports = report.build_report(spool, since, names)
    if args.json:
        print(json.dumps(report.to_json(reports, since), ensure_ascii=False, indent=2))
    else:
        print(report.format_text(reports, args.since), end="")
    return EXIT_NOT_READY if any(r.not_ready for r in reports) else EXIT_OK


# What binding a listening socket fails with for a reason the operator can fix.
_LISTEN_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})


def _cannot_listen(exc: OSError, config: Config | None = None, what: str = "cannot listen") -> UsageError:
    """One line for a listening socket that could not be opened (address in
    use or not local, privileged port, unknown host name). gevent appends the
    address to the message; with ``config``, the key it came from is named.
    Re-raises ``exc`` when it is no such failure (a bug: a traceback helps)."""
    if not (isinstance(exc, socket.gaierror) or exc.errno in _LISTEN_ERRNOS):
        raise exc
    reason = (exc.strerror or str(exc)).split(": (")[0]
    if config is not None:
        for key, address in (("smtp.listen", config.smtp.listen), ("metrics.listen", config.metrics.listen)):
            if address is not None and f", {address.port})" in str(exc):
                return UsageError(f"{key} ({config.sources[key]}): cannot listen on {address}: {reason}")
    return UsageError(f"{what}: {reason}")


def _sink_config(listen: HostPort, domain: str) -> Config:
    """Built-in defaults only (never ./config.yaml nor SMTP_DUP_*: a sink is
    a fixed test peer), listening on ``listen`` with ``domain``."""
    import dataclasses

    base = config_module.load(os.devnull, {}, require_primary=False)
    return dataclasses.replace(base, smtp=dataclasses.replace(base.smtp, listen=listen, domain=domain))


def _serve_sink(listen: HostPort, maildir_path: str, domain: str):
    """Start a sink server; returns it, already listening. Raises UsageError
    when the maildir cannot be created or the address cannot be bound."""
    from .server import SmtpServer
    from .sink import Maildir, SinkSession

    try:
        maildir = Maildir(maildir_path)
    except OSError as exc:
        raise UsageError(f"cannot create maildir {maildir_path}: {exc.strerror or exc}") from None
    server = SmtpServer(config_module.Current(_sink_config(listen, domain)),
                        lambda client_ip: SinkSession(maildir, client_ip))
    try:
        server.start()
    except OSError as exc:
        raise _cannot_listen(exc, what=f"sink: cannot listen on {listen}") from None
    return server


# How long a stopping sink lets a message in flight finish.
SINK_GRACE_SECONDS = 2.0


def _sink(listen: HostPort, maildir: str, domain: str) -> int:
    logs.setup("info", "text")
    server = _serve_sink(listen, maildir, domain)
    address = HostPort(*server.address)
    print(f"smtpdup sink: listening on {address}, storing under {os.path.join(maildir, 'new')}",
          file=sys.stderr, flush=True)
    _wait_for_signal()
    server.drain(SINK_GRACE_SECONDS)
    return EXIT_OK


def _wait_for_signal() -> None:
    import signal

    import gevent
    from gevent.event import Event

    stop = Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    stop.wait()


def _demo(directory: str, listen: HostPort) -> int:
    from .service import run_relay

    where = os.path.abspath(directory)
    primary = _serve_sink(HostPort("127.0.0.1", 0), os.path.join(where, "primary"), "primary.demo")
    backup = _serve_sink(HostPort("127.0.0.1", 0), os.path.join(where, "backup"), "backup.demo")
    # The demo's whole configuration; the user's environment and files play no part.
    environ = {
        "SMTP_DUP_SMTP_LISTEN": str(listen),
        "SMTP_DUP_SMTP_SHUTDOWN_GRACE_SECONDS": "5",
        "SMTP_DUP_RELAY_DESTINATION_PRIMARY": f"127.0.0.1:{primary.address[1]}",
        "SMTP_DUP_RELAY_DESTINATION_BACKUPS": f"127.0.0.1:{backup.address[1]}",
        "SMTP_DUP_RELAY_SPOOL_DIR": os.path.join(where, "spool"),
        "SMTP_DUP_RELAY_RETRY_INITIAL_SECONDS": "5",
        "SMTP_DUP_METRICS_LISTEN": "",
        "SMTP_DUP_LOG_FORMAT": "text",
    }
    config = config_module.load(os.devnull, environ)
    _setup_logs(config)

    def ready(server) -> None:
        relay = HostPort(*server.address)
        print(
            f"""
smtpdup demo is running: relay on {relay}
  primary sink  127.0.0.1:{primary.address[1]} -> {where}/primary/new/
  backup sink   127.0.0.1:{backup.address[1]} -> {where}/backup/new/
  spool         {where}/spool/

Send a test message:
  swaks --server {relay} --from alice@example.com --to bob@example.com
or with Python:
  python3 -c "import smtplib; smtplib.SMTP('{relay.host}', {relay.port}).sendmail('alice@example.com', ['bob@example.com'], 'Subject: hi\\r\\n\\r\\nhello\\r\\n')"

Then look at the copies:  ls {where}/primary/new/ {where}/backup/new/
Stop with Ctrl-C.
""",
            file=sys.stderr, flush=True,
        )

    try:
        return run_relay(config, ready=ready, load_config=lambda: config_module.load(os.devnull, environ))
    except OSError as exc:
        raise _cannot_listen(exc, what=f"demo: cannot listen on {listen}") from None
