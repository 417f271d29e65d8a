"""The benchmark harness runs end to end (its figures are printed, never asserted)."""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT


def test_quick_benchmark_runs_and_reports_ratios() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--scenarios",
            "ceiling,issue",
            "--commands",
            "1000",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = result.stdout
    assert "ceiling" in table and "issue" in table
    issue_row = next(line for line in table.splitlines() if line.startswith("issue "))
    assert "events 1000" in issue_row
