"""``python -m bench``: the worker against a raw aio-pika ceiling, in one invocation.

Every figure that can be is a ratio against a run made in the same invocation on the same
(shared, noisy) machine. See ``--help`` for the knobs; ``--quick`` is a 1-2 minute smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import orjson

from bench.harness import BrokerSide, Proc, create_vhost, delete_vhost
from bench.scenarios import Bench, Result
from worker.loop import run as run_loop

# Latency right after issue: its load is half the issue rate, and this host's speed drifts
# within a minute, so the capacity it halves should be the latest reading there is.
SCENARIOS = (
    "ceiling",
    "issue",
    "latency",
    "latency-ceiling",
    "issue-quiet",
    "confirm",
    "rss",
    "prestored",
)
# A scenario's figure is relative to another's: run that one first, even if not asked for.
NEEDS = {"latency": ("issue",), "issue": ("ceiling",), "latency-ceiling": ("ceiling",)}
QUICK = {"commands": 2000, "rss_commands": 10_000, "prestored": 100_000, "latency_seconds": 5.0}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Throughput, latency and memory of the worker against a raw aio-pika "
        "consumer doing only the broker work, all in one invocation.",
    )
    p.add_argument("--commands", type=int, help="prefilled commands per throughput run (10000)")
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all); "
        "latency also runs issue, issue and latency-ceiling run ceiling (use --no-deps to "
        "skip); "
        "prestored brings its own empty-store runs",
    )
    p.add_argument("--no-deps", action="store_true", help="run only the scenarios named")
    p.add_argument("--rss-commands", type=int, help="commands of the RSS run (100000)")
    p.add_argument("--rss-backlog", type=int, default=3000, help="RSS run queue backlog (3000)")
    p.add_argument("--prestored", type=int, help="codes stored before the prestored run (1000000)")
    p.add_argument("--latency-seconds", type=float, help="paced load duration (10)")
    p.add_argument("--latency-warmup", type=float, default=1.0, help="excluded start (1 s)")
    p.add_argument("--latency-rate", type=float, help="offered commands/s (default: issue/2)")
    p.add_argument("--prefetch", type=int, default=256, help="raw consumer prefetch (256)")
    p.add_argument(
        "--events-queue",
        choices=("classic", "quorum"),
        default="classic",
        help="type of the durable queue bound to otp.events to count events (classic)",
    )
    p.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for every worker run, e.g. OTP_BATCH_SIZE=512 (repeatable)",
    )
    p.add_argument("--stall-timeout", type=float, default=60.0, help="fail after N s w/o reply")
    p.add_argument("--quick", action="store_true", help="small numbers: a 1-2 minute smoke run")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (DBs, logs)")
    p.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    defaults = {"commands": 10_000, "rss_commands": 100_000, "prestored": 1_000_000}
    defaults["latency_seconds"] = 10.0
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, QUICK[name] if args.quick else default)
    at_least = {"commands": 2, "rss_commands": 2, "rss_backlog": 1, "prestored": 1, "prefetch": 1}
    for name, lowest in at_least.items():
        if getattr(args, name) < lowest:
            p.error(f"--{name.replace('_', '-')} must be at least {lowest}")
    for name in ("latency_seconds", "stall_timeout"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be above 0")
    if args.latency_rate is not None and not 0 < args.latency_rate < float("inf"):
        p.error("--latency-rate must be a number of commands a second above 0")
    if not 0 <= args.latency_warmup < args.latency_seconds:
        p.error("--latency-warmup must be at least 0 and shorter than --latency-seconds")
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    wanted = set(chosen)
    if not args.no_deps:
        while True:
            more = {d for s in wanted for d in NEEDS.get(s, ()) if d not in wanted}
            if not more:
                break
            wanted |= more
    args.selected = [s for s in SCENARIOS if s in wanted]
    args.worker_env_dict = {}
    for item in args.worker_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("OTP_"):
            p.error(f"--worker-env wants OTP_KEY=VALUE, got {item!r}")
        args.worker_env_dict[key] = value
    if args.commands < 100:
        p.error("--commands must be at least 100")
    return args


async def run(args: argparse.Namespace, command_line: str) -> int:
    vhost, url = create_vhost()
    tmp = Path(tempfile.mkdtemp(prefix="otp-bench-"))
    broker = BrokerSide(url, args.events_queue)
    bench = Bench(args, broker, url, tmp)
    print(f"bench: vhost {vhost}, temp dir {tmp}", flush=True)
    print(f"bench: scenarios {', '.join(args.selected)}", flush=True)
    started = time.perf_counter()
    try:
        await broker.open()
        for name in args.selected:
            result = Result(name)
            print(f"== {name}", flush=True)
            t0 = time.perf_counter()
            try:
                if name == "issue-quiet":
                    await bench.issue(result, quiet=True)
                else:
                    await getattr(bench, name.replace("-", "_"))(result)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                result.problems.append(f"failed: {exc}")
                print(f"  {name}: FAILED: {exc}", flush=True)
                if not isinstance(exc, RuntimeError):
                    traceback.print_exc()
            finally:
                Proc.kill_all()
                result.seconds = time.perf_counter() - t0
            bench.results[name] = result
            print(f"  {name}: took {result.seconds:.1f} s", flush=True)
    finally:
        Proc.kill_all()
        await broker.close()
        delete_vhost(vhost)
        if args.keep_tmp:
            print(f"bench: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - started
    report(bench.results, args, command_line, total)
    if args.json:
        write_json(args.json, bench.results, args, command_line, total)
    return 1 if any(r.problems for r in bench.results.values()) else 0


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def report(results: dict[str, Result], args: Any, command_line: str, total: float) -> None:
    header = ("scenario", "commands/s", "ratio", "ratio to", "target", "met", "took", "notes")
    rows = []
    for r in results.values():
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        notes = "; ".join(r.notes)
        if r.problems:
            notes = "PROBLEMS: " + "; ".join(r.problems) + (f" | {notes}" if notes else "")
        rows.append(
            (
                r.scenario,
                _fmt(r.rate, ",.0f"),
                _fmt(r.ratio, ".2f"),
                r.ratio_to or "-",
                r.target or "-",
                met,
                f"{r.seconds:.0f} s",
                notes,
            )
        )
    widths = [
        max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
        for i, h in enumerate(header)
    ]
    widths[-1] = len(header[-1])
    print()
    print(
        f"Benchmark results ({platform.node()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}), total {total:.0f} s"
    )
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print(line)
    print("-" * len(line))
    for row in rows:
        cells = [
            c.rjust(w) if i in (1, 2) else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells[:-1]) + "  " + row[-1])
    print()
    print(
        f"commands per throughput run: {args.commands}, raw consumer prefetch {args.prefetch}, "
        f"events queue: {args.events_queue}; worker: {worker_setup(args.worker_env_dict)}; "
        f"worker env extras: {args.worker_env_dict or '-'}"
    )
    print("timing: first reply to last reply of a prefilled queue, (N-1)/span")
    print(f"command line: {command_line}")


def worker_setup(extras: dict[str, str]) -> str:
    """The worker settings the figures depend on, as its runs had them: its defaults, unless
    --worker-env set them."""
    from worker.settings import ENV_PREFIX, Settings

    shown = []
    for name in ("prefetch", "batch_size", "sqlite_synchronous"):
        variable = f"{ENV_PREFIX}{name}".upper()
        value = extras.get(variable, Settings.model_fields[name].default)
        shown.append(f"{name.replace('_', ' ')} {value}")
    return ", ".join(shown)


def write_json(
    path: str, results: dict[str, Result], args: Any, command_line: str, total: float
) -> None:
    doc = {
        "command_line": command_line,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "total_seconds": round(total, 1),
        "settings": {
            "commands": args.commands,
            "rss_commands": args.rss_commands,
            "prestored": args.prestored,
            "latency_seconds": args.latency_seconds,
            "prefetch": args.prefetch,
            "events_queue": args.events_queue,
            "worker_env": args.worker_env_dict,
        },
        "results": [r.as_json() for r in results.values()],
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command_line = shlex.join([sys.executable, "-m", "bench", *argv])

    async def guarded() -> int:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if task is not None:
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        return await run(args, command_line)

    # The loop the worker and the raw consumer run: the bench shares the cores with them,
    # and asyncio's own loop costs it more CPU.
    try:
        return run_loop(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; processes stopped, vhost and temp dir removed", flush=True)
        return 130
    finally:
        with contextlib.suppress(Exception):
            Proc.kill_all()


if __name__ == "__main__":
    sys.exit(main())
