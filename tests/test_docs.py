"""The README's configuration table is the key table's, word for word."""

from pathlib import Path

from smtpdup.config import KEYS, example_yaml

ROOT = Path(__file__).resolve().parent.parent


def _default(setting) -> str:
    value = setting.default
    if value is None:
        return "**required**"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (list, tuple)):
        return ", ".join(value) if value else "empty"
    if value == "":
        return "empty"
    return f"`{value}`"


def table_row(setting) -> str:
    escape = lambda text: text.replace("|", "\\|")  # noqa: E731
    return f"| `{setting.key}` | {escape(setting.type_doc)} | {_default(setting)} | {escape(setting.doc)} |"


def test_readme_configuration_table_matches_the_key_table():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `") and "." in line.split("`")[1]
            and line.split("`")[1].split(".")[0] in {"smtp", "relay", "metrics", "log"}]
    assert rows == [table_row(s) for s in KEYS]


# SPEC: `SMTP_DUP_` + section + `_` + key, upper case; written out, so that
# a change to a name (or to how names are made) shows here.
ENVIRONMENT_VARIABLES = {
    "smtp.listen": "SMTP_DUP_SMTP_LISTEN",
    "smtp.domain": "SMTP_DUP_SMTP_DOMAIN",
    "smtp.max_message_bytes": "SMTP_DUP_SMTP_MAX_MESSAGE_BYTES",
    "smtp.max_recipients": "SMTP_DUP_SMTP_MAX_RECIPIENTS",
    "smtp.max_connections": "SMTP_DUP_SMTP_MAX_CONNECTIONS",
    "smtp.idle_timeout_seconds": "SMTP_DUP_SMTP_IDLE_TIMEOUT_SECONDS",
    "smtp.allowed_networks": "SMTP_DUP_SMTP_ALLOWED_NETWORKS",
    "smtp.bare_newline": "SMTP_DUP_SMTP_BARE_NEWLINE",
    "smtp.tls_cert_file": "SMTP_DUP_SMTP_TLS_CERT_FILE",
    "smtp.tls_key_file": "SMTP_DUP_SMTP_TLS_KEY_FILE",
    "smtp.require_tls": "SMTP_DUP_SMTP_REQUIRE_TLS",
    "smtp.received_header": "SMTP_DUP_SMTP_RECEIVED_HEADER",
    "smtp.shutdown_grace_seconds": "SMTP_DUP_SMTP_SHUTDOWN_GRACE_SECONDS",
    "smtp.workers": "SMTP_DUP_SMTP_WORKERS",
    "relay.destination_primary": "SMTP_DUP_RELAY_DESTINATION_PRIMARY",
    "relay.destination_backups": "SMTP_DUP_RELAY_DESTINATION_BACKUPS",
    "relay.timeout_seconds": "SMTP_DUP_RELAY_TIMEOUT_SECONDS",
    "relay.backup_concurrency": "SMTP_DUP_RELAY_BACKUP_CONCURRENCY",
    "relay.tls_ca_file": "SMTP_DUP_RELAY_TLS_CA_FILE",
    "relay.spool_dir": "SMTP_DUP_RELAY_SPOOL_DIR",
    "relay.retry_initial_seconds": "SMTP_DUP_RELAY_RETRY_INITIAL_SECONDS",
    "relay.retry_max_interval_seconds": "SMTP_DUP_RELAY_RETRY_MAX_INTERVAL_SECONDS",
    "relay.retry_max_age_seconds": "SMTP_DUP_RELAY_RETRY_MAX_AGE_SECONDS",
    "metrics.listen": "SMTP_DUP_METRICS_LISTEN",
    "log.level": "SMTP_DUP_LOG_LEVEL",
    "log.format": "SMTP_DUP_LOG_FORMAT",
}


def test_every_key_has_its_environment_variable_in_spec_form():
    assert {setting.key: setting.env for setting in KEYS} == ENVIRONMENT_VARIABLES


def test_example_config_is_current():
    assert (ROOT / "config.example.yaml").read_text() == example_yaml()
