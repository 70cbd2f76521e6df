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


def test_every_key_has_its_environment_variable_in_spec_form():
    for setting in KEYS:
        section, name = setting.key.split(".")
        assert setting.env == f"SMTP_DUP_{section.upper()}_{name.upper()}"


def test_example_config_is_current():
    assert (ROOT / "config.example.yaml").read_text() == example_yaml()
