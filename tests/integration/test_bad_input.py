"""Generated malformed commands: each is rejected clearly, dead-lettered, and the worker goes on."""

from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contracts.topology import (
    DEAD_LETTER_QUEUE,
    ERROR_TYPE_HEADER,
    REASON_HEADER,
    REDACTED_HEADER,
    ROUTING_KEY_HEADER,
)
from tests.conftest import WorkerFactory
from tests.support import producer

VALID = {
    "user": "mallory",
    "client": "test-app",
    "channel": "email",
    "destination": "m@example.org",
}
REQUIRED = ("command_id", "user", "client", "channel")
not_a_string = st.one_of(
    st.integers(), st.booleans(), st.none(), st.lists(st.integers(), max_size=2)
)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)


def dumps(value: object) -> bytes:
    return json.dumps(value).encode()


def malformed_bodies() -> st.SearchStrategy[bytes]:
    """Bodies that are no valid IssueCode, each for a different reason."""
    command_ids = st.uuids().map(str)
    with_id = command_ids.map(lambda cid: {**VALID, "command_id": cid})
    garbage = st.binary(max_size=80).filter(lambda b: not b.strip().startswith(b"{"))
    non_objects = st.recursive(
        json_scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=5
    ).map(dumps)
    extra_field = st.tuples(with_id, st.text(min_size=1, max_size=10), json_scalars).map(
        lambda t: dumps({**t[0], f"x_{t[1]}": t[2]})
    )
    missing_field = st.tuples(with_id, st.sampled_from(REQUIRED)).map(
        lambda t: dumps({k: v for k, v in t[0].items() if k != t[1]})
    )
    wrong_type = st.tuples(
        with_id, st.sampled_from(["user", "client", "channel", "destination"]), not_a_string
    ).map(lambda t: dumps({**t[0], t[1]: t[2]}))
    bad_destination = st.tuples(with_id, st.text(max_size=30).filter(lambda s: "@" not in s)).map(
        lambda t: dumps({**t[0], "destination": t[1]})
    )
    bad_ttl = st.tuples(
        with_id, st.one_of(st.integers(max_value=0), st.integers(min_value=901))
    ).map(lambda t: dumps({**t[0], "ttl_seconds": t[1]}))
    return st.one_of(
        garbage, non_objects, extra_field, missing_field, wrong_type, bad_destination, bad_ttl
    )


def generate(count: int) -> list[bytes]:
    found: list[bytes] = []

    @settings(
        max_examples=count * 2,
        database=None,
        suppress_health_check=list(HealthCheck),
        deadline=None,
    )
    @given(malformed_bodies())
    def collect(body: bytes) -> None:
        if body not in found:
            found.append(body)

    collect()
    return found[:count]


async def drain_dead_letters(url: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(url)
    messages = []
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            messages.append(message)
    finally:
        await connection.close()
    return messages


async def test_generated_malformed_commands(amqp_url: str, start_worker: WorkerFactory) -> None:
    bodies = generate(220)
    assert len(bodies) >= 200
    await start_worker()
    async with producer(amqp_url) as otp:
        futures = [await otp.send("code.issue", body) for body in bodies]
        replies = await asyncio.wait_for(asyncio.gather(*futures), 60)
        for body, reply in zip(bodies, replies, strict=True):
            assert reply["status"] == "rejected", body
            error = reply["error"]
            assert error["type"] in {"invalid_json", "validation_error", "too_large"}, body
            assert error["message"]
            if error["type"] == "validation_error":
                assert error["fields"] and all(f["loc"] and f["msg"] for f in error["fields"])
            data: Any = (
                orjson.loads(body) if body.startswith((b"{", b"[")) and _is_json(body) else None
            )
            if isinstance(data, dict) and isinstance(data.get("command_id"), str):
                assert reply["command_id"] == data["command_id"]
            else:
                assert reply["command_id"] is None
        dead = await drain_dead_letters(amqp_url)
        assert sorted(m.body for m in dead) == sorted(bodies)
        for message in dead:
            headers = message.headers
            assert headers[REASON_HEADER] and headers[ERROR_TYPE_HEADER]
            assert headers[ROUTING_KEY_HEADER] == "code.issue"
        assert (await otp.issue(user="still-here"))["status"] == "issued"


async def test_a_nul_character_is_rejected_alike_on_every_store(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    # PostgreSQL stores no NUL in text: the batch failed there, was split up, and the
    # command was parked as internal_error without a reply, while SQLite issued a code.
    await start_worker()
    fields = {"command_id": "nul\x00id", "user": "nul\x00user", "client": "nul\x00client"}
    async with producer(amqp_url) as otp:
        futures = [
            await otp.send("code.issue", {**VALID, "command_id": f"nul-{name}", name: value})
            for name, value in fields.items()
        ]
        replies = await asyncio.wait_for(asyncio.gather(*futures), 20)
        assert (await otp.issue(user="still-here"))["status"] == "issued"
    for name, reply in zip(fields, replies, strict=True):
        assert reply["status"] == "rejected"
        assert reply["error"]["type"] == "validation_error"
        assert [f["loc"] for f in reply["error"]["fields"]] == [name]
    dead = await drain_dead_letters(amqp_url)
    assert len(dead) == len(fields)
    assert {m.headers[ERROR_TYPE_HEADER] for m in dead} == {"validation_error"}


def _is_json(body: bytes) -> bool:
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return True


async def test_a_dead_lettered_confirm_never_carries_the_code(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    await start_worker()
    async with producer(amqp_url) as otp:
        body = {"command_id": "dl-1", "user": "u", "client": "c", "code": "424242", "extra": True}
        reply = await otp.call("code.confirm", body)
        assert reply["status"] == "rejected"
        assert reply["command_id"] == "dl-1"
        (dead,) = await drain_dead_letters(amqp_url)
        assert b"424242" not in dead.body
        assert orjson.loads(dead.body) == {**body, "code": "[redacted]"}
        assert dead.headers[REDACTED_HEADER] == "code"
        assert dead.correlation_id is not None and dead.reply_to == otp.reply_queue.name


BAD_CONFIRMS = {
    "not UTF-8": b'{"command_id":"bad-latin1","user":"J\xfcrgen","client":"c","code":"424242"}',
    "trailing comma": b'{"command_id":"bad-comma","user":"u","client":"c","code":"424242",}',
    "escaped key": b'{"\\u0063ode":"424242","command_id":"bad-escape","user":"u","client":"c",'
    b'"x":1}',
    "a list": b'[{"command_id":"bad-list","user":"u","client":"c","code":"424242"}]',
    "nested": b'{"command_id":"bad-nested","user":"u","client":"c","extra":{"code":"424242"}}',
    "a nested number": b'{"command_id":"bad-number","user":"u","client":"c",'
    b'"retry":{"code":424242}}',
}


def log_lines_from(path: Path, offset: int) -> list[dict[str, Any]]:
    """The in-process workers' JSON log lines written since ``offset``."""
    with path.open("rb") as stream:
        stream.seek(offset)
        return [orjson.loads(line) for line in stream.read().splitlines() if line.strip()]


async def wait_for_dead_letters(url: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    for _ in range(200):
        if parked := await drain_dead_letters(url):
            return parked
        await asyncio.sleep(0.05)
    return []


async def test_a_confirm_of_any_bad_shape_is_parked_without_its_code(
    amqp_url: str, start_worker: WorkerFactory, audited_logs: Path
) -> None:
    offset = audited_logs.stat().st_size
    await start_worker()
    async with producer(amqp_url) as otp:
        futures = [await otp.send("code.confirm", body) for body in BAD_CONFIRMS.values()]
        replies = await asyncio.wait_for(asyncio.gather(*futures), 30)
        assert [reply["status"] for reply in replies] == ["rejected"] * len(BAD_CONFIRMS)
        dead = await drain_dead_letters(amqp_url)
    assert len(dead) == len(BAD_CONFIRMS)
    for message in dead:
        assert b"424242" not in message.body, message.body
        assert message.headers[REDACTED_HEADER] == "code"
        assert message.headers[ERROR_TYPE_HEADER] in {"invalid_json", "validation_error"}
    # What is safe stays, for the operator: here the name the producer failed to encode.
    (latin1,) = [m for m in dead if b"bad-latin1" in m.body]
    assert latin1.body == BAD_CONFIRMS["not UTF-8"].replace(b"424242", b"[redacted]")
    # Each rejection's log line names its command, also when its body was no JSON object.
    lines = log_lines_from(audited_logs, offset)
    rejected = {line.get("command_id") for line in lines if line["event"] == "command rejected"}
    assert rejected == {
        "bad-latin1",
        "bad-comma",
        "bad-escape",
        "bad-list",
        "bad-nested",
        "bad-number",
    }
    assert "424242" not in json.dumps(lines)


async def test_a_command_that_breaks_the_parser_is_parked_redacted_and_named(
    amqp_url: str,
    start_worker: WorkerFactory,
    audited_logs: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("worker.consumer.parse_command", broken)
    offset = audited_logs.stat().st_size
    await start_worker()
    async with producer(amqp_url) as otp:
        await otp.send("code.confirm", BAD_CONFIRMS["not UTF-8"])
        (dead,) = await wait_for_dead_letters(amqp_url)
    assert dead.body == BAD_CONFIRMS["not UTF-8"].replace(b"424242", b"[redacted]")
    assert dead.headers[REDACTED_HEADER] == "code"
    assert dead.headers[ERROR_TYPE_HEADER] == "internal_error"
    lines = log_lines_from(audited_logs, offset)
    (failed,) = [line for line in lines if line["event"] == "parsing a command failed unexpectedly"]
    assert failed["command_id"] == "bad-latin1"
    assert "424242" not in json.dumps(lines)


def park_failing_once(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[str]:
    """Makes ``module.park`` fail its first call (the broker gone) and work after; returns
    the list of calls, for the test to count."""
    calls: list[str] = []
    real_park = module.park

    async def park_once_failing(*args: Any, **kwargs: Any) -> None:
        calls.append("park")
        if len(calls) == 1:
            raise ConnectionError("broker gone")
        await real_park(*args, **kwargs)

    monkeypatch.setattr(module, "park", park_once_failing)
    return calls


async def test_a_rejection_that_cannot_be_parked_is_named_and_retried(
    amqp_url: str,
    start_worker: WorkerFactory,
    audited_logs: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker import consumer

    calls = park_failing_once(monkeypatch, consumer)
    offset = audited_logs.stat().st_size
    await start_worker()
    async with producer(amqp_url) as otp:
        reply = await otp.call("code.confirm", BAD_CONFIRMS["trailing comma"])
        assert reply["status"] == "rejected"
        (dead,) = await drain_dead_letters(amqp_url)
    assert b"424242" not in dead.body and calls == ["park", "park"]
    lines = log_lines_from(audited_logs, offset)
    (failed,) = [
        line
        for line in lines
        if line["event"] == "could not dead-letter a rejected command; requeueing it"
    ]
    assert failed["command_id"] == "bad-comma"
    assert "424242" not in json.dumps(lines)


async def exhaust_delivery_limit(amqp_url: str, body: bytes) -> None:
    """Publishes a confirm and fails it on every delivery, until the broker gives up."""
    from contracts.topology import (
        COMMAND_DELIVERY_LIMIT,
        COMMAND_QUEUE_SPEC,
        DEAD_LETTERS,
        UNDELIVERABLE,
    )
    from worker.amqp import declare_exchanges, declare_queue

    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    await declare_exchanges(channel)
    await declare_queue(channel, DEAD_LETTERS)
    await declare_queue(channel, UNDELIVERABLE)
    queue = await declare_queue(channel, COMMAND_QUEUE_SPEC)
    exchange = await channel.get_exchange("otp.commands")
    await exchange.publish(aio_pika.Message(body), routing_key="code.confirm")
    deliveries = 0
    while (message := await queue.get(fail=False, timeout=5)) is not None:
        deliveries += 1
        await message.nack(requeue=True)
    await connection.close()
    assert deliveries == COMMAND_DELIVERY_LIMIT + 1


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"command_id":"doomed","user":"u","client":"c","code":"818181"}',
            b'{"command_id":"doomed","user":"u","client":"c","code":"[redacted]"}',
        ),
        (
            b'{"command_id":"doomed","user":"u","client":"c","code":"818181",}',
            b'{"command_id":"doomed","user":"u","client":"c","code":"[redacted]",}',
        ),
    ],
    ids=["json", "not json"],
)
async def test_a_command_that_keeps_failing_is_parked_redacted(
    amqp_url: str, start_worker: WorkerFactory, body: bytes, expected: bytes
) -> None:
    """After the delivery limit the broker gives up on a command; it still reaches the
    dead letters through the worker, with the candidate code redacted."""
    await exhaust_delivery_limit(amqp_url, body)
    await start_worker()
    (dead,) = await wait_for_dead_letters(amqp_url)
    assert dead.body == expected
    assert dead.headers[REDACTED_HEADER] == "code"
    assert dead.headers[ERROR_TYPE_HEADER] == "delivery_limit"
    assert dead.headers[ROUTING_KEY_HEADER] == "code.confirm"


async def test_an_undeliverable_command_that_cannot_be_parked_is_named(
    amqp_url: str,
    start_worker: WorkerFactory,
    audited_logs: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker import parking

    calls = park_failing_once(monkeypatch, parking)
    await exhaust_delivery_limit(amqp_url, BAD_CONFIRMS["trailing comma"])
    offset = audited_logs.stat().st_size
    await start_worker()
    (dead,) = await wait_for_dead_letters(amqp_url)
    assert b"424242" not in dead.body and calls == ["park", "park"]
    lines = log_lines_from(audited_logs, offset)
    (failed,) = [line for line in lines if line["event"].startswith("could not park")]
    assert failed["command_id"] == "bad-comma"
    assert "424242" not in json.dumps(lines)


async def test_a_compressed_confirm_is_parked_as_the_mark_alone(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    """gzip hides the digits from any scrubbing: the whole body goes, and its encoding."""
    await start_worker()
    body = gzip.compress(b'{"command_id":"gz-1","user":"u","client":"c","code":"424242"}')
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange("otp.commands", ensure=False)
        await exchange.publish(
            aio_pika.Message(body, content_type="application/json", content_encoding="gzip"),
            routing_key="code.confirm",
        )
    finally:
        await connection.close()
    (parked,) = await wait_for_dead_letters(amqp_url)
    assert parked.body == b"[redacted]"
    assert parked.content_encoding is None
    assert parked.headers[REDACTED_HEADER] == "code"
