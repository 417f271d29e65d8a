"""``scripts/run_dev.sh`` (``make run``): two processes, one signal, an honest exit status."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support import ROOT

STAND_IN = """#!/bin/sh
# Stands in for the project's python: "-m worker" and "-m worker.notifier" alike run until
# SIGTERM or SIGINT, then exit with $EXIT_ON_SIGNAL (or the worker ends by itself with
# $EXIT_NOW). Each says it started only once its trap is set. With $SIGNAL_PARENT the worker
# sends SIGINT to run_dev.sh the moment it runs, before the notifier has even started.
trap 'exit ${EXIT_ON_SIGNAL:-0}' TERM INT
echo $$ >> "$STARTED.pids"
if [ -n "${SIGNAL_PARENT:-}" ] && [ "$2" = worker ]; then kill -INT $PPID; fi
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


@pytest.mark.parametrize("attempt", range(60))
def test_a_signal_as_the_processes_start_leaves_neither_running(
    tmp_path: Path, attempt: int
) -> None:
    # The trap used to be set only after both had started: a signal in between ended the
    # script alone, and both processes ran on with no one to stop them. The window is a
    # race, so the test takes several shots at it.
    process, started = start(tmp_path, SIGNAL_PARENT="1")
    pids = Path(f"{started}.pids")
    try:
        process.wait(timeout=30)
        assert pids.read_text().split()
        assert [pid for pid in pids.read_text().split() if alive(int(pid))] == []
    finally:
        for pid in pids.read_text().split() if pids.exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


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
