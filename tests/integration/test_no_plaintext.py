"""No plaintext code in the database files, the logs, any event or any dead letter."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aio_pika
import asyncpg

from contracts.topology import DEAD_LETTER_QUEUE
from tests.integration.test_faults import Spawn, wait_until
from tests.support import event_log, producer, worker_env


async def stored_bytes(database_url: str) -> bytes:
    """Everything the store holds. SQLite: its files (WAL and all). PostgreSQL: every column of
    every row of every table in the database, bytea as raw bytes (a cast to text would turn
    them into hex, hiding a plaintext code)."""
    if database_url.startswith("sqlite:///"):
        path = Path(database_url.removeprefix("sqlite:///"))
        return b"".join(p.read_bytes() for p in path.parent.glob(f"{path.name}*"))
    conn = await asyncpg.connect(database_url)
    try:
        tables = await conn.fetch(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_type = 'BASE TABLE' "
            "AND table_schema NOT IN ('pg_catalog', 'information_schema')"
        )
        assert {"codes", "replies", "outbox"} <= {t["table_name"] for t in tables}
        chunks = []
        for table in tables:
            name = f'"{table["table_schema"]}"."{table["table_name"]}"'
            for row in await conn.fetch(f"SELECT * FROM {name}"):  # noqa: S608 (catalog names)
                for value in row.values():
                    chunks.append(value if isinstance(value, bytes) else str(value).encode())
        return b"\n".join(chunks)
    finally:
        await conn.close()


async def test_codes_leave_no_trace(
    amqp_url: str, database_url: str, tmp_path: Path, spawn: Spawn
) -> None:
    env = worker_env(
        amqp_url,
        database_url,
        tmp_path / "var",
        OTP_REVEAL_CLIENTS="test-app",
        OTP_CODE_LENGTH="10",
        OTP_LOG_LEVEL="debug",
    )
    log_path = tmp_path / "worker.log"
    process = spawn("worker", env, "worker.log")
    await wait_until(lambda: "worker consuming" in log_path.read_text())
    codes: list[str] = []
    code_ids: list[str] = []
    async with producer(amqp_url) as otp, event_log(amqp_url) as events:
        for i in range(30):
            issued = await otp.issue(
                user=f"u{i}", reveal=True, channel="email", destination=f"person{i}@example.org"
            )
            codes.append(issued["code"])
            code_ids.append(issued["code_id"])
            resent = await otp.issue(
                user=f"u{i}", reveal=True, channel="sms", destination="+4915112345678"
            )
            assert resent["code"] == issued["code"]
            if i % 3 == 0:
                assert (await otp.confirm(user=f"u{i}", code=issued["code"]))[
                    "status"
                ] == "confirmed"
            elif i % 3 == 1:
                wrong = "0" * 10 if issued["code"] != "0" * 10 else "1" * 10
                assert (await otp.confirm(user=f"u{i}", code=wrong))["status"] == "invalid"
            # A malformed confirm carrying the right code ends in the dead letters.
            bad = await otp.call(
                "code.confirm",
                {
                    "command_id": f"bad-{i}",
                    "user": f"u{i}",
                    "client": "test-app",
                    "code": issued["code"],
                    "x": 1,
                },
            )
            assert bad["status"] == "rejected"
        await events.wait_for(lambda e: len(e.distinct("code.issued")) == 60)
        event_bytes = b"\n".join(m.body for m in events.messages)

    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    queue = await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
    dead = []
    while (message := await queue.get(fail=False, no_ack=True)) is not None:
        dead.append(message.body + repr(message.headers).encode())
    await connection.close()
    assert len(dead) == 30

    process.terminate()
    assert await asyncio.to_thread(process.wait, 30) == 0
    logs = log_path.read_bytes()
    stored = await stored_bytes(database_url)
    assert b"command handled" in logs
    assert all(code_id.encode() in stored for code_id in code_ids), "the search saw no rows"
    for code in codes:
        needle = code.encode()
        assert needle not in logs, "a code in the logs"
        assert needle not in stored, "a code in the store"
        assert needle not in event_bytes, "a code in an event"
        assert all(needle not in d for d in dead), "a code in a dead letter"
    for i in range(30):
        assert f"person{i}@example.org".encode() not in logs, "an unmasked destination"
    assert b"+4915112345678" not in logs


def test_the_suite_wide_log_audit_catches_leaks_and_ignores_lookalikes(tmp_path: Path) -> None:
    from tests.conftest import audit_log_files

    codes, destinations = {"482913"}, {"leak@example.org"}
    clean = tmp_path / "clean.txt"
    clean.write_text(
        '{"timestamp":"2026-11-25T17:47:16.482913Z","code_id":"a482913b-0000",'
        '"destination":"l***@example.org","count":"1482913"}\n'
    )
    assert audit_log_files([clean], codes, destinations) == []
    leaky = tmp_path / "leaky.txt"
    leaky.write_text('{"event":"oops","code":"482913"}\n{"to":"leak@example.org"}\n')
    assert len(audit_log_files([leaky], codes, destinations)) == 2
