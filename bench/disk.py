"""``python -m bench.disk``: how long this host's disk makes an ``fdatasync`` wait.

A quorum queue writes every message to its log and waits for the disk before delivering
it; SQLite with ``synchronous=FULL`` waits for it at every commit. So a disk that now and
then takes hundreds of milliseconds to sync sets every consumer's latency tail, the bare
aio-pika consumer's included. This writes ``--size`` KiB and syncs, ``--rate`` times a
second for ``--seconds``, and prints how long the syncs took: run it next to a latency
figure to see whether the host, not the worker, set its tail.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from bench.scenarios import percentile

FILE_SPAN = 64 << 20
"""Bytes of the scratch file the writes cycle through."""


def measure(directory: str, rate: float, size_kib: int, seconds: float) -> list[float]:
    """Milliseconds per ``fdatasync``, one per write, paced at ``rate`` a second."""
    block = os.urandom(size_kib * 1024)
    waits: list[float] = []
    with tempfile.NamedTemporaryFile(dir=directory, prefix="otp-disk-probe-") as scratch:
        fd, offset = scratch.fileno(), 0
        start = time.perf_counter()
        for number in range(max(1, round(rate * seconds))):
            delay = start + number / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            os.pwrite(fd, block, offset)
            offset = (offset + len(block)) % FILE_SPAN
            before = time.perf_counter()
            os.fdatasync(fd)
            waits.append((time.perf_counter() - before) * 1000)
    return waits


def summary(waits: list[float], rate: float, size_kib: int) -> str:
    ordered = sorted(waits)
    return (
        f"{len(ordered)} fdatasync of {size_kib} KiB at {rate:g}/s: "
        f"p50 {percentile(ordered, 0.50):.2f} ms, p99 {percentile(ordered, 0.99):.2f} ms, "
        f"p99.9 {percentile(ordered, 0.999):.1f} ms, max {ordered[-1]:.1f} ms, "
        f"{sum(1 for ms in ordered if ms > 50)} over 50 ms"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.disk", description=__doc__)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write (tmp)")
    parser.add_argument("--rate", type=float, default=300.0, help="syncs a second (300)")
    parser.add_argument("--size", type=int, default=16, help="KiB written per sync (16)")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long (20)")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.size <= 0 or args.seconds <= 0:
        parser.error("--rate, --size and --seconds must be positive")
    print(summary(measure(args.dir, args.rate, args.size, args.seconds), args.rate, args.size))


if __name__ == "__main__":
    main()
