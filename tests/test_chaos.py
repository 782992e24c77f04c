"""The chaos soak's 45-second version: a mixed workload on `konstruct up --workers 2`
while workers, the dev server and PostgreSQL are killed with `kill -9`; nothing may
be lost, duplicated, failed or degraded. (`bench/chaos.py` runs it for ten minutes.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.slow  # its file is scheduled first (tests/conftest.py)


def test_faults_of_every_kind_lose_duplicate_and_fail_nothing(tmp_path: Path) -> None:
    report_path = tmp_path / "chaos.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KONSTRUCT_", "TEMPORAL_"))}
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "chaos.py"),
            "--seconds",
            "45",
            "--items",
            "100",
            "--fault-interval",
            "3,6",
            "--faults",
            "6",
            "--no-write",
            "--json-out",
            str(report_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
        timeout=900,
    )
    assert report_path.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    took = time.monotonic() - started
    if took > 135:
        # Not a failure: usually 66-81 s here, twice 175 s (ci73, ci79) with nothing
        # failed. The soak's timestamped log, kept where a passing run shows it (the
        # warnings summary), says where the time went the next time.
        # The soak's own lines, not the Temporal client's retry warnings around them.
        log = "\n".join(line for line in done.stdout.splitlines() if "WARN" not in line)
        warnings.warn(f"the chaos soak took {took:.0f} s; its log:\n{log[-8000:]}", stacklevel=1)
    report = json.loads(report_path.read_text())
    # Faults of every kind were injected (the soak outlasts its 45 s until six were:
    # how many fit in 45 s depends on how fast this machine restarts things), and the
    # stack healed from each.
    assert report["faults"] >= 6 and not report["never_up"], report
    assert {"temporal", "postgres"} <= set(report["faults_by_target"]), report
    assert report["healed"], report
    # Work of every kind ran through them.
    # (Messages are sent at 2 a second; sends wait while the dev server restarts.)
    assert report["workflows"]["messages"] >= 40 and report["workflows"]["demo_runs"] >= 1
    assert report["workflows"]["experiment_items"] == 300
    assert report["lost"] == 0 and report["duplicated"] == 0, report
    # Every fault was outlasted: no workflow ended failed, none answered degraded.
    assert report["failed"] == 0, report["failed_detail"]
    assert not report["still_running"] and not report["demo_invariant_broken"], report
    assert done.returncode == 0, done.stderr[-3000:]
