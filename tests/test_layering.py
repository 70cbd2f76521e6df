"""Imports point from I/O towards pure code (STYLE §1): the sans-IO and
file-system modules never pull in gevent, sockets or smtplib."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "smtpdup"

FORBIDDEN = {
    "reply": {"gevent", "socket", "smtplib", "ssl", "logging"},
    "protocol": {"gevent", "socket", "smtplib", "ssl", "logging", "time"},
    "policy": {"gevent", "socket", "smtplib", "ssl", "logging", "time"},
    "spool": {"gevent", "socket", "smtplib", "ssl"},
    "config": {"gevent", "socket", "smtplib", "ssl"},
    "destination": {"gevent", "socket", "smtplib", "ssl", "logging", "yaml"},
    "report": {"gevent", "socket", "smtplib", "ssl"},
    "upstream": {"gevent"},
    "transfer": {"gevent", "logging"},
}
# What of the package these modules may import.
ALLOWED_LOCAL = {
    "reply": set(),
    "protocol": {"reply"},
    "policy": {"reply"},
    "spool": set(),
    "config": {"destination"},
    "destination": set(),
    "report": {"spool"},
    "upstream": {"destination", "reply"},  # the SMTP client knows destinations, not configuration
    "transfer": {"policy", "reply", "upstream"},
}


def imports(module: str) -> tuple[set[str], set[str]]:
    """(top-level external packages, smtpdup modules) that ``module`` imports."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    external, local = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                (local.add(name.split(".")[1]) if name.startswith("smtpdup.") else external.add(name.split(".")[0]))
        elif isinstance(node, ast.ImportFrom):
            if node.level or (node.module or "").startswith("smtpdup"):
                parts = (node.module or "").split(".")
                name = parts[-1] if node.level else (parts[1] if len(parts) > 1 else "")
                local.update([name] if name else [a.name for a in node.names])
            else:
                external.add((node.module or "").split(".")[0])
    return external, local


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_pure_modules_import_no_io(module):
    external, local = imports(module)
    assert not external & FORBIDDEN[module]
    if module in ALLOWED_LOCAL:
        assert local <= ALLOWED_LOCAL[module], local - ALLOWED_LOCAL[module]


def test_nothing_imports_the_wiring():
    for path in PACKAGE.glob("*.py"):
        if path.stem in {"cli", "__main__", "service", "workers"}:
            continue
        _, local = imports(path.stem)
        assert not local & {"cli", "service", "workers"}, path.name


def test_the_listener_knows_sessions_not_the_relay():
    """server.py serves any session factory (the relay's, the sink's):
    starting a sink pulls in no relay, scheduler or spool."""
    _, local = imports("server")
    assert not local & {"relay", "delivery", "spool", "service", "upstream"}, local
