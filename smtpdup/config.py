"""Configuration: the key table, layered loading, validation, the frozen Config.

This module owns every configuration key of smtpdup (SPEC §1). One table,
``KEYS``, holds each key's parser, default, type and one-line doc; it drives
``load()`` (defaults < config file < environment), ``describe()`` (what
``smtpdup check`` prints) and ``example_yaml()`` (``config.example.yaml``).
Addresses and destinations are parsed by destination.py, which owns their
value types (``HostPort``, ``Destination``).

It must not touch the network, start anything or set up logging: it reads the
environment mapping and one YAML file, and returns frozen dataclasses or raises
``ConfigError``, whose text is one line naming the key and where its value came
from. Passwords never appear in an error, in ``describe()`` or in a ``repr``.
Imports: stdlib, PyYAML and destination.py only.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import yaml

from .destination import (
    SCHEME,
    Destination,
    HostPort,
    format_number,
    parse_destination,
    parse_hostport,
    suggest,
    to_float,
)

__all__ = [
    "CONFIG_ENV",
    "KEYS",
    "SEARCH_PATHS",
    "Config",
    "ConfigError",
    "Current",
    "LogConfig",
    "MetricsConfig",
    "RelayConfig",
    "Setting",
    "SmtpConfig",
    "describe",
    "example_yaml",
    "load",
]

ENV_PREFIX: Final = "SMTP_DUP_"
CONFIG_ENV: Final = "SMTP_DUP_CONFIG"
# Searched in this order when neither --config nor SMTP_DUP_CONFIG names a file.
SEARCH_PATHS: Final = ("./config.yaml", "/etc/smtp-dup/config.yaml")

_INTEGER = re.compile(r"[+-]?[0-9]+")
_SHOWN_CHARS: Final = 120  # an offending value is cut to this in an error line


class ConfigError(Exception):
    """Bad configuration. ``str(err)`` is one line for the operator, e.g.
    ``config: relay.timeout_seconds (SMTP_DUP_RELAY_TIMEOUT_SECONDS): expected
    a number, got 'ten'``; the CLI prefixes ``smtpdup: `` and exits 2."""


class _Invalid(ValueError):
    """A parser's complaint: ``problem`` and the offending (part of the) value."""

    def __init__(self, problem: str, value: object) -> None:
        super().__init__(problem)
        self.problem = problem
        self.value = value


# --------------------------------------------------------------------------
# Parsers: each takes a value as a YAML file or the environment gives it
# (environment values are always strings; a YAML null counts as empty) and
# returns the typed value or raises _Invalid.

Parser = Callable[[Any], Any]


def _integer(*, minimum: int) -> Parser:
    def parse(value: object) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        elif isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
            number = int(value)
        else:
            raise _Invalid("expected a whole number", value)
        if number < minimum:
            raise _Invalid(f"must be at least {minimum}", value)
        return number

    return parse


def _number(*, positive: bool) -> Parser:
    def parse(value: object) -> float:
        try:
            number = to_float(value.strip() if isinstance(value, str) else value)
        except ValueError:
            raise _Invalid("expected a number", value) from None
        if number < 0 or (positive and number == 0):
            raise _Invalid("must be greater than 0" if positive else "must not be negative", value)
        return number

    return parse


_TRUE: Final = frozenset({"true", "yes", "on", "1"})
_FALSE: Final = frozenset({"false", "no", "off", "0"})


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise _Invalid("expected true or false", value)


def _choice(*choices: str) -> Parser:
    def parse(value: object) -> str:
        text = value.strip().lower() if isinstance(value, str) else None
        if text not in choices:
            raise _Invalid(f"expected one of {', '.join(choices)}", value)
        return text

    return parse


def _string(*, required: bool) -> Parser:
    def parse(value: object) -> str:
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise _Invalid("expected a string", value)
        if required and not value.strip():
            raise _Invalid("must not be empty", value)
        return value.strip()

    return parse


def _address(*, optional: bool) -> Parser:
    def parse(value: object) -> HostPort | None:
        if optional and (value is None or (isinstance(value, str) and not value.strip())):
            return None
        if not isinstance(value, str):
            raise _Invalid("expected host:port", value)
        try:
            return parse_hostport(value)
        except ValueError as err:
            raise _Invalid(f"expected host:port: {err}", value) from None

    return parse


def _workers(value: object) -> int:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return os.cpu_count() or 1
    try:
        return _integer(minimum=1)(value)
    except _Invalid as err:
        raise _Invalid(f"{err.problem} or auto", value) from None


def _items(value: object) -> list[Any]:
    """A list from YAML, or comma-separated text; empty text is an empty list."""
    if value is None:
        return []
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, list):
        return value
    raise _Invalid("expected a list", value)


def _networks(value: object) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for item in _items(value):
        try:
            if not isinstance(item, str):
                raise ValueError(item)
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise _Invalid("expected a CIDR network such as 10.0.0.0/8", item) from None
    return tuple(networks)


def _destination(value: object) -> Destination:
    try:
        return parse_destination(value)  # type: ignore[arg-type]
    except ValueError as err:
        raise _Invalid(f"bad destination: {err}", value) from None


def _primary(value: object) -> Destination | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    primary = _destination(value)
    if primary.domains or primary.sample_percent != 100:
        raise _Invalid("domains and sample_percent apply to backups only", value)
    return primary


def _backups(value: object) -> tuple[Destination, ...]:
    backups: dict[str, Destination] = {}
    for item in _items(value):
        backup = _destination(item)
        if backup.name in backups:  # the name keys spool files and metrics
            raise _Invalid(f"destination {backup.name} listed twice", item)
        backups[backup.name] = backup
    return tuple(backups.values())


# --------------------------------------------------------------------------
# The key table


@dataclass(frozen=True, slots=True)
class Setting:
    """One configuration key. ``default`` is written as in a config file and
    parsed like any other value; ``None`` with ``example`` set means required
    (``example`` is then what config.example.yaml shows)."""

    key: str
    parse: Parser
    default: Any
    doc: str
    type_doc: str
    example: Any = None

    @property
    def section(self) -> str:
        return self.key.partition(".")[0]

    @property
    def name(self) -> str:
        return self.key.partition(".")[2]

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.replace(".", "_").upper()


_SECONDS = _number(positive=True)

KEYS: Final[tuple[Setting, ...]] = (
    Setting("smtp.listen", _address(optional=False), "127.0.0.1:2525",
            "where to accept SMTP ([::1]:2525 for IPv6)", "host:port"),
    Setting("smtp.domain", _string(required=True), "localhost",
            "name in the 220 greeting and EHLO reply", "string"),
    Setting("smtp.max_message_bytes", _integer(minimum=1), 26214400,
            "advertised as SIZE; larger messages get 552 5.3.4", "int"),
    Setting("smtp.max_recipients", _integer(minimum=1), 1000,
            "further RCPTs get 452 4.5.3", "int"),
    Setting("smtp.max_connections", _integer(minimum=1), 5000,
            "further connections get 421 4.7.0 and are closed", "int"),
    Setting("smtp.idle_timeout_seconds", _SECONDS, 300,
            "a silent client gets 421 4.4.2 and is closed (also one that stops reading our replies; "
            "checked every quarter of this, at most every second)", "number"),
    Setting("smtp.allowed_networks", _networks,
            ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"],
            "other clients get 554 5.7.1 and are closed; 0.0.0.0/0,::/0 allows all",
            "list of CIDR"),
    Setting("smtp.bare_newline", _choice("normalize", "reject"), "normalize",
            "bare LF/CR or NUL in DATA: rewrite (CRLF, NULs removed), or reject with 550 5.5.2 / 550 5.6.0", "normalize | reject"),
    Setting("smtp.tls_cert_file", _string(required=False), "",
            "PEM certificate; with smtp.tls_key_file set too, STARTTLS is offered", "path"),
    Setting("smtp.tls_key_file", _string(required=False), "",
            "PEM private key for smtp.tls_cert_file", "path"),
    Setting("smtp.require_tls", _boolean, False,
            "MAIL before STARTTLS gets 530 5.7.0", "bool"),
    Setting("smtp.received_header", _boolean, True,
            "prepend one Received: trace header (RFC 5321 §4.4) to every copy", "bool"),
    Setting("smtp.shutdown_grace_seconds", _number(positive=False), 30,
            "on SIGTERM, how long transactions in flight may take to finish", "number"),
    Setting("smtp.workers", _workers, 1,
            "processes accepting on smtp.listen; auto: one per CPU", "int or auto"),
    Setting("relay.destination_primary", _primary, None,
            "synchronous destination: clients get its own reply", "destination",
            example="primary.example:25"),
    Setting("relay.destination_backups", _backups, [],
            "asynchronous destinations; each a destination or {address, domains, sample_percent}",
            "list of destination"),
    Setting("relay.timeout_seconds", _SECONDS, 10,
            "connect and every command/reply with any destination", "number"),
    Setting("relay.backup_concurrency", _integer(minimum=1), 32,
            "size of the bounded pool of backup deliveries", "int"),
    Setting("relay.tls_ca_file", _string(required=False), "",
            "CA bundle for verifying starttls=require and smtps:// destinations"
            " (empty: the system store)",
            "path"),
    Setting("relay.spool_dir", _string(required=True), "spool",
            "durable queue of backup copies (created if missing)", "path"),
    Setting("relay.retry_initial_seconds", _SECONDS, 60,
            "first retry delay; doubles per attempt", "number"),
    Setting("relay.retry_max_interval_seconds", _SECONDS, 3600,
            "cap on the retry delay", "number"),
    Setting("relay.retry_max_age_seconds", _number(positive=False), 432000,
            "age at which a copy still not delivered is dead-lettered", "number"),
    Setting("metrics.listen", _address(optional=True), "127.0.0.1:9925",
            "HTTP /metrics, /healthz, /readyz; empty disables", "host:port or empty"),
    Setting("log.level", _choice("debug", "info", "warning", "error"), "info",
            "least severe level logged", "debug/info/warning/error"),
    Setting("log.format", _choice("json", "text"), "json",
            "json: one JSON object per line on stderr; text: for people", "json | text"),
)  # fmt: skip

_SETTINGS: Final = {setting.key: setting for setting in KEYS}
_PRIMARY: Final = "relay.destination_primary"


# --------------------------------------------------------------------------
# The frozen result; field names are the key table's names (a test holds this)


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    listen: HostPort
    domain: str
    max_message_bytes: int
    max_recipients: int
    max_connections: int
    idle_timeout_seconds: float
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    bare_newline: str
    tls_cert_file: str
    tls_key_file: str
    require_tls: bool
    received_header: bool
    shutdown_grace_seconds: float
    workers: int

    def allows(self, ip: str) -> bool:
        """Whether a client at ``ip`` may connect; an IPv4-mapped IPv6
        address (``::ffff:1.2.3.4``) is checked as IPv4, unparsable is False."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.allowed_networks)


@dataclass(frozen=True, slots=True)
class RelayConfig:
    destination_primary: Destination | None  # None only with require_primary=False
    destination_backups: tuple[Destination, ...]
    timeout_seconds: float
    backup_concurrency: int
    tls_ca_file: str
    spool_dir: str
    retry_initial_seconds: float
    retry_max_interval_seconds: float
    retry_max_age_seconds: float


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: HostPort | None  # None: disabled


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str
    format: str


@dataclass(frozen=True, slots=True)
class Config:
    smtp: SmtpConfig
    relay: RelayConfig
    metrics: MetricsConfig
    log: LogConfig
    path: str | None  # the config file read (absolute), or None
    sources: Mapping[str, str]  # key -> "default", the file's path or an env var name


class Current:
    """The configuration in force in a process: one reference that the
    listener, the relay and the scheduler share and read ``config`` from
    where they use it, so that a reload (service.RelayService.reload)
    replaces it for all of them with one assignment."""

    __slots__ = ("config",)

    def __init__(self, config: Config) -> None:
        self.config = config


_SECTIONS: Final[dict[str, type]] = {
    "smtp": SmtpConfig,
    "relay": RelayConfig,
    "metrics": MetricsConfig,
    "log": LogConfig,
}


# --------------------------------------------------------------------------
# Loading


def load(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    require_primary: bool = True,
) -> Config:
    """Load the configuration: defaults < config file < environment (SPEC §1).

    The file is ``path`` (from ``--config``), else ``$SMTP_DUP_CONFIG``, else
    the first of SEARCH_PATHS that exists; none at all is fine. ``environ``
    defaults to ``os.environ``. Every layer is validated, not only the winning
    one. Raises ConfigError, and nothing else, for any bad input.
    """
    environ = os.environ if environ is None else environ
    file_path, file_data = _read_file(path, environ)
    entries = [(setting.key, setting.default, "default") for setting in KEYS]
    if file_path is not None:
        entries += _file_entries(file_path, file_data)
    entries += _env_entries(environ)

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, raw, source in entries:
        values[key] = _parse(_SETTINGS[key], raw, source)
        sources[key] = source
    if require_primary and values[_PRIMARY] is None:
        raise ConfigError(
            f"config: {_PRIMARY} is required:"
            f" set it in the config file or {_SETTINGS[_PRIMARY].env}"
        )
    _cross_check(values, sources)
    sections = {
        section: cls(**{s.name: values[s.key] for s in KEYS if s.section == section})
        for section, cls in _SECTIONS.items()
    }
    return Config(**sections, path=file_path, sources=MappingProxyType(sources))


def _parse(setting: Setting, raw: object, source: str) -> Any:
    try:
        return setting.parse(raw)
    except _Invalid as err:
        problem, shown = err.problem, err.value
    except ValueError as err:
        problem, shown = str(err), raw
    raise ConfigError(f"config: {setting.key} ({source}): {problem}, got {_show(shown)}")


def _cross_check(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    def fail(key: str, problem: str) -> None:
        raise ConfigError(f"config: {key} ({sources[key]}): {problem}")

    cert, key = values["smtp.tls_cert_file"], values["smtp.tls_key_file"]
    if cert and not key:
        fail("smtp.tls_cert_file", "set without smtp.tls_key_file; STARTTLS needs both")
    if key and not cert:
        fail("smtp.tls_key_file", "set without smtp.tls_cert_file; STARTTLS needs both")
    if values["smtp.require_tls"] and not cert:
        fail("smtp.require_tls", "needs smtp.tls_cert_file and smtp.tls_key_file to offer STARTTLS")
    initial, cap = values["relay.retry_initial_seconds"], values["relay.retry_max_interval_seconds"]
    if initial > cap:
        fail(
            "relay.retry_initial_seconds",
            f"must not exceed relay.retry_max_interval_seconds ({format_number(cap)}),"
            f" got {format_number(initial)}",
        )


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML
    silently keeps the last, which hides a mistake)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if (key_node.tag, key_node.value) in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add((key_node.tag, key_node.value))
        return super().construct_mapping(node, deep=deep)


def _read_file(path: str | None, environ: Mapping[str, str]) -> tuple[str | None, Any]:
    """Find and parse the config file: (absolute path, YAML data) or (None, None)."""
    if path is not None:
        origin: str | None = "--config"
    elif environ.get(CONFIG_ENV):
        path, origin = environ[CONFIG_ENV], CONFIG_ENV
    else:
        path, origin = next((p for p in SEARCH_PATHS if os.path.exists(p)), None), None
        if path is None:
            return None, None
    path = os.path.abspath(path)
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except FileNotFoundError:
        raise ConfigError(f"config: {path} ({origin}): no such file") from None
    except OSError as err:
        raise ConfigError(f"config: {path}: cannot read: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config: {path}: not UTF-8 text") from None
    try:
        return path, yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = err.problem or err.context or "invalid YAML"
        message = f"config: {path}: YAML syntax error{where}: {_one_line(problem)}"
        raise ConfigError(message) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config: {path}: YAML error: {_one_line(str(err))}") from None


def _file_entries(path: str, data: object) -> list[tuple[str, Any, str]]:
    if data is None:  # an empty file
        return []
    if not isinstance(data, dict):
        raise ConfigError(
            f"config: {path}: expected a mapping of sections ({', '.join(_SECTIONS)}),"
            f" got {type(data).__name__}"
        )
    entries = []
    for section, body in data.items():
        if section not in _SECTIONS:
            raise ConfigError(
                f"config: {path}: unknown section {section}{suggest(str(section), _SECTIONS)}"
            )
        if body is None:  # "metrics:" with nothing under it
            continue
        if not isinstance(body, dict):
            raise ConfigError(
                f"config: {path}: section {section} must be a mapping of keys,"
                f" got {type(body).__name__}"
            )
        for name, raw in body.items():
            key = f"{section}.{name}"
            if key not in _SETTINGS:
                raise ConfigError(f"config: {path}: unknown key {key}{suggest(key, _SETTINGS)}")
            entries.append((key, raw, path))
    return entries


# The variables Kubernetes injects into every pod for a Service named
# smtp-dup (docker-link style: SMTP_DUP_PORT=tcp://10.0.0.1:2525, and
# SMTP_DUP_SERVICE_HOST/_PORT[_<port name>]). They are not settings; only
# these exact shapes, with values of the kind Kubernetes writes, are let by.
_SERVICE_LINK = re.compile(
    r"SMTP_DUP_(?:"
    r"(?P<host>SERVICE_HOST)"
    r"|(?P<service_port>SERVICE_PORT(?:_[A-Z0-9_]+)?)"
    r"|(?P<url>PORT(?:_[0-9]{1,5}_(?:TCP|UDP|SCTP))?)"
    r"|PORT_[0-9]{1,5}_(?:TCP|UDP|SCTP)_(?:(?P<proto>PROTO)|(?P<port>PORT)|(?P<addr>ADDR))"
    r")\Z"
)
_SERVICE_LINK_URL = re.compile(r"(?:tcp|udp|sctp)://(?:\[[0-9A-Fa-f:.]+\]|[0-9.]+):[0-9]{1,5}\Z")


def _is_service_link(name: str, value: str) -> bool:
    """Whether ``name=value`` is one of Kubernetes' service-link variables."""
    match = _SERVICE_LINK.match(name)
    if match is None:
        return False
    kind = match.lastgroup
    if kind in ("host", "addr"):
        try:
            ipaddress.ip_address(value)
        except ValueError:
            return False
        return True
    if kind in ("service_port", "port"):
        return value.isascii() and value.isdigit()
    if kind == "proto":
        return value in ("tcp", "udp", "sctp")
    return _SERVICE_LINK_URL.match(value) is not None


def _env_entries(environ: Mapping[str, str]) -> list[tuple[str, Any, str]]:
    known = {setting.env: setting for setting in KEYS}
    for name in sorted(environ):
        if (
            name.startswith(ENV_PREFIX)
            and name != CONFIG_ENV
            and name not in known
            and not _is_service_link(name, environ[name])
        ):
            raise ConfigError(
                f"config: unknown environment variable {name}{suggest(name, [*known, CONFIG_ENV])}"
            )
    return [(s.key, environ[s.env], s.env) for s in KEYS if s.env in environ]


# --------------------------------------------------------------------------
# Showing values: errors, `smtpdup check`, config.example.yaml


def _mask(value: object, depth: int = 0) -> object:
    """``value`` with anything that could be a user or password hidden: in
    text, everything between the scheme and the last '@' (bounded depth: YAML
    aliases can make a structure that contains itself)."""
    if isinstance(value, str):
        head, at, tail = value.rpartition("@")
        if not at:
            return value
        scheme = SCHEME.match(head)
        return (scheme[0] if scheme else "") + "***@" + tail
    if depth > 8:
        return "..."
    if isinstance(value, (list, tuple)):
        return [_mask(item, depth + 1) for item in value]
    if isinstance(value, dict):
        return {_mask(k, depth + 1): _mask(v, depth + 1) for k, v in value.items()}
    return value


def _show(value: object) -> str:
    text = _one_line(repr(_mask(value)))
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _render(value: object) -> str:
    """A parsed value as `smtpdup check` shows it; passwords masked."""
    if value is None or value == "" or value == ():
        return "(empty)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format_number(value)
    if isinstance(value, Destination):
        return value.masked()
    if isinstance(value, tuple):
        return ", ".join(_render(item) for item in value)
    return str(value)


def describe(config: Config) -> list[str]:
    """The effective configuration, one line per key, e.g.
    ``relay.timeout_seconds = 10  (default)``; passwords are masked."""
    rows = [
        (s.key, _render(getattr(getattr(config, s.section), s.name)), config.sources[s.key])
        for s in KEYS
    ]
    key_width = max(len(key) for key, _, _ in rows)
    value_width = min(max(len(value) for _, value, _ in rows), 30)
    return [
        f"{key:<{key_width}} = {value:<{value_width}}  ({source})" for key, value, source in rows
    ]


def _iter_example() -> Iterator[str]:
    yield "# smtpdup configuration: every key with its default."
    yield "# Generated by smtpdup.config.example_yaml(); do not edit by hand."
    yield "#"
    yield "# Precedence: built-in defaults < this file < environment. Every key has an"
    yield "# environment variable SMTP_DUP_<SECTION>_<KEY>, e.g. SMTP_DUP_RELAY_TIMEOUT_SECONDS;"
    yield "# lists there are comma-separated, and an empty value is an empty list."
    yield "#"
    yield "# A destination is host:port, [v6addr]:port, smtp://[user:password@]host[:port]"
    yield "# [?starttls=off|may|require] (port 25, starttls may) or smtps://[user:password@]"
    yield "# host[:port] (port 465). A backup may also be a mapping:"
    yield "#   - {address: new.example:25, domains: [a.example], sample_percent: 10}"
    for section in _SECTIONS:
        yield ""
        yield f"{section}:"
        for setting in (s for s in KEYS if s.section == section):
            value = setting.default if setting.example is None else setting.example
            required = "; required" if setting.default is None else ""
            yield f"  # {setting.doc}"
            yield f"  # {setting.type_doc}{required}; env {setting.env}"
            dumped = yaml.safe_dump({setting.name: value}, default_flow_style=False)
            yield from (f"  {line}" for line in dumped.splitlines())


def example_yaml() -> str:
    """A commented YAML document with every key, its default and one-line doc
    (the primary as an example value); it loads cleanly."""
    return "\n".join(_iter_example()) + "\n"
