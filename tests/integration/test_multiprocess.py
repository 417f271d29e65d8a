"""Three worker processes race: attempts and failure streaks are counted exactly, and a
worker killed mid-burst loses nothing, on every backend."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import orjson
import pytest

from contracts.topology import COMMAND_QUEUE
from tests.integration.test_faults import (
    issue_command,
    publish_all,
    replies_by_command,
    wait_until,
)
from tests.support import EventLog, event_log, producer, start_process, worker_env

WORKERS = 3


Processes = list[subprocess.Popen[bytes]]


async def wait_for_consumers(url: str, count: int, processes: Processes) -> None:
    connection = await aio_pika.connect(url)
    try:
        async with asyncio.timeout(60):
            while True:
                assert all(p.poll() is None for p in processes), "a worker exited at start"
                channel = await connection.channel()
                try:
                    queue = await channel.declare_queue(COMMAND_QUEUE, passive=True)
                    if queue.declaration_result.consumer_count >= count:
                        return
                except aio_pika.exceptions.ChannelClosed:
                    pass  # not declared yet
                finally:
                    if not channel.is_closed:
                        await channel.close()
                await asyncio.sleep(0.1)
    finally:
        await connection.close()


@dataclass
class WorkerGroup:
    processes: Processes
    logs: list[Path] = field(default_factory=list)

    def log(self, n: int) -> str:
        return self.logs[n].read_text()

    def tails(self) -> str:
        return "\n".join(log.read_text()[-3000:] for log in self.logs)

    async def stop(self) -> list[int]:
        """SIGTERM to every process still running; the exit codes of all."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        return [await asyncio.to_thread(p.wait, 60) for p in self.processes]


StartWorkers = Callable[..., Awaitable[WorkerGroup]]


@pytest.fixture
async def start_workers(
    amqp_url: str, database_url: str, tmp_path: Path
) -> AsyncIterator[StartWorkers]:
    """Starts three worker processes, once each is consuming; kills leftovers at teardown.
    Small prefetch and batches by default, so every process gets a share of a burst."""
    groups: list[WorkerGroup] = []

    async def start(**overrides: str) -> WorkerGroup:
        env = worker_env(
            amqp_url,
            database_url,
            tmp_path / "var",
            **{
                "OTP_PREFETCH": "2",
                "OTP_BATCH_SIZE": "2",
                "OTP_REVEAL_CLIENTS": "test-app",
                **overrides,
            },
        )
        logs = [tmp_path / f"worker-{len(groups)}-{n}.log" for n in range(WORKERS)]
        group = WorkerGroup([start_process("worker", env, log) for log in logs], logs)
        groups.append(group)
        await wait_for_consumers(amqp_url, WORKERS, group.processes)
        return group

    yield start
    for group in groups:
        for process in group.processes:
            if process.poll() is None:
                process.kill()
            await asyncio.to_thread(process.wait, 30)


@pytest.fixture
async def workers(start_workers: StartWorkers) -> AsyncIterator[WorkerGroup]:
    group = await start_workers()
    yield group
    assert await group.stop() == [0] * WORKERS, group.tails()


async def test_concurrent_confirmations_are_counted_exactly(
    amqp_url: str, workers: WorkerGroup
) -> None:
    async with producer(amqp_url) as otp, asyncio.timeout(60):
        wrong = await otp.issue(user="race-wrong", reveal=True)
        right = await otp.issue(user="race-right", reveal=True)
        bad_code = "0" * 6 if wrong["code"] != "0" * 6 else "1" * 6
        wrong_replies = await asyncio.gather(
            *[
                await otp.send(
                    "code.confirm",
                    {"command_id": f"w{n}", "user": "race-wrong", "client": "test-app"}
                    | {"code": bad_code},
                )
                for n in range(40)
            ]
        )
        right_replies = await asyncio.gather(
            *[
                await otp.send(
                    "code.confirm",
                    {"command_id": f"r{n}", "user": "race-right", "client": "test-app"}
                    | {"code": right["code"]},
                )
                for n in range(20)
            ]
        )
    invalid = [r["attempts_left"] for r in wrong_replies if r["status"] == "invalid"]
    assert sorted(invalid, reverse=True) == [4, 3, 2, 1]
    assert Counter(r["status"] for r in wrong_replies) == {"invalid": 4, "locked": 36}
    assert Counter(r["status"] for r in right_replies)["confirmed"] == 1
    assert all(r["status"] in {"confirmed", "not_found"} for r in right_replies)


async def test_the_failure_pause_counts_every_failure_across_processes(
    amqp_url: str, start_workers: StartWorkers
) -> None:
    """Failed confirms for one user, each in a scope of its own, raced by three processes:
    only the user's lock orders them, and the streak must still count every one."""
    limit = 60
    group = await start_workers(OTP_MAX_CONSECUTIVE_FAILURES=str(limit))
    user, client = "streak", "test-app"
    async with producer(amqp_url) as otp, asyncio.timeout(60):
        issued = [await otp.issue(user=user, purpose=f"p{n}", reveal=True) for n in range(10)]
        guesses = [wrong_code(i["code"]) for i in issued] + ["123456"] * (limit - 1 - len(issued))
        futures = [
            await otp.send(
                "code.confirm",
                {"command_id": f"f{n}", "user": user, "client": client, "purpose": f"p{n}"}
                | {"code": guess},
            )
            for n, guess in enumerate(guesses)
        ]
        replies = await asyncio.gather(*futures)
        assert Counter(r["status"] for r in replies) == {
            "invalid": len(issued),
            "not_found": limit - 1 - len(issued),
        }
        # One failure short of the limit, issuing goes on; the limit-th failure pauses it.
        assert (await otp.issue(user=user, purpose="short"))["status"] == "issued"
        assert (await otp.confirm(user=user, purpose="last", code="123456"))[
            "status"
        ] == "not_found"
        paused = await otp.issue(user=user, purpose="paused")
    assert paused["status"] == "rate_limited", "a failure was lost between processes"
    assert 3500 < paused["retry_after_seconds"] <= 3600
    for n in range(WORKERS):  # every process took part in the race
        assert "command handled" in group.log(n)
    assert await group.stop() == [0] * WORKERS, group.tails()


async def test_sigkill_of_one_of_three_workers_mid_burst_loses_nothing(
    amqp_url: str, start_workers: StartWorkers
) -> None:
    """The survivors take over what the killed worker held: every command answered, the same
    answer to a command answered before the kill, one code and one event per command."""
    total = 1500
    # A short outbox lease: the survivors relay the dead worker's events sooner.
    group = await start_workers(
        OTP_PREFETCH="64", OTP_BATCH_SIZE="16", OTP_OUTBOX_LEASE_SECONDS="1"
    )
    victim = group.processes[0]
    async with producer(amqp_url) as otp, event_log(amqp_url, "code.issued") as events:
        sent = {f"crash-{i}": issue_command(f"crash-{i}") for i in range(total)}
        publishing = asyncio.create_task(publish_all(otp, list(sent.values())))
        await wait_until(
            lambda: len(otp.reply_messages) >= total // 3 and "command handled" in group.log(0),
            timeout=60,
        )
        victim.send_signal(signal.SIGKILL)
        assert len(otp.reply_messages) < total, "the kill came too late to test anything"
        await asyncio.to_thread(victim.wait, 10)
        futures = await publishing
        await asyncio.wait_for(asyncio.gather(*futures), 60)

        replies = replies_by_command(otp)
        assert set(replies) == {f"crash-{i}" for i in range(total)}
        for command_id, bodies in replies.items():
            assert all(b == bodies[0] for b in bodies), f"{command_id} got different replies"
            assert bodies[0]["status"] == "issued"
        code_ids = [bodies[0]["code_id"] for bodies in replies.values()]
        assert len(set(code_ids)) == total
        # Whether the kill caught a committed batch unacked is luck; what a redelivery of
        # the dead worker's commands gets is not: its answers, from a survivor, unchanged.
        answered = handled_command_ids(group.log(0))[:100]
        again = await asyncio.gather(*[otp.send("code.issue", sent[c]) for c in answered])
        replayed = await asyncio.wait_for(asyncio.gather(*again), 30)
        assert answered, "the dead worker's log names no command it answered"
        for command_id, reply in zip(answered, replayed, strict=True):
            assert reply == replies[command_id][0], f"{command_id} answered differently"
        await events.wait_for(lambda e: len(issued_events(e)) >= total, timeout=60)
        assert sorted(issued_events(events).values()) == sorted(code_ids)
    assert await group.stop() == [-signal.SIGKILL, 0, 0], group.tails()


def handled_command_ids(log: str) -> list[str]:
    """From whole lines only: a killed process may have written half of its last one."""
    whole = log.split("\n")[:-1]
    lines = (orjson.loads(line) for line in whole if '"command handled"' in line)
    return [line["command_id"] for line in lines]


def issued_events(events: EventLog) -> dict[str, str]:
    """code_id by event_id: events come at least once, so a redelivered one counts once."""
    return {b["event_id"]: b["code_id"] for b in events.named("code.issued")}


def wrong_code(code: str) -> str:
    return "0" * len(code) if code != "0" * len(code) else "1" * len(code)
