"""Tests for smtpdup.config: the key table, layered loading, value types, errors."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from test_cli import address as cli_address
from test_cli import relay_variables
from test_cli import run as cli_run
from test_cli import send as cli_send
from hypothesis import strategies as st

from smtpdup import config
from smtpdup.config import (
    KEYS,
    Config,
    ConfigError,
    describe,
    example_yaml,
    load,
)
from smtpdup.destination import Destination, HostPort, parse_destination, parse_hostport

REPO = Path(__file__).resolve().parent.parent
PRIMARY = {"SMTP_DUP_RELAY_DESTINATION_PRIMARY": "primary.example:25"}
SECRET = "s3cr3t-pw"
SEARCH_PATHS = config.SEARCH_PATHS  # before the fixture below replaces them


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str], str]:
    def write(text: str, name: str = "config.yaml") -> str:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return str(path)

    return write


@pytest.fixture(autouse=True)
def no_stray_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither the real cwd nor the real /etc/smtp-dup/config.yaml is read."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(config, "SEARCH_PATHS", ("./config.yaml", str(tmp_path / "etc.yaml")))


def error(path: str | None = None, environ: dict[str, str] | None = None, **kwargs: bool) -> str:
    """The ConfigError line for this input, checked to be exactly one line."""
    with pytest.raises(ConfigError) as info:
        load(path, environ if environ is not None else {}, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith("config: ")
    return message


# --------------------------------------------------------------------------
# the key table and the frozen sections


def test_key_table_matches_section_fields() -> None:
    for section, cls in (("smtp", config.SmtpConfig), ("relay", config.RelayConfig),
                         ("metrics", config.MetricsConfig), ("log", config.LogConfig)):
        names = [f.name for f in dataclasses.fields(cls)]
        assert names == [s.name for s in KEYS if s.section == section]
    assert len({s.key for s in KEYS}) == len(KEYS)
    assert next(s for s in KEYS if s.key == "relay.timeout_seconds").env == (
        "SMTP_DUP_RELAY_TIMEOUT_SECONDS"
    )


def test_defaults(tmp_path: Path) -> None:
    cfg = load(None, PRIMARY)
    assert cfg.path is None
    assert cfg.smtp.listen == HostPort("127.0.0.1", 2525)
    assert cfg.smtp.domain == "localhost"
    assert cfg.smtp.max_message_bytes == 26214400
    assert cfg.smtp.max_recipients == 1000
    assert cfg.smtp.max_connections == 5000
    assert cfg.smtp.idle_timeout_seconds == 300.0
    assert [str(n) for n in cfg.smtp.allowed_networks] == [
        "127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7",
    ]
    assert cfg.smtp.bare_newline == "normalize"
    assert (cfg.smtp.tls_cert_file, cfg.smtp.tls_key_file) == ("", "")
    assert cfg.smtp.require_tls is False and cfg.smtp.received_header is True
    assert cfg.smtp.shutdown_grace_seconds == 30.0
    assert cfg.smtp.workers == 1
    assert cfg.relay.destination_primary == parse_destination("primary.example:25")
    assert cfg.relay.destination_backups == ()
    assert cfg.relay.timeout_seconds == 10.0
    assert cfg.relay.backup_concurrency == 32
    assert cfg.relay.tls_ca_file == ""
    assert cfg.relay.spool_dir == "spool"
    assert cfg.relay.retry_initial_seconds == 60.0
    assert cfg.relay.retry_max_interval_seconds == 3600.0
    assert cfg.relay.retry_max_age_seconds == 432000.0
    assert cfg.metrics.listen == HostPort("127.0.0.1", 9925)
    assert (cfg.log.level, cfg.log.format) == ("info", "json")
    assert cfg.sources["relay.timeout_seconds"] == "default"
    assert cfg.sources["relay.destination_primary"] == "SMTP_DUP_RELAY_DESTINATION_PRIMARY"


def test_config_is_frozen() -> None:
    cfg = load(None, PRIMARY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.relay.timeout_seconds = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.sources["relay.timeout_seconds"] = "x"  # type: ignore[index]


# --------------------------------------------------------------------------
# layers and sources


def test_file_overrides_default_and_env_overrides_file(write: Callable[..., str]) -> None:
    path = write(
        "smtp:\n  listen: '[::1]:2626'\n  require_tls: no\n"
        "relay:\n  destination_primary: primary.example:25\n  timeout_seconds: 5\n"
        "  backup_concurrency: 4\n"
        "log:\n  level: DEBUG\n"
    )
    cfg = load(path, {"SMTP_DUP_RELAY_TIMEOUT_SECONDS": "2.5", "SMTP_DUP_LOG_FORMAT": "text"})
    assert cfg.path == path
    assert cfg.smtp.listen == HostPort("::1", 2626)
    assert cfg.relay.backup_concurrency == 4
    assert cfg.relay.timeout_seconds == 2.5
    assert (cfg.log.level, cfg.log.format) == ("debug", "text")
    assert cfg.sources["smtp.listen"] == path
    assert cfg.sources["relay.timeout_seconds"] == "SMTP_DUP_RELAY_TIMEOUT_SECONDS"
    assert cfg.sources["relay.retry_initial_seconds"] == "default"


def test_list_from_env() -> None:
    cfg = load(None, {
        **PRIMARY,
        "SMTP_DUP_SMTP_ALLOWED_NETWORKS": " 10.1.2.3/8 , ::/0,",
        "SMTP_DUP_RELAY_DESTINATION_BACKUPS": "new.example:25, smtps://archive.example",
    })
    assert cfg.smtp.allowed_networks == (
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::/0"),
    )
    assert [b.name for b in cfg.relay.destination_backups] == [
        "new.example:25", "smtps://archive.example:465",
    ]


def test_empty_env_clears_a_file_list(write: Callable[..., str]) -> None:
    path = write(
        "relay:\n  destination_primary: primary.example:25\n"
        "  destination_backups: [new.example:25]\n"
        "smtp:\n  allowed_networks: [10.0.0.0/8]\n"
    )
    assert len(load(path, {}).relay.destination_backups) == 1
    cleared = {"SMTP_DUP_RELAY_DESTINATION_BACKUPS": "", "SMTP_DUP_SMTP_ALLOWED_NETWORKS": ""}
    cfg = load(path, cleared)
    assert cfg.relay.destination_backups == ()
    assert cfg.smtp.allowed_networks == ()
    assert cfg.sources["relay.destination_backups"] == "SMTP_DUP_RELAY_DESTINATION_BACKUPS"


def test_env_types() -> None:
    cfg = load(None, {
        **PRIMARY,
        "SMTP_DUP_SMTP_REQUIRE_TLS": "No",
        "SMTP_DUP_SMTP_RECEIVED_HEADER": "OFF",
        "SMTP_DUP_SMTP_MAX_RECIPIENTS": " 50 ",
        "SMTP_DUP_SMTP_WORKERS": "auto",
        "SMTP_DUP_METRICS_LISTEN": "",
        "SMTP_DUP_SMTP_BARE_NEWLINE": "Reject",
    })
    assert cfg.smtp.require_tls is False and cfg.smtp.received_header is False
    assert cfg.smtp.max_recipients == 50
    assert cfg.smtp.workers == (os.cpu_count() or 1)
    assert cfg.metrics.listen is None
    assert cfg.smtp.bare_newline == "reject"
    for word in ("true", "YES", "1", "on"):
        assert load(None, {**PRIMARY, "SMTP_DUP_SMTP_RECEIVED_HEADER": word}).smtp.received_header


def test_file_from_config_env_and_discovery(
    write: Callable[..., str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write("relay:\n  destination_primary: from-env-file.example:25\n", "named.yaml")
    cfg = load(None, {"SMTP_DUP_CONFIG": path})
    assert cfg.path == path and cfg.relay.destination_primary is not None
    assert cfg.relay.destination_primary.host == "from-env-file.example"

    (tmp_path / "cwd" / "config.yaml").write_text("relay:\n  destination_primary: cwd.example:25\n")
    cfg = load(None, {})
    assert cfg.path == str(tmp_path / "cwd" / "config.yaml")
    assert cfg.sources["relay.destination_primary"] == cfg.path
    # --config wins over SMTP_DUP_CONFIG, which wins over ./config.yaml
    assert load(path, {"SMTP_DUP_CONFIG": "/nonexistent.yaml"}).path == path


def test_search_order(tmp_path: Path) -> None:
    assert load(None, PRIMARY).path is None  # no file at all is fine
    etc = tmp_path / "etc.yaml"
    etc.write_text("smtp:\n  domain: etc.example\n")
    assert load(None, PRIMARY).path == str(etc)
    (tmp_path / "cwd" / "config.yaml").write_text("smtp:\n  domain: cwd.example\n")
    assert load(None, PRIMARY).smtp.domain == "cwd.example"


def test_default_search_paths() -> None:
    assert SEARCH_PATHS == ("./config.yaml", "/etc/smtp-dup/config.yaml")


def test_partial_and_empty_files(write: Callable[..., str]) -> None:
    assert load(write(""), PRIMARY).smtp.domain == "localhost"
    assert load(write("metrics:\nlog:\n  level: error\n"), PRIMARY).log.level == "error"
    # YAML null counts as empty: a list clears, metrics are disabled
    cfg = load(write("metrics:\n  listen:\nsmtp:\n  allowed_networks:\n"), PRIMARY)
    assert cfg.metrics.listen is None and cfg.smtp.allowed_networks == ()


def test_primary_not_required_when_asked() -> None:
    cfg = load(None, {}, require_primary=False)
    assert cfg.relay.destination_primary is None
    assert any(line.startswith("relay.destination_primary ") for line in describe(cfg))


def test_every_layer_is_validated(write: Callable[..., str]) -> None:
    path = write("relay:\n  destination_primary: p.example:25\n  timeout_seconds: ten\n")
    message = error(path, {"SMTP_DUP_RELAY_TIMEOUT_SECONDS": "3"})
    assert message == f"config: relay.timeout_seconds ({path}): expected a number, got 'ten'"


# --------------------------------------------------------------------------
# errors: one line naming the key and its source


def test_missing_primary() -> None:
    assert error(None, {}) == (
        "config: relay.destination_primary is required: set it in the config file"
        " or SMTP_DUP_RELAY_DESTINATION_PRIMARY"
    )
    assert "is required" in error(None, {"SMTP_DUP_RELAY_DESTINATION_PRIMARY": " "})


def test_unknown_file_key_suggests(write: Callable[..., str]) -> None:
    path = write("smtp:\n  listn: 127.0.0.1:25\n")
    assert error(path, PRIMARY) == (
        f"config: {path}: unknown key smtp.listn; did you mean smtp.listen?"
    )
    path = write("smpt:\n  listen: 127.0.0.1:25\n")
    assert error(path, PRIMARY) == f"config: {path}: unknown section smpt; did you mean smtp?"
    path = write("smtp:\n  zzzzzz: 1\n")
    assert error(path, PRIMARY) == f"config: {path}: unknown key smtp.zzzzzz"


def test_unknown_env_var_suggests() -> None:
    message = error(None, {**PRIMARY, "SMTP_DUP_RELAY_TIMEOUT_SECOND": "5"})
    assert message == (
        "config: unknown environment variable SMTP_DUP_RELAY_TIMEOUT_SECOND;"
        " did you mean SMTP_DUP_RELAY_TIMEOUT_SECONDS?"
    )
    # other prefixes are none of our business
    assert load(None, {**PRIMARY, "SMTP_DUPLICATE": "x", "HOME": "/root"})


# What Kubernetes puts into a pod's environment for a Service named smtp-dup
# with a port named "smtp" (2525) and one named "metrics" (9925).
SERVICE_LINKS = {
    "SMTP_DUP_SERVICE_HOST": "10.96.12.34",
    "SMTP_DUP_SERVICE_PORT": "2525",
    "SMTP_DUP_SERVICE_PORT_SMTP": "2525",
    "SMTP_DUP_SERVICE_PORT_METRICS": "9925",
    "SMTP_DUP_PORT": "tcp://10.96.12.34:2525",
    "SMTP_DUP_PORT_2525_TCP": "tcp://10.96.12.34:2525",
    "SMTP_DUP_PORT_2525_TCP_PROTO": "tcp",
    "SMTP_DUP_PORT_2525_TCP_PORT": "2525",
    "SMTP_DUP_PORT_2525_TCP_ADDR": "10.96.12.34",
    "SMTP_DUP_PORT_9925_TCP": "tcp://10.96.12.34:9925",
    "SMTP_DUP_PORT_9925_TCP_PROTO": "tcp",
    "SMTP_DUP_PORT_9925_TCP_PORT": "9925",
    "SMTP_DUP_PORT_9925_TCP_ADDR": "10.96.12.34",
}


def test_kubernetes_service_links_are_ignored() -> None:
    loaded = load(None, {**PRIMARY, **SERVICE_LINKS})
    assert loaded == load(None, PRIMARY)
    # IPv6 cluster addresses and other protocols take the same shapes.
    assert load(None, {**PRIMARY, "SMTP_DUP_SERVICE_HOST": "fd00:10:96::1",
                       "SMTP_DUP_PORT": "tcp://[fd00:10:96::1]:2525",
                       "SMTP_DUP_PORT_53_UDP": "udp://[fd00:10:96::1]:53",
                       "SMTP_DUP_PORT_53_UDP_ADDR": "fd00:10:96::1",
                       "SMTP_DUP_PORT_36412_SCTP_PROTO": "sctp"}) == loaded


@pytest.mark.parametrize(
    ("variable", "value", "suggestion"),
    [
        # A typo stays an error, service links or not.
        ("SMTP_DUP_RELAY_TIMEOUT_SECOND", "5", "SMTP_DUP_RELAY_TIMEOUT_SECONDS"),
        # Close to a service link, but not its shape...
        ("SMTP_DUP_SERVICE_HOSTS", "10.96.12.34", None),
        ("SMTP_DUP_PORTS", "tcp://10.96.12.34:2525", None),
        ("SMTP_DUP_PORT_2525", "tcp://10.96.12.34:2525", None),
        ("SMTP_DUP_PORT_2525_HTTP", "tcp://10.96.12.34:2525", None),
        ("SMTP_DUP_PORT_2525_TCP_HOST", "10.96.12.34", None),
        ("SMTP_DUP_SERVICE_PORT_", "2525", None),
        ("SMTP_DUP_SERVICE", "x", None),
        # ... or its shape with a value Kubernetes never writes: an operator's
        # guess at a setting, not a link.
        ("SMTP_DUP_PORT", "2525", None),
        ("SMTP_DUP_SERVICE_PORT", "smtp", None),
        ("SMTP_DUP_SERVICE_HOST", "relay.example", None),
        ("SMTP_DUP_PORT_2525_TCP", "10.96.12.34:2525", None),
        ("SMTP_DUP_PORT_2525_TCP_PROTO", "TCP", None),
        ("SMTP_DUP_PORT_2525_TCP_ADDR", "smtp-dup", None),
    ],
)
def test_other_unknown_variables_are_still_errors(variable: str, value: str, suggestion: str | None) -> None:
    message = error(None, {**PRIMARY, **SERVICE_LINKS, variable: value})
    assert message.startswith(f"config: unknown environment variable {variable}")
    if suggestion:
        assert message.endswith(f"; did you mean {suggestion}?")


def test_relay_process_starts_and_relays_with_service_links(tmp_path: Path, upstreams, background) -> None:
    """`python -m smtpdup` in a pod's environment: it starts and relays; a
    mistyped name in that same environment still stops it with exit 2."""
    primary = upstreams("primary")
    variables = relay_variables(tmp_path, SMTP_DUP_RELAY_DESTINATION_PRIMARY=primary.address, **SERVICE_LINKS)
    relay = background([], **variables)
    relay.wait_for_event("started")
    assert cli_send(cli_address(variables), "in a pod") == {}
    [stored] = primary.wait_for(1)
    assert stored.body_without_trace == b"Subject: in a pod\r\n\r\nbody of in a pod\r\n"
    relay.signal(signal.SIGTERM)
    assert relay.wait() == 0
    assert "unknown environment variable" not in relay.log()

    variables["SMTP_DUP_RELAY_TIMEOUT_SECOND"] = "5"
    result = cli_run([], tmp_path, **variables)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(
        "unknown environment variable SMTP_DUP_RELAY_TIMEOUT_SECOND; did you mean SMTP_DUP_RELAY_TIMEOUT_SECONDS?"
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("SMTP_DUP_RELAY_TIMEOUT_SECONDS", "ten", "expected a number, got 'ten'"),
        ("SMTP_DUP_RELAY_TIMEOUT_SECONDS", "0", "must be greater than 0, got '0'"),
        ("SMTP_DUP_RELAY_TIMEOUT_SECONDS", "nan", "expected a number, got 'nan'"),
        ("SMTP_DUP_SMTP_SHUTDOWN_GRACE_SECONDS", "-1", "must not be negative, got '-1'"),
        ("SMTP_DUP_SMTP_MAX_RECIPIENTS", "1.5", "expected a whole number, got '1.5'"),
        ("SMTP_DUP_SMTP_MAX_MESSAGE_BYTES", "0", "must be at least 1, got '0'"),
        ("SMTP_DUP_RELAY_BACKUP_CONCURRENCY", "0", "must be at least 1, got '0'"),
        ("SMTP_DUP_SMTP_WORKERS", "many", "expected a whole number or auto, got 'many'"),
        ("SMTP_DUP_SMTP_REQUIRE_TLS", "maybe", "expected true or false, got 'maybe'"),
        ("SMTP_DUP_SMTP_BARE_NEWLINE", "fix", "expected one of normalize, reject, got 'fix'"),
        ("SMTP_DUP_LOG_LEVEL", "verbose",
         "expected one of debug, info, warning, error, got 'verbose'"),
        ("SMTP_DUP_SMTP_LISTEN", "localhost", "expected host:port: missing port, got 'localhost'"),
        ("SMTP_DUP_SMTP_LISTEN", "::1:25",
         "expected host:port: an IPv6 address needs brackets, e.g. [::1]:25, got '::1:25'"),
        ("SMTP_DUP_METRICS_LISTEN", "h:70000",
         "expected host:port: bad port '70000' (expected 0..65535), got 'h:70000'"),
        ("SMTP_DUP_SMTP_ALLOWED_NETWORKS", "10.0.0.0/8,10.0.0.0/33",
         "expected a CIDR network such as 10.0.0.0/8, got '10.0.0.0/33'"),
        ("SMTP_DUP_SMTP_DOMAIN", "", "must not be empty, got ''"),
        ("SMTP_DUP_RELAY_DESTINATION_BACKUPS", "a.example:25,a.example:25?starttls=may",
         "destination a.example:25 listed twice, got 'a.example:25?starttls=may'"),
    ],
)
def test_env_value_errors(variable: str, value: str, problem: str) -> None:
    key = next(s.key for s in KEYS if s.env == variable)
    assert error(None, {**PRIMARY, variable: value}) == f"config: {key} ({variable}): {problem}"


@pytest.mark.parametrize(
    ("yaml_text", "key", "problem"),
    [
        ("smtp:\n  max_connections: true\n", "smtp.max_connections",
         "expected a whole number, got True"),
        ("smtp:\n  max_connections: 2.5\n", "smtp.max_connections",
         "expected a whole number, got 2.5"),
        ("smtp:\n  require_tls: 2\n", "smtp.require_tls", "expected true or false, got 2"),
        ("smtp:\n  domain: [a]\n", "smtp.domain", "expected a string, got ['a']"),
        ("smtp:\n  idle_timeout_seconds: .inf\n", "smtp.idle_timeout_seconds",
         "expected a number, got inf"),
        ("smtp:\n  allowed_networks: {a: 1}\n", "smtp.allowed_networks",
         "expected a list, got {'a': 1}"),
        ("smtp:\n  allowed_networks: [10]\n", "smtp.allowed_networks",
         "expected a CIDR network such as 10.0.0.0/8, got 10"),
        ("log:\n  format: xml\n", "log.format", "expected one of json, text, got 'xml'"),
        ("smtp:\n  listen: null\n", "smtp.listen", "expected host:port, got None"),
        ("smtp:\n  listen: 2525\n", "smtp.listen", "expected host:port, got 2525"),
    ],
)
def test_file_value_errors(
    write: Callable[..., str], yaml_text: str, key: str, problem: str
) -> None:
    path = write(yaml_text)
    assert error(path, PRIMARY) == f"config: {key} ({path}): {problem}"


def test_file_structure_errors(write: Callable[..., str]) -> None:
    path = write("- smtp\n")
    assert error(path, PRIMARY) == (
        f"config: {path}: expected a mapping of sections (smtp, relay, metrics, log), got list"
    )
    path = write("smtp: 5\n")
    assert error(path, PRIMARY) == (
        f"config: {path}: section smtp must be a mapping of keys, got int"
    )


def test_yaml_syntax_error_names_file_line_and_column(write: Callable[..., str]) -> None:
    path = write("smtp:\n  listen: 127.0.0.1:2525\n  domain: [unclosed\n")
    message = error(path, PRIMARY)
    assert message.startswith(f"config: {path}: YAML syntax error at line ")
    assert ", column " in message
    path = write("smtp:\n  domain: a\n  domain: b\n")
    assert error(path, PRIMARY) == (
        f"config: {path}: YAML syntax error at line 3, column 3: duplicate key 'domain'"
    )


def test_missing_explicit_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    assert error(missing, PRIMARY) == f"config: {missing} (--config): no such file"
    assert error(None, {"SMTP_DUP_CONFIG": missing}) == (
        f"config: {missing} (SMTP_DUP_CONFIG): no such file"
    )


def test_unreadable_file(tmp_path: Path) -> None:
    assert error(str(tmp_path), PRIMARY).startswith(f"config: {tmp_path}: cannot read: ")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"smtp:\n  domain: caf\xe9\n")
    assert error(str(bad), PRIMARY) == f"config: {bad}: not UTF-8 text"


def test_cross_checks(write: Callable[..., str]) -> None:
    env = {**PRIMARY, "SMTP_DUP_SMTP_TLS_CERT_FILE": "/c.pem"}
    assert error(None, env) == (
        "config: smtp.tls_cert_file (SMTP_DUP_SMTP_TLS_CERT_FILE): set without smtp.tls_key_file;"
        " STARTTLS needs both"
    )
    path = write("smtp:\n  tls_key_file: /k.pem\n")
    assert error(path, PRIMARY) == (
        f"config: smtp.tls_key_file ({path}): set without smtp.tls_cert_file; STARTTLS needs both"
    )
    assert error(None, {**PRIMARY, "SMTP_DUP_SMTP_REQUIRE_TLS": "yes"}) == (
        "config: smtp.require_tls (SMTP_DUP_SMTP_REQUIRE_TLS): needs smtp.tls_cert_file"
        " and smtp.tls_key_file to offer STARTTLS"
    )
    assert error(None, {**PRIMARY, "SMTP_DUP_RELAY_RETRY_INITIAL_SECONDS": "7200"}) == (
        "config: relay.retry_initial_seconds (SMTP_DUP_RELAY_RETRY_INITIAL_SECONDS): must not"
        " exceed relay.retry_max_interval_seconds (3600), got 7200"
    )
    env |= {"SMTP_DUP_SMTP_TLS_KEY_FILE": "/k.pem", "SMTP_DUP_SMTP_REQUIRE_TLS": "1"}
    cfg = load(None, env)
    assert cfg.smtp.require_tls and cfg.smtp.tls_key_file == "/k.pem"


# --------------------------------------------------------------------------
# destinations


def smtp(host: str, port: int = 25, starttls: str = "may", **kwargs: object) -> Destination:
    return Destination("smtp", host, port, starttls, None, None, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected", "name"),
    [
        ("mx.example:25", smtp("mx.example"), "mx.example:25"),
        ("MX.Example:2525", smtp("mx.example", 2525), "mx.example:2525"),
        ("[2001:db8::1]:25", smtp("2001:db8::1"), "[2001:db8::1]:25"),
        ("smtp://mx.example", smtp("mx.example"), "mx.example:25"),
        ("smtp://mx.example:587/?starttls=require", smtp("mx.example", 587, "require"),
         "smtp://mx.example:587?starttls=require"),
        ("SMTP://[::1]?starttls=off", smtp("::1", 25, "off"), "smtp://[::1]:25?starttls=off"),
        ("smtps://mx.example", Destination("smtps", "mx.example", 465, "off", None, None),
         "smtps://mx.example:465"),
        ("smtps://[::1]:4650", Destination("smtps", "::1", 4650, "off", None, None),
         "smtps://[::1]:4650"),
        ("smtp://u%40corp:p%3Aw@mx.example?starttls=require",
         Destination("smtp", "mx.example", 25, "require", "u@corp", "p:w"),
         "smtp://u%40corp@mx.example:25?starttls=require"),
        ("smtps://user:p@ss/w?rd@mx.example",
         Destination("smtps", "mx.example", 465, "off", "user", "p@ss/w?rd"),
         "smtps://user@mx.example:465"),
        ("smtp://new.example:25?domains=A.example+b.example.&sample_percent=10",
         smtp("new.example", domains=("a.example", "b.example"), sample_percent=10.0),
         "new.example:25"),
        ("new.example:25?domains=a.example;b.example%20c.example",
         smtp("new.example", domains=("a.example", "b.example", "c.example")), "new.example:25"),
        ("new.example:25?sample_percent=0", smtp("new.example", sample_percent=0.0),
         "new.example:25"),
    ],
)
def test_destination_forms(text: str, expected: Destination, name: str) -> None:
    destination = parse_destination(text)
    assert destination == expected
    assert destination.name == name
    reparsed = parse_destination(destination.masked())
    assert reparsed == dataclasses.replace(
        destination, password=None if destination.password is None else "***"
    )


def test_destination_mapping_form() -> None:
    destination = parse_destination(
        {"address": "smtp://u:pw@new.example", "domains": ["A.example"], "sample_percent": 12.5}
    )
    assert destination.domains == ("a.example",) and destination.sample_percent == 12.5
    assert destination.masked() == (
        "smtp://u:***@new.example:25?domains=a.example&sample_percent=12.5"
    )
    text_domains = {"address": "new.example:25", "domains": "a.example, b.example"}
    assert parse_destination(text_domains).domains == ("a.example", "b.example")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty destination"),
        ("mx.example", "missing port"),
        (":25", "missing host"),
        ("mx.example:0", "bad port '0' (expected 1..65535)"),
        ("mx.example:65536", "bad port '65536' (expected 1..65535)"),
        ("mx.example:2x", "bad port '2x' (expected 1..65535)"),
        ("smtp://mx.example:99999", "bad port '99999' (expected 1..65535)"),
        ("smtp://", "missing host"),
        ("smtp://:pw@mx.example", "expected user:password before '@'"),
        ("smtp://user@mx.example", "expected user:password before '@'"),
        ("http://mx.example", "unsupported scheme 'http' (expected smtp or smtps)"),
        ("u:pw@mx.example:25", "a user and password need the smtp://user:password@host form"),
        ("::1:25", "an IPv6 address needs brackets, e.g. [::1]:25"),
        ("[::1", "missing ']' after the IPv6 address"),
        ("[nope]:25", "bad IPv6 address 'nope'"),
        ("[::1]x", "expected ':port' after ']'"),
        ("bad host:25", "bad host name 'bad host'"),
        ("smtp://mx.example/path", "unexpected path after the host"),
        ("smtp://mx.example?starttls=always", "starttls must be one of off, may, require"),
        ("smtps://mx.example?starttls=require",
         "starttls does not apply to smtps:// (TLS is implicit)"),
        ("mx.example:25?foo=1",
         "unknown parameter 'foo' (expected starttls, domains, sample_percent)"),
        ("mx.example:25?domain=a.example", "unknown parameter 'domain'; did you mean domains?"),
        ("mx.example:25?starttls", "parameter 'starttls' needs a value"),
        ("mx.example:25?starttls=may&starttls=off", "parameter 'starttls' given twice"),
        ("mx.example:25?sample_percent=101", "sample_percent must be between 0 and 100"),
        ("mx.example:25?sample_percent=-1", "sample_percent must be between 0 and 100"),
        ("mx.example:25?sample_percent=lots", "sample_percent must be a number"),
        ("mx.example:25?domains=a.example+b!c", "bad domain 'b!c'"),
        ({"domains": ["a.example"]}, "a destination mapping needs an address"),
        ({"address": "mx.example:25", "domain": ["a"]},
         "unknown key 'domain' in a destination mapping; did you mean domains?"),
        ({"address": "mx.example:25?domains=a.example", "domains": ["b.example"]},
         "domains given both in the address and the mapping"),
        ({"address": "mx.example:25", "sample_percent": True}, "sample_percent must be a number"),
        ({"address": "mx.example:25", "domains": 5}, "domains must be a list of domain names"),
        (25, "expected host:port or an smtp:// or smtps:// URL"),
    ],
)
def test_destination_errors(value: object, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_destination(value)  # type: ignore[arg-type]
    assert str(info.value) == reason


def test_destination_errors_in_load(write: Callable[..., str]) -> None:
    variable = "SMTP_DUP_RELAY_DESTINATION_PRIMARY"
    assert error(None, {variable: "mx.example:0"}) == (
        f"config: relay.destination_primary ({variable}): bad destination:"
        " bad port '0' (expected 1..65535), got 'mx.example:0'"
    )
    assert error(None, {variable: "mx.example:25?domains=a.example"}) == (
        f"config: relay.destination_primary ({variable}): domains and sample_percent apply"
        " to backups only, got 'mx.example:25?domains=a.example'"
    )
    path = write(
        "relay:\n  destination_primary: p.example:25\n"
        "  destination_backups:\n    - new.example:25\n    - {address: a.example:25, sample: 5}\n"
    )
    assert error(path, {}) == (
        f"config: relay.destination_backups ({path}): bad destination: unknown key 'sample' in a"
        " destination mapping; did you mean sample_percent?,"
        " got {'address': 'a.example:25', 'sample': 5}"
    )


def test_backups_from_file_in_every_form(write: Callable[..., str]) -> None:
    path = write(
        "relay:\n"
        "  destination_primary: smtp://relay:pw@primary.example:587?starttls=require\n"
        "  destination_backups:\n"
        "    - new.example:25\n"
        "    - smtps://archive.example\n"
        "    - address: '[2001:db8::25]:2525'\n"
        "      domains: [a.example, B.EXAMPLE]\n"
        "      sample_percent: 10\n"
    )
    cfg = load(path, {})
    assert [b.name for b in cfg.relay.destination_backups] == [
        "new.example:25", "smtps://archive.example:465", "[2001:db8::25]:2525",
    ]
    third = cfg.relay.destination_backups[2]
    assert third.domains == ("a.example", "b.example") and third.sample_percent == 10.0
    primary = cfg.relay.destination_primary
    assert primary is not None and primary.password == "pw" and primary.starttls == "require"


def test_destination_value_checks() -> None:
    with pytest.raises(ValueError):
        Destination("smtps", "mx.example", 465, "may", None, None)
    with pytest.raises(ValueError):
        Destination("smtp", "mx.example", 25, "may", "user", None)
    with pytest.raises(ValueError):
        Destination("smtp", "mx.example", 0, "may", None, None)


def test_destination_wants() -> None:
    everyone = parse_destination("new.example:25")
    assert everyone.wants("a@x.example") and everyone.wants("postmaster")
    some = parse_destination("new.example:25?domains=a.example+b.example")
    assert some.wants("user@A.Example")
    assert some.wants("user@b.example.")
    assert some.wants('"odd@local"@a.example')
    assert not some.wants("user@sub.a.example")
    assert not some.wants("user@c.example")
    assert not some.wants("postmaster")


# --------------------------------------------------------------------------
# passwords never leak


def test_passwords_masked_in_describe_and_repr(write: Callable[..., str]) -> None:
    path = write(
        "relay:\n"
        f"  destination_primary: smtp://relay:{SECRET}@primary.example?starttls=require\n"
        f"  destination_backups: ['smtps://arch:{SECRET}@archive.example', new.example:25]\n"
    )
    cfg = load(path, {})
    lines = describe(cfg)
    text = "\n".join(lines)
    assert SECRET not in text and SECRET not in repr(cfg)
    assert "relay:***@primary.example" in text
    for destination in (cfg.relay.destination_primary, *cfg.relay.destination_backups):
        assert destination is not None
        assert SECRET not in destination.name and SECRET not in destination.masked()
    assert cfg.relay.destination_primary is not None
    assert cfg.relay.destination_primary.name == "smtp://relay@primary.example:25?starttls=require"


@pytest.mark.parametrize(
    "value",
    [
        f"smtp://user:{SECRET}@mx.example:99999",
        f"smtp://user:{SECRET}@mx.example?bogus=1",
        f"smtp://user:{SECRET}@",
        f"smtp://user:{SECRET}/x@mx.example/path",
        f"user:{SECRET}@mx.example:25",
        f"smtp://user:{SECRET}@mx.example,smtp://user:{SECRET}@mx.example:0",
        f"http://user:{SECRET}@mx.example",
    ],
)
def test_passwords_never_in_errors(value: str) -> None:
    for variable in ("SMTP_DUP_RELAY_DESTINATION_PRIMARY", "SMTP_DUP_RELAY_DESTINATION_BACKUPS"):
        environ = {**PRIMARY, variable: value}
        try:
            load(None, environ)
        except ConfigError as err:
            assert SECRET not in str(err)
            assert "\n" not in str(err)
        else:
            pytest.fail(f"{value!r} in {variable} loaded")


def test_password_not_in_mapping_error(write: Callable[..., str]) -> None:
    path = write(
        "relay:\n  destination_primary: p.example:25\n  destination_backups:\n"
        f"    - {{address: 'smtp://u:{SECRET}@a.example', sample_percent: 500}}\n"
    )
    assert SECRET not in error(path, {})


# --------------------------------------------------------------------------
# allowed networks


def test_allows() -> None:
    cfg = load(None, {**PRIMARY, "SMTP_DUP_SMTP_ALLOWED_NETWORKS": "10.0.0.0/8,2001:db8::/32"}).smtp
    assert cfg.allows("10.1.2.3")
    assert cfg.allows("::ffff:10.1.2.3")
    assert cfg.allows("2001:db8::5")
    assert not cfg.allows("192.168.1.1")
    assert not cfg.allows("::ffff:192.168.1.1")
    assert not cfg.allows("::1")
    assert not cfg.allows("not an address")
    defaults = load(None, PRIMARY).smtp
    assert defaults.allows("127.0.0.1") and defaults.allows("::1") and defaults.allows("fd00::1")
    assert defaults.allows("::ffff:172.20.0.1") and not defaults.allows("8.8.8.8")
    everyone = load(None, {**PRIMARY, "SMTP_DUP_SMTP_ALLOWED_NETWORKS": "0.0.0.0/0,::/0"}).smtp
    assert everyone.allows("8.8.8.8") and everyone.allows("2a00::1")


# --------------------------------------------------------------------------
# host:port


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:2525", HostPort("127.0.0.1", 2525)),
        ("[::1]:2525", HostPort("::1", 2525)),
        ("0.0.0.0:0", HostPort("0.0.0.0", 0)),
        ("mail-relay_1.example.:25", HostPort("mail-relay_1.example.", 25)),
    ],
)
def test_parse_hostport(text: str, expected: HostPort) -> None:
    assert parse_hostport(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    "text", ["", "host", "host:", ":25", "[::1]", "::1", "h:-1", "a b:25", "[::1]:99999"]
)
def test_parse_hostport_errors(text: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(text)


_labels = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_hosts = st.one_of(
    st.lists(_labels, min_size=1, max_size=4).map(".".join),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)


@given(host=_hosts, port=st.integers(0, 65535))
def test_hostport_roundtrip(host: str, port: int) -> None:
    hostport = HostPort(host, port)
    assert parse_hostport(str(hostport)) == hostport


# --------------------------------------------------------------------------
# describe and the example file


def test_describe_lines(write: Callable[..., str]) -> None:
    path = write("relay:\n  destination_primary: p.example:25\n  timeout_seconds: 2.5\n")
    cfg: Config = load(path, {"SMTP_DUP_METRICS_LISTEN": ""})
    lines = describe(cfg)
    assert len(lines) == len(KEYS)
    by_key = {line.split()[0]: line for line in lines}
    assert by_key["relay.timeout_seconds"].split() == [
        "relay.timeout_seconds", "=", "2.5", f"({path})",
    ]
    assert by_key["relay.retry_initial_seconds"].split() == [
        "relay.retry_initial_seconds", "=", "60", "(default)",
    ]
    assert by_key["smtp.require_tls"].split()[2] == "false"
    assert "10.0.0.0/8, 172.16.0.0/12" in by_key["smtp.allowed_networks"]
    assert by_key["metrics.listen"].endswith("(SMTP_DUP_METRICS_LISTEN)")
    assert len({line.index(" = ") for line in lines}) == 1  # aligned


def test_example_yaml_loads_and_shows_every_key(write: Callable[..., str]) -> None:
    text = example_yaml()
    cfg = load(write(text), {})
    assert all(source != "default" for source in cfg.sources.values())
    defaults = load(None, PRIMARY)
    for setting in KEYS:
        if setting.key != "relay.destination_primary":
            assert getattr(getattr(cfg, setting.section), setting.name) == getattr(
                getattr(defaults, setting.section), setting.name
            ), setting.key
        assert setting.env in text and setting.doc in text


def test_example_file_is_current() -> None:
    committed = (REPO / "config.example.yaml").read_text(encoding="utf-8")
    assert committed == example_yaml(), (
        "regenerate: python -c 'from smtpdup.config import example_yaml;"
        " print(example_yaml(), end=\"\")' > config.example.yaml"
    )
