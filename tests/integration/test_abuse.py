"""Rate limits, the failure pause, brute force, reused command ids and key rotation, through
real workers."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from cryptography.fernet import Fernet

from contracts.topology import ERROR_TYPE_HEADER, REDACTED_HEADER
from tests.conftest import WorkerFactory
from tests.integration.test_bad_input import drain_dead_letters
from tests.integration.test_commands import Clock
from tests.integration.test_faults import Spawn, wait_until
from tests.support import event_log, producer, worker_env
from worker.domain.sealing import Sealer

STRICT = {
    "resend_cooldown_seconds": 30,
    "max_sends_per_scope_per_hour": 3,
    "max_sends_per_destination_per_hour": 4,
    "max_consecutive_failures": 5,
}


async def gather_replies(futures: list[asyncio.Future[dict[str, Any]]]) -> list[dict[str, Any]]:
    return await asyncio.wait_for(asyncio.gather(*futures), 60)


async def test_cooldown_at_its_boundary(amqp_url: str, start_worker: WorkerFactory) -> None:
    clock = Clock()
    await start_worker(clock=clock, **STRICT)
    async with producer(amqp_url) as otp:
        assert (await otp.issue(user="c"))["status"] == "issued"
        clock.advance(10)
        limited = await otp.issue(user="c")
        assert (limited["status"], limited["retry_after_seconds"]) == ("rate_limited", 20)
        assert "code_id" not in limited
        clock.advance(19.5)
        assert (await otp.issue(user="c"))["status"] == "rate_limited"
        clock.advance(0.5)
        assert (await otp.issue(user="c"))["resent"] is True


async def test_scope_cap_nth_allowed_next_refused_then_allowed(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    clock = Clock()
    await start_worker(clock=clock, **STRICT)
    async with producer(amqp_url) as otp:
        for _ in range(3):
            assert (await otp.issue(user="s"))["status"] == "issued"
            clock.advance(60)
        refused = await otp.issue(user="s")
        assert refused["status"] == "rate_limited"
        assert refused["retry_after_seconds"] == 3600 - 180
        clock.advance(refused["retry_after_seconds"] - 1)
        assert (await otp.issue(user="s"))["status"] == "rate_limited"
        clock.advance(1)
        assert (await otp.issue(user="s"))["status"] == "issued"


async def test_destination_cap_across_scopes(amqp_url: str, start_worker: WorkerFactory) -> None:
    clock = Clock()
    await start_worker(clock=clock, **STRICT)
    async with producer(amqp_url) as otp:
        target = {"channel": "sms", "destination": "+4915112345678"}
        for i in range(4):
            assert (await otp.issue(user=f"d{i}", **target))["status"] == "issued"
        assert (await otp.issue(user="d9", **target))["status"] == "rate_limited"
        assert (await otp.issue(user="d9", channel="sms", destination="+4915100000000"))[
            "status"
        ] == "issued"
        clock.advance(3600)
        assert (await otp.issue(user="d10", **target))["status"] == "issued"


async def test_failure_pause_and_its_clearing(amqp_url: str, start_worker: WorkerFactory) -> None:
    clock = Clock()
    await start_worker(clock=clock, reveal_clients="test-app", **STRICT)
    async with producer(amqp_url) as otp:
        for _ in range(4):
            assert (await otp.confirm(user="p", code="1"))["status"] == "not_found"
        clock.advance(30)
        issued = await otp.issue(user="p", reveal=True)  # four failures: not paused yet
        assert issued["status"] == "issued"
        assert (await otp.confirm(user="p", code=issued["code"]))["status"] == "confirmed"
        for _ in range(5):  # the success cleared the streak: five more to pause
            await otp.confirm(user="p", code="1")
        clock.advance(30)
        paused = await otp.issue(user="p")
        assert paused["status"] == "rate_limited"
        assert paused["retry_after_seconds"] == 3600 - 30
        assert (await otp.issue(user="p", client="other"))["status"] == "rate_limited"
        assert (await otp.issue(user="someone-else"))["status"] == "issued"
        clock.advance(3600 - 30)
        assert (await otp.issue(user="p"))["status"] == "issued"


async def test_retry_after_is_honest_in_real_time(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    # 5 s, not 1: a stall (an fsync, say) between the two issues must not outlast it.
    await start_worker(resend_cooldown_seconds=5)
    async with producer(amqp_url) as otp:
        assert (await otp.issue(user="rt"))["status"] == "issued"
        limited = await otp.issue(user="rt")
        assert limited["status"] == "rate_limited"
        assert 1 <= limited["retry_after_seconds"] <= 5
        await asyncio.sleep(limited["retry_after_seconds"])  # the promise is about wall time
        assert (await otp.issue(user="rt"))["status"] == "issued"


async def test_limits_hold_across_three_worker_processes(
    amqp_url: str, database_url: str, tmp_path: Path, spawn: Spawn
) -> None:
    env = worker_env(
        amqp_url,
        database_url,
        tmp_path / "var",
        OTP_MAX_SENDS_PER_SCOPE_PER_HOUR="5",
        OTP_MAX_SENDS_PER_DESTINATION_PER_HOUR="7",
        OTP_PREFETCH="8",
        OTP_BATCH_SIZE="4",
    )
    for n in range(3):
        spawn("worker", env, f"worker-{n}.log")
    await wait_until(
        lambda: all(
            "worker consuming" in (tmp_path / f"worker-{n}.log").read_text() for n in range(3)
        ),
        timeout=60,
    )
    async with producer(amqp_url) as otp:
        scope = [
            await otp.send(
                "code.issue",
                {"command_id": f"s{i}", "user": "one", "client": "a", "channel": "none"},
            )
            for i in range(40)
        ]
        destination = [
            await otp.send(
                "code.issue",
                {
                    "command_id": f"d{i}",
                    "user": f"u{i}",
                    "client": "a",
                    "channel": "email",
                    "destination": "victim@example.org",
                },
            )
            for i in range(40)
        ]
        scope_statuses = Counter(r["status"] for r in await gather_replies(scope))
        destination_statuses = Counter(r["status"] for r in await gather_replies(destination))
    assert scope_statuses == {"issued": 5, "rate_limited": 35}
    assert destination_statuses == {"issued": 7, "rate_limited": 33}
    for n in range(3):  # every process took part in the race
        assert "command handled" in (tmp_path / f"worker-{n}.log").read_text()


async def test_brute_force_counts_only_the_allowed_attempts_then_pauses_the_user(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    await start_worker(reveal_clients="test-app", max_consecutive_failures=20)
    async with producer(amqp_url) as otp, event_log(amqp_url, "code.*") as events:
        issued = await otp.issue(user="victim", reveal=True)
        guesses = [f"{n:06d}" for n in range(1000) if f"{n:06d}" != issued["code"]][:1000]
        futures = [
            await otp.send(
                "code.confirm",
                {"command_id": f"g{i}", "user": "victim", "client": "test-app", "code": guess},
            )
            for i, guess in enumerate(guesses)
        ]
        replies = await gather_replies(futures)
        counts = Counter(r["status"] for r in replies)
        assert counts["invalid"] == 4
        assert counts["locked"] == len(guesses) - 4
        assert sorted(r["attempts_left"] for r in replies if r["status"] == "invalid") == [
            1,
            2,
            3,
            4,
        ]
        assert (await otp.confirm(user="victim", code=issued["code"]))["status"] == "locked"
        paused = await otp.issue(user="victim")
        assert paused["status"] == "rate_limited"
        assert paused["retry_after_seconds"] > 3500
        await events.wait_for(lambda e: len(e.distinct("code.locked")) == 1)
        assert len(events.distinct("code.attempt_failed")) == 4


async def test_codes_survive_key_rotation(amqp_url: str, start_worker: WorkerFactory) -> None:
    old_delivery = Fernet.generate_key().decode()
    new_delivery = Fernet.generate_key().decode()
    old_secret, new_secret = "old-secret-key-0123456789", "new-secret-key-9876543210"
    before = await start_worker(
        secret_key=old_secret, delivery_key=old_delivery, reveal_clients="test-app"
    )
    async with producer(amqp_url) as otp, event_log(amqp_url, "code.issued") as events:
        issued = await otp.issue(user="r", reveal=True)
        other = await otp.issue(user="r2", reveal=True)
        await before.stop()
        after = await start_worker(
            secret_key=new_secret,
            secret_key_previous=old_secret,
            delivery_key=new_delivery,
            delivery_key_previous=old_delivery,
            reveal_clients="test-app",
        )
        resent = await otp.issue(user="r", reveal=True)
        assert (resent["code_id"], resent["code"]) == (issued["code_id"], issued["code"])
        await events.wait_for(lambda e: len(e.distinct()) == 3)
        assert (
            Sealer(new_delivery.encode()).unseal(events.bodies[-1]["sealed_code"]) == issued["code"]
        )
        assert (await otp.confirm(user="r", code=issued["code"]))["status"] == "confirmed"
        fresh = await otp.issue(user="r3", reveal=True)
        assert (await otp.confirm(user="r3", code=fresh["code"]))["status"] == "confirmed"
        await after.stop()
    await _confirm_after_forgetting_old_key(amqp_url, start_worker, other, new_secret, new_delivery)


async def test_the_destination_cap_outlives_a_key_rotation(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    old_secret, new_secret = "old-secret-key-0123456789", "new-secret-key-9876543210"
    before = await start_worker(secret_key=old_secret, **STRICT)
    cap = STRICT["max_sends_per_destination_per_hour"]
    async with producer(amqp_url) as otp:
        for n in range(cap):
            sent = await otp.issue(user=f"d{n}", channel="sms", destination="+4915112345678")
            assert sent["status"] == "issued"
        await before.stop()
        await start_worker(secret_key=new_secret, secret_key_previous=old_secret, **STRICT)
        refused = await otp.issue(user="d-next", channel="sms", destination="+4915112345678")
        assert refused["status"] == "rate_limited", refused
        other = await otp.issue(user="d-next", channel="sms", destination="+4915112345679")
        assert other["status"] == "issued"


async def _confirm_after_forgetting_old_key(
    amqp_url: str, start_worker: WorkerFactory, other: dict[str, Any], secret: str, delivery: str
) -> None:
    """Once the old key is dropped from the previous list, its codes no longer confirm."""
    await start_worker(secret_key=secret, delivery_key=delivery)
    async with producer(amqp_url) as otp:
        reply = await otp.confirm(user="r2", code=other["code"])
        assert reply["status"] in {"invalid", "locked"}


async def test_a_confirm_id_reused_for_another_user_is_rejected_and_counts_nothing(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    """The 2FA bypass: reusing the id of alice's successful confirm must not confirm mallory."""
    await start_worker(reveal_clients="test-app")
    async with producer(amqp_url) as otp, event_log(amqp_url) as events:
        alice = await otp.issue(user="alice", reveal=True)
        confirm = {"command_id": "c8", "user": "alice", "client": "test-app"}
        first = await otp.call("code.confirm", confirm | {"code": alice["code"]})
        assert first["status"] == "confirmed"
        await otp.issue(user="mallory", client="other")
        reused = await otp.call(
            "code.confirm",
            {"command_id": "c8", "user": "mallory", "client": "other", "code": "999999"},
        )
        assert reused["status"] == "rejected" and reused["command_id"] == "c8"
        assert reused["error"]["type"] == "command_id_reused"
        assert "code_id" not in reused and "alice" not in reused["error"]["message"]
        (dead,) = await drain_dead_letters(amqp_url)
        assert dead.headers[ERROR_TYPE_HEADER] == "command_id_reused"
        assert dead.headers[REDACTED_HEADER] == "code" and b"999999" not in dead.body
        # No attempt was counted on mallory's code, and alice's answer stands.
        wrong = await otp.confirm(user="mallory", client="other", code="000000")
        assert (wrong["status"], wrong["attempts_left"]) == ("invalid", 4)
        assert await otp.call("code.confirm", confirm | {"code": alice["code"]}) == first
        await events.wait_for(lambda e: len(e.distinct("code.attempt_failed")) == 1)
        assert len(events.distinct("code.confirmed")) == 1


async def test_an_issue_id_reused_by_a_client_not_allowed_to_reveal_gets_no_code(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    await start_worker(reveal_clients="test-app")
    async with producer(amqp_url) as otp:
        issue = {"command_id": "i-reveal", "user": "alice", "channel": "none"}
        first = await otp.call("code.issue", issue | {"client": "test-app", "reveal": True})
        assert first["status"] == "issued" and first["code"]
        reused = await otp.call("code.issue", issue | {"client": "not-listed"})
        assert reused["status"] == "rejected" and reused["command_id"] == "i-reveal"
        assert reused["error"]["type"] == "command_id_reused"
        assert "code" not in reused and "code_id" not in reused
        assert first["code"] not in orjson.dumps(reused).decode()
        (dead,) = await drain_dead_letters(amqp_url)
        assert dead.headers[ERROR_TYPE_HEADER] == "command_id_reused"
        # Nothing was issued in the other client's scope.
        fresh = await otp.issue(user="alice", client="not-listed")
        assert (fresh["status"], fresh["resent"]) == ("issued", False)


async def test_a_reused_id_sent_right_behind_its_first_use_is_rejected(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    """Usually one batch (tests/unit/test_handler.py pins that case): the first use wins."""
    await start_worker(reveal_clients="test-app")
    async with producer(amqp_url) as otp:
        issue = {"command_id": "one-batch", "user": "alice", "client": "test-app"}
        futures = [
            await otp.send("code.issue", issue | {"channel": "none", "reveal": True}),
            await otp.send("code.issue", issue | {"channel": "none", "user": "mallory"}),
            await otp.send("code.issue", issue | {"channel": "none", "reveal": True}),
        ]
        first, reused, repeat = await asyncio.wait_for(asyncio.gather(*futures), 15)
        assert first["status"] == "issued" and repeat == first
        assert reused["error"]["type"] == "command_id_reused" and "code" not in reused


async def test_a_repeat_after_rotating_the_secret_key_still_replays(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    old_secret, new_secret = "old-secret-key-0123456789", "new-secret-key-9876543210"
    delivery = Fernet.generate_key().decode()
    before = await start_worker(
        secret_key=old_secret, delivery_key=delivery, reveal_clients="test-app"
    )
    async with producer(amqp_url) as otp:
        issue = {"command_id": "rot-1", "user": "r", "client": "test-app", "channel": "none"}
        issued = await otp.call("code.issue", issue | {"reveal": True})
        confirm = {"command_id": "rot-2", "user": "r", "client": "test-app", "code": "x"}
        failed = await otp.call("code.confirm", confirm)
        assert (issued["status"], failed["status"]) == ("issued", "invalid")
        await before.stop()
        await start_worker(
            secret_key=new_secret,
            secret_key_previous=old_secret,
            delivery_key=delivery,
            reveal_clients="test-app",
        )
        assert await otp.call("code.issue", issue | {"reveal": True}) == issued
        assert await otp.call("code.confirm", confirm) == failed
        reused = await otp.call("code.confirm", confirm | {"code": "y"})
        assert reused["error"]["type"] == "command_id_reused"
