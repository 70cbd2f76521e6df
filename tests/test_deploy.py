"""The deployment artefacts against the real thing.

* deploy/kubernetes/: valid against the Kubernetes API schemas (offline:
  kubernetes-validate ships them) and consistent with the configuration it
  mounts (ports, probes, grace period, spool volume, user).
* deploy/compose.yaml: every SMTP_DUP_* name is a real setting, ports and
  destinations line up with the sinks.
* Dockerfile: its HEALTHCHECK command, run as written with the relay's
  environment, follows a real relay (metrics on and off). There is no
  Docker engine here: the image itself is not built by the tests.
* deploy/smtpdup.service: `systemd-analyze verify` is clean; its
  ExecReload lines, run as systemd runs them, refuse a bad configuration;
  the relay speaks systemd's notify protocol on a real datagram socket.
* deploy/grafana/: every metric the dashboard queries exists in a running
  relay's /metrics (one process, and a supervisor of workers).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, START_TIMEOUT, STOP_TIMEOUT, free_port, listening, relay_environ, run_smtpdup, wait_until

from smtpdup import __version__
from smtpdup import config as config_module

DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
# The oldest Kubernetes release still widely run whose schemas we check
# against (and strictly: unknown fields are errors).
KUBERNETES_VERSION = "1.30.0"
VENV_BIN = Path(sys.executable).parent


# --- helpers ------------------------------------------------------------------


def _manifests() -> list[dict]:
    documents = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return documents


def _one(kind: str, name: str | None = None) -> dict:
    found = [d for d in _manifests() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} found"
    return found[0]


def _load_config_text(text: str, environ: dict[str, str], tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return config_module.load(str(path), environ)


def _dockerfile_instruction(name: str) -> list[str]:
    """Every ``name`` instruction of the Dockerfile, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    return [line[len(name):].strip() for line in joined.splitlines() if line.startswith(name + " ")]


def _dockerfile_env() -> dict[str, str]:
    environ = {}
    for instruction in _dockerfile_instruction("ENV"):
        for item in shlex.split(instruction):
            key, _, value = item.partition("=")
            environ[key] = value
    return environ


def _healthcheck_command() -> list[str]:
    """The HEALTHCHECK's CMD, as the Dockerfile writes it (exec form)."""
    [instruction] = _dockerfile_instruction("HEALTHCHECK")
    _, _, command = instruction.partition("CMD ")
    return json.loads(command)


@pytest.fixture
def relay_processes(smtpdup):
    """Factory: ``relay_processes(environ, wait=True)`` -> ``python -m
    smtpdup`` started (``harness.Smtpdup``), listening unless ``wait`` is
    false; stopped by PID at teardown."""

    def make(environ: dict[str, str], wait: bool = True):
        return smtpdup(environ).start(wait="listening" if wait else None)

    return make


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def _series_names(scrape: str) -> set[str]:
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in scrape.splitlines() if line and line[0] != "#"}


def _gauge(scrape: str, name: str) -> float:
    for line in scrape.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


# --- Kubernetes ---------------------------------------------------------------


def test_kubernetes_manifests_are_valid_against_the_api_schemas():
    import kubernetes_validate

    documents = _manifests()
    assert {d["kind"] for d in documents} >= {"StatefulSet", "Service", "PodDisruptionBudget", "ConfigMap"}
    for document in documents:
        # Raises ValidationError (with the path of the bad field) when invalid.
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_kubernetes_validation_rejects_a_broken_manifest():
    """The check above can fail: a misspelt field and a wrong type are caught offline."""
    import kubernetes_validate

    statefulset = _one("StatefulSet")
    broken = json.loads(json.dumps(statefulset))
    broken["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = json.loads(json.dumps(statefulset))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kubernetes_statefulset_matches_the_configuration_it_mounts(tmp_path):
    statefulset = _one("StatefulSet")
    configmap = _one("ConfigMap")
    pod = statefulset["spec"]["template"]["spec"]
    [container] = pod["containers"]

    # The configuration the pod runs: the ConfigMap's file plus the
    # container's SMTP_DUP_* variables (each a real setting: load() refuses
    # unknown names). A Secret-sourced value stands in as a placeholder.
    environ = {e["name"]: e.get("value", "placeholder.example:25") for e in container.get("env", [])}
    assert all(name.startswith("SMTP_DUP_") for name in environ)
    config = _load_config_text(configmap["data"]["config.yaml"], environ, tmp_path)

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["smtp"] == config.smtp.listen.port
    assert ports["metrics"] == config.metrics.listen.port
    assert config.smtp.listen.host == "0.0.0.0" and config.metrics.listen.host == "0.0.0.0"

    # Probes on the documented paths of the metrics listener.
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}

    # SIGTERM drains for smtp.shutdown_grace_seconds: the kubelet waits longer.
    assert pod["terminationGracePeriodSeconds"] > config.smtp.shutdown_grace_seconds

    # One spool volume per replica, mounted where relay.spool_dir points.
    claims = {c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[config.relay.spool_dir] in claims
    # The ConfigMap is mounted where smtpdup looks for its file.
    config_volume = next(v for v in pod["volumes"] if v.get("configMap", {}).get("name") == configmap["metadata"]["name"])
    assert mounts["/etc/smtp-dup"] == config_volume["name"]
    assert container["args"] == ["--config", "/etc/smtp-dup/config.yaml"]

    # Non-root, as the image's numeric user; resource requests.
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    [user] = _dockerfile_instruction("USER")
    assert f"{security['runAsUser']}:{security['runAsGroup']}" == user
    assert security["fsGroup"] == security["runAsGroup"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])


def test_kubernetes_services_and_budget_select_the_pods_and_inject_no_settings():
    statefulset = _one("StatefulSet")
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    [container] = statefulset["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}

    services = [d for d in _manifests() if d["kind"] == "Service"]
    assert statefulset["spec"]["serviceName"] in {s["metadata"]["name"] for s in services}
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
        # A Service named smtp-dup would inject SMTP_DUP_PORT, SMTP_DUP_SERVICE_HOST...
        assert not service["metadata"]["name"].upper().replace("-", "_").startswith("SMTP_DUP")
    assert statefulset["spec"]["template"]["spec"]["enableServiceLinks"] is False

    budget = _one("PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] == 1


# --- compose ------------------------------------------------------------------


def test_compose_file_is_consistent(tmp_path):
    from smtpdup.cli import _parser

    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    relay = services["relay"]
    environ = {k: str(v) for k, v in relay["environment"].items()}
    # Every variable is a real setting (load() refuses unknown SMTP_DUP_* names).
    config = config_module.load(os.devnull, environ)

    published = {int(p.rsplit(":", 1)[1]) for p in relay["ports"]}
    assert config.smtp.listen.port in published and config.metrics.listen.port in published
    assert all(p.startswith("127.0.0.1:") for p in relay["ports"]), "published beyond the host's loopback"
    grace = float(relay["stop_grace_period"].rstrip("s"))
    assert grace > config.smtp.shutdown_grace_seconds

    # The primary and the backup are the two sinks, on the ports they listen on.
    sinks = {}
    for name in ("primary", "backup"):
        args = _parser().parse_args(services[name]["command"])
        assert args.command == "sink"
        sink_environ = {k: str(v) for k, v in services[name]["environment"].items()}
        sink_config = config_module.load(os.devnull, sink_environ, require_primary=False)
        # What `smtpdup health` probes in the sink's container is where it listens.
        assert str(sink_config.smtp.listen) == args.listen and sink_config.metrics.listen is None
        sinks[name] = args.listen.rsplit(":", 1)[1]
        assert name in relay["depends_on"]
    destinations = [config.relay.destination_primary, *config.relay.destination_backups]
    assert [(d.host, str(d.port)) for d in destinations] == [("primary", sinks["primary"]), ("backup", sinks["backup"])]
    assert config.relay.spool_dir in {v.split(":")[1] for v in relay["volumes"]}


# --- Docker: the HEALTHCHECK follows the relay ------------------------------------


@pytest.mark.parametrize("metrics", [True, False], ids=["metrics-on", "metrics-off"])
def test_dockerfile_healthcheck_follows_the_relay(upstreams, relay_processes, tmp_path, metrics):
    """The HEALTHCHECK command exactly as the Dockerfile writes it, with the
    image's environment overridden as a container would be: 0 while the
    relay serves, non-zero once it has stopped (metrics enabled or not)."""
    command = _healthcheck_command()
    primary = upstreams("primary")
    environ = {**_dockerfile_env(), **relay_environ(tmp_path, primary.address)}
    environ["SMTP_DUP_SMTP_LISTEN"] = f"127.0.0.1:{free_port()}"
    environ["SMTP_DUP_METRICS_LISTEN"] = f"127.0.0.1:{free_port()}" if metrics else ""
    relay = relay_processes(environ)
    if metrics:
        wait_until(lambda: listening(int(environ["SMTP_DUP_METRICS_LISTEN"].rsplit(":", 1)[1])),
                   what="the metrics listener")

    # As in the container: the image's PATH finds `smtpdup`.
    probe_env = {**relay.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}

    def health(env=probe_env) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)

    serving = health()
    assert serving.returncode == 0, serving.stderr
    assert ("/healthz" if metrics else "greeted with 220") in serving.stdout

    if not metrics:
        # A wildcard listen address (the image's 0.0.0.0:2525) is probed on loopback.
        wildcard = health({**probe_env, "SMTP_DUP_SMTP_LISTEN": f"0.0.0.0:{relay.address[1]}"})
        assert wildcard.returncode == 0, wildcard.stderr

    assert relay.stop() == 0
    stopped = health()
    assert stopped.returncode == 1, stopped.stdout
    assert "unhealthy" in stopped.stderr and "Traceback" not in stopped.stderr


def test_health_is_unhealthy_not_a_usage_error_on_bad_configuration(tmp_path):
    """Docker reserves exit status 2: a broken configuration is status 1."""
    run = run_smtpdup(["health"], {"SMTP_DUP_CONFIG": os.devnull, "SMTP_DUP_SMTP_LISTEN": "no-port"}, tmp_path)
    assert run.returncode == 1
    assert "smtp.listen" in run.stderr and len(run.stderr.splitlines()) == 1


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", "spool", "demo-mail", ".git"} <= ignored
    assert "**/__pycache__" in ignored
    # What the Dockerfile copies must not be ignored.
    for instruction in _dockerfile_instruction("COPY"):
        for source in shlex.split(instruction)[:-1]:
            assert source.rstrip("/") not in ignored, source
    labels = " ".join(_dockerfile_instruction("LABEL"))
    for key in ("org.opencontainers.image.title", "org.opencontainers.image.version",
                "org.opencontainers.image.revision", "org.opencontainers.image.description"):
        assert key in labels


# --- systemd ------------------------------------------------------------------


def _unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with its venv path pointing at this test run's venv."""
    text = (DEPLOY / "smtpdup.service").read_text()
    assert "/opt/smtpdup/venv/bin/smtpdup" in text
    unit = tmp_path / "smtpdup.service"
    unit.write_text(text.replace("/opt/smtpdup/venv/bin/smtpdup", str(VENV_BIN / "smtpdup")))
    return unit


def _unit_values(key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in (DEPLOY / "smtpdup.service").read_text().splitlines()
            if line.startswith(key + "=")]


def test_systemd_unit_verifies_cleanly(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    run = subprocess.run([analyze, "verify", str(_unit_for_this_machine(tmp_path))],
                         capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and bad values too, printing a warning:
    # clean means nothing printed.
    assert run.returncode == 0 and run.stdout + run.stderr == "", run.stdout + run.stderr
    assert _unit_values("Type") == ["notify"]
    assert _unit_values("EnvironmentFile") == ["-/etc/smtp-dup/smtpdup.env"]


def test_systemd_reload_validates_before_signalling(upstreams, relay_processes, tmp_path):
    """Run the unit's ExecReload lines as systemd does (in order, the first
    failure fails the reload and skips the rest), against a running relay."""
    reload_lines = _unit_values("ExecReload")
    assert len(reload_lines) == 2 and " check " in reload_lines[0] and reload_lines[1].endswith("-HUP $MAINPID")
    primary = upstreams("primary")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(f"relay:\n  destination_primary: {primary.address}\n")
    environ = relay_environ(tmp_path, primary.address, smtp_listen=f"127.0.0.1:{free_port()}", log_level="info")
    del environ["SMTP_DUP_RELAY_DESTINATION_PRIMARY"]
    environ["SMTP_DUP_CONFIG"] = str(config_path)  # as ExecStart's --config
    relay = relay_processes(environ)

    def systemctl_reload() -> int:
        for line in reload_lines:
            line = (line.replace("/opt/smtpdup/venv/bin/smtpdup", str(VENV_BIN / "smtpdup"))
                    .replace("/etc/smtp-dup/config.yaml", str(config_path))
                    .replace("$MAINPID", str(relay.proc.pid)))
            status = subprocess.run(shlex.split(line), env=relay.environ, capture_output=True, timeout=60).returncode
            if status != 0:
                return status
        return 0

    config_path.write_text("relay:\n  destination_primary: [not, an, address]\n")
    assert systemctl_reload() == 2

    config_path.write_text(f"relay:\n  destination_primary: {primary.address}\n")
    assert systemctl_reload() == 0
    wait_until(lambda: '"reloaded"' in relay.log(), what="the relay to reload")
    # The relay handles signals in order: had the refused reload signalled
    # it, that signal would have left its own line before this one.
    assert '"reload_failed"' not in relay.log() and relay.log().count('"reloaded"') == 1
    assert relay.stop() == 0


class NotifySocket:
    """A unix datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self) -> None:
        # sun_path holds at most 107 bytes: pytest's tmp_path can be longer.
        self.directory = tempfile.mkdtemp(prefix="sdn-")
        self.path = os.path.join(self.directory, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)

    def receive(self, timeout: float = START_TIMEOUT) -> dict[str, str]:
        """The next message as a dict; AssertionError after ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except socket.timeout:
            raise AssertionError(f"no notification within {timeout}s") from None
        return dict(line.split("=", 1) for line in data.decode().splitlines())

    def nothing_pending(self) -> bool:
        self.sock.settimeout(0.3)
        try:
            self.sock.recv(4096)
        except socket.timeout:
            return True
        return False

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def notify_socket():
    sock = NotifySocket()
    yield sock
    sock.close()


def _dashboard_metrics() -> set[str]:
    text = (DEPLOY / "grafana" / "smtpdup-dashboard.json").read_text()
    dashboard = json.loads(text)
    expressions = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    expressions += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    names = set()
    for expression in expressions:
        names |= set(re.findall(r"\b((?:smtpdup|process)_[a-z_]+)\b", expression))
    return names


@pytest.mark.parametrize("workers", [1, 2])
def test_notify_protocol_reload_gauges_and_dashboard_metrics(upstreams, relay_processes, notify_socket, tmp_path,
                                                             workers):
    """READY=1 only once the port greets; RELOADING=1 then READY=1 around a
    SIGHUP (the reload gauge follows a rejected and an accepted file);
    STOPPING=1 on SIGTERM, then exit 0. With workers, the supervisor speaks.
    Every metric the Grafana dashboard queries is in /metrics."""
    primary, backup = upstreams("primary"), upstreams("backup")
    config_path = tmp_path / "config.yaml"
    good = f"relay:\n  destination_backups: [{backup.address!r}]\n"
    config_path.write_text(good)
    metrics_port = free_port()
    environ = relay_environ(tmp_path, primary.address, smtp_listen=f"127.0.0.1:{free_port()}",
                            metrics_listen=f"127.0.0.1:{metrics_port}", smtp_workers=workers, log_level="info")
    del environ["SMTP_DUP_RELAY_DESTINATION_BACKUPS"]
    environ["SMTP_DUP_CONFIG"] = str(config_path)
    environ["NOTIFY_SOCKET"] = notify_socket.path
    relay = relay_processes(environ, wait=False)
    relay.environ["NOTIFY_SOCKET"] = notify_socket.path

    ready = notify_socket.receive()
    assert ready["READY"] == "1", ready
    with smtplib.SMTP(*relay.address, timeout=10) as smtp:  # greeted: it really listens
        assert smtp.noop()[0] == 250
    assert str(relay.address[1]) in ready["STATUS"], ready

    scrape = _scrape(metrics_port)
    missing = _dashboard_metrics() - _series_names(scrape)
    assert not missing, f"the dashboard queries metrics that /metrics lacks: {sorted(missing)}"
    assert _gauge(scrape, "smtpdup_config_last_reload_successful") == 1
    loaded_at = _gauge(scrape, "smtpdup_config_last_reload_timestamp_seconds")
    assert abs(loaded_at - time.time()) < 60
    assert _gauge(scrape, "process_resident_memory_bytes") > 0
    assert _gauge(scrape, f'smtpdup_build_info{{version="{__version__}"}}') == 1
    assert _gauge(scrape, f'smtpdup_backup_pending_copies{{destination="{backup.address}"}}') == 0

    # A rejected configuration: RELOADING, READY again (the old one runs), gauge 0.
    config_path.write_text("relay:\n  timeout_seconds: soon\n")
    os.kill(relay.proc.pid, signal.SIGHUP)
    assert notify_socket.receive()["RELOADING"] == "1"
    after = notify_socket.receive()
    assert after["READY"] == "1" and "rejected" in after["STATUS"]
    wait_until(lambda: _gauge(_scrape(metrics_port), "smtpdup_config_last_reload_successful") == 0,
               what="the reload gauge to read 0")

    # A good one: gauge back to 1 (every worker reloaded).
    config_path.write_text(good)
    os.kill(relay.proc.pid, signal.SIGHUP)
    assert notify_socket.receive()["RELOADING"] == "1"
    assert notify_socket.receive()["READY"] == "1"
    wait_until(lambda: _gauge(_scrape(metrics_port), "smtpdup_config_last_reload_successful") == 1,
               what="the reload gauge to read 1")
    assert _gauge(_scrape(metrics_port), "smtpdup_config_last_reload_timestamp_seconds") >= loaded_at

    os.kill(relay.proc.pid, signal.SIGTERM)
    assert notify_socket.receive()["STOPPING"] == "1"
    assert relay.proc.wait(timeout=STOP_TIMEOUT) == 0
    assert notify_socket.nothing_pending()


def test_no_notify_socket_no_notification(tmp_path):
    """Outside systemd the notify calls are no-ops (and never raise)."""
    from smtpdup import notify

    environ_before = os.environ.pop("NOTIFY_SOCKET", None)
    try:
        assert notify.ready("x") is False
        os.environ["NOTIFY_SOCKET"] = str(tmp_path / "absent")
        assert notify.ready("x") is False  # nobody listens: logged, not raised
    finally:
        os.environ.pop("NOTIFY_SOCKET", None)
        if environ_before is not None:
            os.environ["NOTIFY_SOCKET"] = environ_before
