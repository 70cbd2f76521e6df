"""Smoke test of the benchmark driver, bench/run.py.

One quick run: the case 1k-1rcpt-reuse with DIRECT, RELAY and BEFORE (the
relay at HEAD from a temporary git worktree, ``--baseline HEAD``);
POSTFIX-FRONT (a private Postfix in front of the relay) when Postfix can run
here; and the drain of a small spool backlog. The driver starts smtp-sinks,
relays and Postfix, drives them with smtp-source, stops every process,
removes the worktree, and writes a JSON result and a Markdown table with the
expected keys and positive numbers. No timing assertions: this machine's
speed is not what is tested.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
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

# Bound on the whole run; it usually takes about 20 seconds.
BENCH_TIMEOUT_SECONDS = 180
MESSAGES = 100
DRAIN_COPIES = 400


@pytest.fixture
def bench_tmp():
    """A temp directory the postfix user can traverse (pytest's tmp_path
    sits under a 0700 directory, where a private Postfix cannot start)."""
    path = Path(tempfile.mkdtemp(prefix="smtpdup-bench-test-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_quick_bench_writes_json_and_table(bench_tmp):
    tmp_path = bench_tmp
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--cases", "1k-1rcpt-reuse,postfix-front,drain",
         "--systems", "direct,relay,floor,floor-nodisk", "--baseline", "HEAD", "--messages", str(MESSAGES),
         "--drain-copies", str(DRAIN_COPIES), "--out", str(out), "--tmpdir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=BENCH_TIMEOUT_SECONDS,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    (result_file,) = out.glob("*.json")
    results = json.loads(result_file.read_text())
    meta = results["meta"]
    assert meta["cpu_count"] == os.cpu_count()
    assert meta["git_commit"] and meta["python"]
    assert meta["runs"] == 1 and meta["messages"] == MESSAGES
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert meta["baseline"]["ref"] == "HEAD" and meta["baseline"]["commit"] == head

    cases = {c["name"]: c for c in results["cases"]}
    assert set(cases) == {"1k-1rcpt-reuse", "postfix-front"}
    case = cases["1k-1rcpt-reuse"]
    assert set(case["systems"]) == {"direct", "relay", "before", "floor", "floor-nodisk"}
    for name, system in case["systems"].items():
        (run,) = system["runs"]
        assert "error" not in run, run
        assert run["client_msg_per_s"] > 0 and run["e2e_msg_per_s"] > 0
        assert system["median"]["e2e_msg_per_s"] > 0
        assert system["median"]["runs_failed"] == 0
    for name in ("relay", "before", "floor", "floor-nodisk"):
        run = case["systems"][name]["runs"][0]
        assert run["sink_counts"] == [MESSAGES] * 3  # the primary and both backups got every copy
        assert run["cpu_us_per_msg"] > 0 and run["peak_rss_kib"] > 0
    assert case["ratios"]["relay_vs_direct_e2e"]["median"] > 0
    assert case["ratios"]["relay_vs_before_e2e"]["median"] > 0
    assert case["ratios"]["relay_vs_before_cpu"]["median"] > 0
    assert case["ratios"]["relay_vs_floor_cpu"]["median"] > 0
    assert case["ratios"]["floor-nodisk_vs_before_cpu"]["median"] > 0

    front = cases["postfix-front"]
    postfix_runs = "skipped" not in front
    if not postfix_runs:  # a private Postfix needs root and Postfix
        assert os.geteuid() != 0 or _tool("postfix") is None, front["skipped"]
    else:
        assert "error" not in front, front
        assert set(front["systems"]) == {"postfix-sink", "front-relay", "front-relay-w2", "front-before"}
        for name, system in front["systems"].items():
            (run,) = system["runs"]
            assert "error" not in run, run
            assert run["e2e_msg_per_s"] > 0 and run["postfix_cpu_us_per_msg"] > 0
            assert run["sink_counts"] == [MESSAGES] * (1 if name == "postfix-sink" else 3)
            if name != "postfix-sink":
                assert run["cpu_us_per_msg"] > 0
        assert front["ratios"]["front-relay_vs_postfix_sink_e2e"]["median"] > 0

    (drain,) = results["extras"]["drain"]["runs"]
    assert "error" not in drain, drain
    assert drain["copies"] == DRAIN_COPIES and drain["fill"] == "spool"
    assert drain["smtp_ready_seconds"] > 0 and drain["copies_per_s"] > 0
    assert all(t is not None and t > 0 for t in drain["first_delivery_seconds"])
    assert drain["timeline"][-1][1:] == [DRAIN_COPIES // 2] * 2  # each backup counted its copies
    assert drain["pending_after"] is not None

    targets = {t["target"]: t for t in results["targets"]}
    assert len(targets) == 24
    assert all(set(t) >= {"measured", "goal", "met", "source"} for t in targets.values())
    assert targets["RELAY e2e / BEFORE e2e (1 KiB, 1 rcpt, 2 backups, reuse)"]["measured"] > 0

    table = (out / "latest.md").read_text()
    assert table == done.stdout
    assert "| 1k-1rcpt-reuse |" in table and "| target | measured | goal | met | from |" in table
    assert "RELAY/BEFORE e2e" in table and "Drain after a restart" in table
    if postfix_runs:
        assert "| POSTFIX→RELAY |" in table
    # The temp directory and the baseline's worktree are gone, and no
    # process (sink, relay, Postfix) still works in it.
    assert not any(p.name.startswith("smtpdup-bench-") for p in tmp_path.iterdir())
    assert not [w for w in _worktrees() if w.startswith(str(tmp_path))]
    assert _processes_using(tmp_path) == []


def _worktrees() -> list[str]:
    listing = subprocess.run(["git", "worktree", "list", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    return [line.split(" ", 1)[1] for line in listing.stdout.splitlines() if line.startswith("worktree ")]


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
