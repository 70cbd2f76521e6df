"""Smoke test of the benchmark driver, bench/run.py.

One quick case, DIRECT and RELAY only (no Postfix instance, no extras):
the driver starts smtp-sinks and a relay, drives them with smtp-source,
stops every process, and writes a JSON result and a Markdown table with the
expected keys and positive numbers. No timing assertions: this machine's
speed is not what is tested.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_tool("smtp-source") is None, reason="smtp-source (Postfix) is not installed"),
]

# Bound on the whole run; it usually takes a few seconds.
BENCH_TIMEOUT_SECONDS = 120


def test_quick_bench_writes_json_and_table(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--cases", "1k-1rcpt-reuse",
         "--systems", "direct,relay", "--messages", "200", "--out", str(out), "--tmpdir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=BENCH_TIMEOUT_SECONDS,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    (result_file,) = out.glob("*.json")
    results = json.loads(result_file.read_text())
    meta = results["meta"]
    assert meta["cpu_count"] == os.cpu_count()
    assert meta["git_commit"] and meta["python"]
    assert meta["runs"] == 1 and meta["messages"] == 200

    (case,) = results["cases"]
    assert case["name"] == "1k-1rcpt-reuse"
    assert set(case["systems"]) == {"direct", "relay"}
    for name, system in case["systems"].items():
        (run,) = system["runs"]
        assert "error" not in run, run
        assert run["client_msg_per_s"] > 0 and run["e2e_msg_per_s"] > 0
        assert system["median"]["e2e_msg_per_s"] > 0
        assert system["median"]["runs_failed"] == 0
    relay_run = case["systems"]["relay"]["runs"][0]
    assert relay_run["sink_counts"] == [200, 200, 200]  # the primary and both backups got every copy
    assert relay_run["cpu_us_per_msg"] > 0 and relay_run["peak_rss_kib"] > 0
    assert case["ratios"]["relay_vs_direct_e2e"]["median"] > 0

    targets = {t["target"]: t for t in results["targets"]}
    assert len(targets) == 11
    assert all(set(t) >= {"measured", "goal", "met"} for t in targets.values())

    table = (out / "latest.md").read_text()
    assert table == done.stdout
    assert "| 1k-1rcpt-reuse |" in table and "| target | measured | goal | met |" in table
    # The temp directory is gone, and no process (sink, relay) still works in it.
    assert not any(p.name.startswith("smtpdup-bench-") for p in tmp_path.iterdir())
    assert _processes_using(tmp_path) == []


def _processes_using(directory: Path) -> list[int]:
    """PIDs whose working directory or an open file lies under ``directory``."""
    prefix = str(directory)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            links = [os.readlink(entry / "cwd")] + [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:
            continue  # gone meanwhile, or not ours to look at
        if any(link.startswith(prefix) for link in links):
            found.append(int(entry.name))
    return found
