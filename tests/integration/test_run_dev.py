"""``scripts/run_dev.sh`` (``make run``): two processes, one signal, an honest exit status."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support import ROOT

STAND_IN = """#!/bin/sh
# Stands in for the project's python: "-m worker" and "-m worker.notifier" alike run until
# SIGTERM or SIGINT, then exit with $EXIT_ON_SIGNAL (or the worker ends by itself with
# $EXIT_NOW). Each says it started only once its trap is set.
trap 'exit ${EXIT_ON_SIGNAL:-0}' TERM INT
if [ -n "${EXIT_NOW:-}" ] && [ "$2" = worker ]; then exit "$EXIT_NOW"; fi
echo "$2" >> "$STARTED"
while :; do sleep 0.05; done
"""


def start(tmp_path: Path, **env: str) -> tuple[subprocess.Popen[bytes], Path]:
    python = tmp_path / "python"
    python.write_text(STAND_IN)
    python.chmod(0o755)
    started = tmp_path / "started"
    process = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "run_dev.sh"), str(python)],
        env={"PATH": "/usr/bin:/bin", "STARTED": str(started), **env},
    )
    return process, started


def wait_started(started: Path, process: subprocess.Popen[bytes]) -> None:
    """Until both stand-ins have set their traps (the marker comes after), or fails."""
    for _ in range(600):
        if started.exists() and len(started.read_text().split()) == 2:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=0.05)
            pytest.fail(f"run_dev.sh ended with {process.returncode} before both started")
    pytest.fail("the stand-ins did not start within 30 s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_both_and_a_clean_stop_exits_0(tmp_path: Path, sig: int) -> None:
    # The trap used to cut `wait` short, so make run exited 130 or 143 after a clean stop.
    process, started = start(tmp_path)
    wait_started(started, process)
    assert sorted(started.read_text().split()) == ["worker", "worker.notifier"]
    process.send_signal(sig)
    assert process.wait(timeout=30) == 0


def test_a_process_that_stops_badly_on_the_signal_is_the_exit_status(tmp_path: Path) -> None:
    process, started = start(tmp_path, EXIT_ON_SIGNAL="3")
    wait_started(started, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 3


def test_a_process_that_ends_by_itself_ends_the_other_and_is_the_exit_status(
    tmp_path: Path,
) -> None:
    process, _ = start(tmp_path, EXIT_NOW="1")
    assert process.wait(timeout=30) == 1
