"""Where mail goes: the ``Destination`` and ``HostPort`` value types and
their parsers (SPEC §1: ``host:port``, ``[v6addr]:port``,
``smtp://[user:password@]host[:port][?starttls=...]``, ``smtps://...``).

The SMTP client (upstream.py) and the relay take these values; config.py
parses its keys with them. Pure: stdlib only, no I/O. The parsers raise
ValueError with a short reason that never contains a password; config.py
turns it into a ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote, unquote, unquote_plus

__all__ = [
    "SCHEME",
    "STARTTLS_MODES",
    "Destination",
    "HostPort",
    "format_number",
    "parse_destination",
    "parse_hostport",
    "suggest",
    "to_float",
]

STARTTLS_MODES: Final = ("off", "may", "require")
_DEFAULT_PORTS: Final = {"smtp": 25, "smtps": 465}
_QUERY_PARAMETERS: Final = ("starttls", "domains", "sample_percent")
_MAPPING_KEYS: Final = ("address", "domains", "sample_percent")

# Letters, digits, '-', '_' (container and service names) and dots; IPv4
# addresses match too. IPv6 addresses are checked by ipaddress instead.
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_.])?")
_PORT = re.compile(r"[0-9]{1,5}")
_DOMAIN_SEPARATORS = re.compile(r"[+;,\s]+")
# A URL's scheme and its "://" (config.py masks what follows it).
SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass(frozen=True, slots=True)
class HostPort:
    """A listening address. ``host`` has no brackets, even for IPv6."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_hostport(text: str) -> HostPort:
    """Parse ``host:port`` or ``[v6addr]:port``; port 0 (any free port) is
    allowed. Raises ValueError with a short reason."""
    if not isinstance(text, str):
        raise ValueError("expected host:port")
    host, port = _split_host_port(text.strip(), default_port=None, min_port=0)
    return HostPort(host, port)


def _split_host_port(text: str, *, default_port: int | None, min_port: int) -> tuple[str, int]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad IPv6 address {host!r}") from None
        if rest and not rest.startswith(":"):
            raise ValueError("expected ':port' after ']'")
        port_text: str | None = rest[1:] if rest else None
    else:
        if text.count(":") > 1:
            raise ValueError("an IPv6 address needs brackets, e.g. [::1]:25")
        host, colon, after = text.partition(":")
        port_text = after if colon else None
        if not host:
            raise ValueError("missing host")
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"bad host name {host!r}")
    if port_text is None:
        if default_port is None:
            raise ValueError("missing port")
        return host, default_port
    if not _PORT.fullmatch(port_text) or not min_port <= int(port_text) <= 65535:
        raise ValueError(f"bad port {port_text!r} (expected {min_port}..65535)")
    return host, int(port_text)


@dataclass(frozen=True, slots=True)
class Destination:
    """Where mail goes: the primary or a backup.

    ``starttls`` is ``off``, ``may`` (opportunistic, unverified) or ``require``
    (verified); ``smtps`` means implicit TLS and always has ``starttls="off"``.
    ``domains`` (lower case) limits which recipients a backup copy carries;
    ``sample_percent`` is the share of messages copied at all (the relay draws).
    The password is left out of ``repr``; ``name`` and ``masked()`` never show it.
    """

    scheme: str
    host: str
    port: int
    starttls: str
    username: str | None
    password: str | None = field(repr=False)
    domains: tuple[str, ...] = ()
    sample_percent: float = 100.0

    def __post_init__(self) -> None:
        if self.scheme not in _DEFAULT_PORTS:
            raise ValueError(f"unsupported scheme {self.scheme!r} (expected smtp or smtps)")
        if self.starttls not in STARTTLS_MODES:
            raise ValueError(f"starttls must be one of {', '.join(STARTTLS_MODES)}")
        if self.scheme == "smtps" and self.starttls != "off":
            raise ValueError("starttls does not apply to smtps:// (TLS is implicit)")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"bad port {self.port} (expected 1..65535)")
        if (self.username is None) != (self.password is None):
            raise ValueError("a user needs a password and a password needs a user")
        if not 0 <= self.sample_percent <= 100:
            raise ValueError("sample_percent must be between 0 and 100")

    @property
    def name(self) -> str:
        """Stable identifier without password, for spool files, logs and
        metrics: ``host:port`` for plain smtp with opportunistic STARTTLS,
        else e.g. ``smtps://host:465`` or ``smtp://user@host:25?starttls=require``."""
        return self._format(secret=None, options=False)

    def masked(self) -> str:
        """The full form with the password as ``***``, for ``smtpdup check``;
        it parses back to this destination (but for the password)."""
        return self._format(secret="***", options=True)

    def wants(self, recipient: str) -> bool:
        """Whether a copy for this destination carries ``recipient``: every
        recipient when ``domains`` is empty, else those whose domain (exactly,
        case-insensitively) is listed."""
        if not self.domains:
            return True
        _, at, domain = recipient.rpartition("@")
        return bool(at) and domain.lower().rstrip(".") in self.domains

    def _format(self, *, secret: str | None, options: bool) -> str:
        hostport = str(HostPort(self.host, self.port))
        query = []
        if self.scheme == "smtp" and self.starttls != "may":
            query.append(f"starttls={self.starttls}")
        if options and self.domains:
            query.append("domains=" + "+".join(self.domains))
        if options and self.sample_percent != 100:
            query.append(f"sample_percent={format_number(self.sample_percent)}")
        if self.scheme == "smtp" and self.username is None and self.starttls == "may":
            base = hostport  # the plain form
        else:
            userinfo = ""
            if self.username is not None:
                userinfo = quote(self.username, safe="") + (f":{secret}" if secret else "") + "@"
            base = f"{self.scheme}://{userinfo}{hostport}"
        return base + ("?" + "&".join(query) if query else "")


def parse_destination(value: str | Mapping[str, Any]) -> Destination:
    """Parse a destination (SPEC §1): ``host:port``, ``[v6addr]:port``,
    ``smtp://[user:password@]host[:port][?starttls=off|may|require]`` or
    ``smtps://[user:password@]host[:port]``; a string may also carry
    ``domains=a.example+b.example`` and ``sample_percent=N`` as query
    parameters, and a mapping is ``{address, domains, sample_percent}``.
    Userinfo is percent-decoded; the password may contain any character
    (the host starts after the last '@'). Raises ValueError with a short
    reason that never contains the userinfo."""
    if isinstance(value, Mapping):
        return _destination_from_mapping(value)
    if not isinstance(value, str):
        raise ValueError("expected host:port or an smtp:// or smtps:// URL")
    text = value.strip()
    if not text:
        raise ValueError("empty destination")
    scheme_match = SCHEME.match(text)
    username = password = None
    if scheme_match:
        scheme = scheme_match[1].lower()
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(f"unsupported scheme {scheme!r} (expected smtp or smtps)")
        userinfo, at, rest = text[scheme_match.end() :].rpartition("@")
        if at:
            user, colon, secret = userinfo.partition(":")
            if not (user and colon and secret):
                raise ValueError("expected user:password before '@'")
            username, password = unquote(user), unquote(secret)
        hostport, _, query = rest.partition("?")
        hostport = hostport.removesuffix("/")
        if "/" in hostport or "#" in hostport:
            raise ValueError("unexpected path after the host")
        default_port: int | None = _DEFAULT_PORTS[scheme]
    else:
        if "@" in text:
            raise ValueError("a user and password need the smtp://user:password@host form")
        scheme, default_port = "smtp", None
        hostport, _, query = text.partition("?")
    host, port = _split_host_port(hostport, default_port=default_port, min_port=1)
    options = _parse_query(query)
    starttls = options.get("starttls", "off" if scheme == "smtps" else "may").lower()
    if scheme == "smtps" and "starttls" in options:
        raise ValueError("starttls does not apply to smtps:// (TLS is implicit)")
    if starttls not in STARTTLS_MODES:
        raise ValueError(f"starttls must be one of {', '.join(STARTTLS_MODES)}")
    return Destination(
        scheme=scheme,
        host=host.lower(),
        port=port,
        starttls=starttls,
        username=username,
        password=password,
        domains=_parse_domains(options.get("domains", ())),
        sample_percent=_parse_percent(options.get("sample_percent", 100.0)),
    )


def _parse_query(query: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        name, equals, raw = item.partition("=")
        name = unquote_plus(name)
        if name not in _QUERY_PARAMETERS:
            expected = f" (expected {', '.join(_QUERY_PARAMETERS)})"
            hint = suggest(name, _QUERY_PARAMETERS) or expected
            raise ValueError(f"unknown parameter {name!r}{hint}")
        if name in options:
            raise ValueError(f"parameter {name!r} given twice")
        if not equals:
            raise ValueError(f"parameter {name!r} needs a value")
        options[name] = unquote_plus(raw)
    return options


def _destination_from_mapping(value: Mapping[str, Any]) -> Destination:
    for key in value:
        if key not in _MAPPING_KEYS:
            raise ValueError(
                f"unknown key {key!r} in a destination mapping{suggest(str(key), _MAPPING_KEYS)}"
            )
    if "address" not in value:
        raise ValueError("a destination mapping needs an address")
    if isinstance(value["address"], Mapping):
        raise ValueError("address must be a string")
    destination = parse_destination(value["address"])
    if "domains" in value:
        if destination.domains:
            raise ValueError("domains given both in the address and the mapping")
        destination = dataclasses.replace(destination, domains=_parse_domains(value["domains"]))
    if "sample_percent" in value:
        if destination.sample_percent != 100:
            raise ValueError("sample_percent given both in the address and the mapping")
        percent = _parse_percent(value["sample_percent"])
        destination = dataclasses.replace(destination, sample_percent=percent)
    return destination


def _parse_domains(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        items: Iterable[object] = _DOMAIN_SEPARATORS.split(value)
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise ValueError("domains must be a list of domain names")
    domains = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError("domains must be a list of domain names")
        domain = item.strip().lower().rstrip(".")
        if domain and not _HOSTNAME.fullmatch(domain):
            raise ValueError(f"bad domain {domain!r}")
        if domain:
            domains.append(domain)
    return tuple(dict.fromkeys(domains))


def _parse_percent(value: object) -> float:
    try:
        percent = to_float(value)
    except ValueError:
        raise ValueError("sample_percent must be a number") from None
    if not 0 <= percent <= 100:
        raise ValueError("sample_percent must be between 0 and 100")
    return percent


# --------------------------------------------------------------------------
# Helpers config.py shares


def to_float(value: object) -> float:
    """A finite number from a YAML number or text. Raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("not a number")
    number = float(value)  # ValueError for text that is no number
    if not math.isfinite(number):
        raise ValueError("not finite")
    return number


def format_number(number: float) -> str:
    """``10`` for 10.0, ``0.5`` for 0.5: a number as an operator wrote it."""
    return str(int(number)) if float(number).is_integer() else repr(float(number))


def suggest(word: str, candidates: Iterable[str]) -> str:
    """``; did you mean X?`` for the closest of ``candidates``, or ""."""
    matches = difflib.get_close_matches(word, list(candidates), n=1)
    return f"; did you mean {matches[0]}?" if matches else ""
