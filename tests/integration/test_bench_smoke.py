"""The benchmark harness runs end to end (its figures are printed, never asserted)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.harness import BrokerProbe, WorkerScrape
from bench.scenarios import (
    batch_figures,
    batch_text,
    loop_lag_figures,
    loop_lag_text,
    probe_figures,
    probe_text,
)
from tests.proxy import proxied
from tests.support import ROOT


def _bench(*args: str) -> str:
    """Runs ``python -m bench`` with ``args``; exit 0 (no problem in any scenario) or fails.

    Past its time it gets SIGTERM first, not SIGKILL: the bench then stops the workers it
    started (in sessions of their own, so a kill would orphan them) and deletes its vhost
    and temp directory."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = process.communicate(timeout=100)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            out, err = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        pytest.fail(f"the bench ran over 100 s: {out[-2000:]}{err[-2000:]}")
    assert process.returncode == 0, out[-2000:] + err[-2000:]
    return out


def test_quick_benchmark_runs_and_reports_ratios() -> None:
    table = _bench("--quick", "--scenarios", "ceiling,issue", "--commands", "1000")
    assert "ceiling" in table and "issue" in table
    issue_row = next(line for line in table.splitlines() if line.startswith("issue "))
    assert "events 1000" in issue_row
    assert "ceiling, before/after" in issue_row  # the raw consumer ran on both sides of it


def test_quick_latency_run_reports_windows_and_cpu_shares() -> None:
    # Exit 0 also says every reply came back "issued": a wrong status is a problem.
    out = _bench(
        "--scenarios", "latency", "--no-deps", "--latency-rate", "200",
        "--latency-seconds", "3", "--latency-warmup", "0.5",
    )  # fmt: skip
    worker_line = next(line for line in out.splitlines() if "  lat: p50" in line)
    assert "p99 by 5 s window [" in worker_line
    assert "CPU consumer" in worker_line and "bench" in worker_line
    # The side probe's round trips through the broker ran alongside, one every 50 ms.
    probe = re.search(r"broker probe (\d+) round trips: p50 [\d.]+ ms, max [\d.]+ ms", worker_line)
    assert probe is not None, worker_line
    assert int(probe.group(1)) >= 1
    # So did the worker's own loop-lag timers, read from its /metrics before and after.
    lag = re.search(r"worker loop lag (\d+) timers: \d+ late by over 25 ms", worker_line)
    assert lag is not None, worker_line
    assert int(lag.group(1)) >= 1
    # And its batches: ~600 commands at 200/s, each counted in one batch.
    batches = re.search(
        r"worker batches ([\d,]+) \([\d,]+/s\), ([\d.]+) commands each", worker_line
    )
    assert batches is not None, worker_line
    assert 1 <= int(batches.group(1).replace(",", "")) <= 600
    assert float(batches.group(2)) >= 1.0
    row = next(line for line in out.splitlines() if line.startswith("latency "))
    assert "(raw run: broker probe " in row


def test_latency_at_half_the_ceiling_runs_after_the_ceiling_it_halves() -> None:
    out = _bench(
        "--quick", "--scenarios", "latency-ceiling", "--commands", "1000",
        "--latency-seconds", "2", "--latency-warmup", "0.5",
    )  # fmt: skip
    assert "== ceiling" in out  # its dependency, run first
    ceiling = next(line for line in out.splitlines() if line.startswith("ceiling "))
    rate = float(ceiling.split()[1].replace(",", ""))
    row = next(line for line in out.splitlines() if line.startswith("latency-ceiling "))
    assert "(half of the ceiling)" in row and "raw consumer at the same load" in row
    # Asked to offer half of it (what it managed to offer is a figure, not asserted); the
    # table rounds the ceiling, so the two may differ by one.
    asked = re.search(r"  latcraw: offering ([\d,]+) commands/s", out)
    assert asked is not None, out
    assert abs(float(asked.group(1).replace(",", "")) - rate / 2) <= 1
    assert "  latc: p50" in out and "  latcraw: p50" in out


async def test_broker_probe_ends_at_once_when_its_connection_breaks(amqp_url: str) -> None:
    async with proxied(amqp_url) as (proxy, url):
        probe = BrokerProbe(url)
        await probe.start()
        await proxy.cut()
        # At once, not after the 30 s a lost round trip would otherwise be given.
        await asyncio.wait_for(probe.ended.wait(), 10)
        samples = await probe.stop()
    assert probe.error is not None
    text = probe_text(probe_figures([ms for _, ms in samples], probe.error))
    assert text.startswith("broker probe") and "(its connection broke: " in text


def test_disk_probe_prints_how_long_syncs_took(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.disk", "--dir", str(tmp_path), "--rate", "100",
         "--seconds", "0.3", "--size", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(
        r"30 fdatasync of 4 KiB at 100/s: p50 [\d.]+ ms, p99 [\d.]+ ms, p99\.9 [\d.]+ ms, "
        r"max [\d.]+ ms, \d+ over 50 ms\n",
        result.stdout,
    ), result.stdout
    assert list(tmp_path.iterdir()) == []  # its scratch file is gone


def test_disk_probe_refuses_a_rate_of_zero() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.disk", "--rate", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "must be positive" in result.stderr


def test_quick_rss_run_reports_the_warm_and_final_sizes() -> None:
    out = _bench(
        "--scenarios", "rss", "--no-deps", "--rss-commands", "3000", "--rss-backlog", "500"
    )
    row = next(line for line in out.splitlines() if line.startswith("rss "))
    assert "flat: 50%->100% growth" in row
    assert "at 10%/25%/50%/100%: " in row and "3000 cmds, events 3000" in row


def test_quick_prestored_run_brings_its_own_empty_store_baseline() -> None:
    out = _bench("--scenarios", "prestored", "--prestored", "2000", "--commands", "500")
    assert "prestored-base1:" in out and "prestored-base2:" in out
    row = next(line for line in out.splitlines() if line.startswith("prestored "))
    assert "empty store, before/after" in row and "empty store just before and after" in row
    assert "2,000 codes + replies stored" in row and "events 500" in row


def test_loop_lag_figures_count_only_the_timers_between_the_scrapes() -> None:
    inf = float("inf")
    before = {0.001: 4, 0.025: 5, 0.1: 5, 0.25: 5, inf: 5}
    after = {0.001: 14, 0.025: 18, 0.1: 19, 0.25: 20, inf: 20}
    lag = loop_lag_figures(before, after)
    assert lag == {"timers": 15, "over_25_ms": 2, "over_100_ms": 1, "max_at_most_ms": 250.0}
    assert loop_lag_text(lag).endswith(
        "2 late by over 25 ms, 1 by over 100 ms, the latest by at most 250 ms"
    )
    assert loop_lag_text(loop_lag_figures(after, after)) == "worker loop lag: no timer ran"


def test_batch_figures_count_only_the_batches_between_the_scrapes() -> None:
    before, after = WorkerScrape({}, 10, 25), WorkerScrape({}, 110, 425)
    batches = batch_figures(before, after, span=2.0)
    assert batches == {"batches": 100, "batches_per_second": 50.0, "mean_batch": 4.0}
    assert batch_text(batches) == "worker batches 100 (50/s), 4.0 commands each on average"
    assert batch_text(batch_figures(after, after, span=2.0)) == "worker batches: none"
