"""The fault run, short: kill -9 under load with a flapping backup.

``bench/chaos.py`` (``make chaos`` runs the long version) drives a relay
subprocess on 127.0.0.1 against three counting peers, kills it with SIGKILL
at random moments while client threads send, restarts it on the same spool,
and finally counts per Message-ID what each destination received. Bounded:
the script itself times every wait, and this test gives it 150 s in all.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

CHAOS_TIMEOUT = 150


def test_kill_9_under_load_loses_nothing_and_the_spool_drains(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), "--cycles", "30", "--clients", "8",
         "--min-up", "0.3", "--max-up", "1.2", "--flap", "0.7", "--drain-timeout", "60",
         "--dir", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=CHAOS_TIMEOUT, cwd=ROOT,
    )
    assert result.stdout, result.stderr[-3000:]
    figures = json.loads(result.stdout.splitlines()[-1])
    assert figures["accepted"] > 300, figures
    assert figures["lost"] == {"primary": 0, "backup1": 0, "backup2": 0}, figures
    assert figures["drain_seconds"] is not None and figures["left_in_spool"] == 0, figures
    assert figures["duplicates"]["primary"] == 0, figures
    assert figures["duplicates"]["backup1"] + figures["duplicates"]["backup2"] <= figures["duplicate_bound"], figures
    assert figures["exit_status_on_sigterm"] == 0, figures
    assert figures["ok"] and result.returncode == 0, figures
