"""``OTP_REVEAL_BROKER_USERS``: a reveal only for commands the broker says a listed user sent.

The ``client`` field is the producer's to choose; the ``user_id`` property is checked by the
broker against the publishing connection's login, so it is what a reveal can be tied to.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from aiormq.exceptions import ChannelPreconditionFailed
from structlog.testing import capture_logs

from contracts.client import OtpBrokerUserRefused, OtpClient
from contracts.topology import COMMANDS_EXCHANGE, ERROR_TYPE_HEADER
from tests.conftest import WorkerFactory
from tests.integration.test_bad_input import drain_dead_letters
from tests.integration.test_cli import assert_one_error_line, cli_env, otp
from tests.support import AUDIT, broker_user, producer


def reveal_command(user: str) -> dict[str, Any]:
    return {
        "command_id": str(uuid.uuid4()),
        "user": user,
        "client": "test-app",
        "channel": "none",
        "reveal": True,
    }


@pytest.fixture
async def listed_user(amqp_url: str, start_worker: WorkerFactory) -> AsyncIterator[tuple[str, str]]:
    """A broker user of its own (name, URL) and a worker that lets only it reveal."""
    with broker_user(amqp_url) as (name, url):
        await start_worker(reveal_clients="test-app", reveal_broker_users=name)
        yield name, url


async def test_only_a_listed_broker_user_gets_the_code(
    amqp_url: str, listed_user: tuple[str, str]
) -> None:
    async with producer(amqp_url) as guest:
        for user_id in (None, "guest"):
            sent = await guest.send("code.issue", reveal_command("alice"), user_id=user_id)
            refused = await asyncio.wait_for(sent, 15)
            assert refused["status"] == "rejected", refused
            assert refused["error"]["type"] == "reveal_not_permitted"
            assert f"user_id: {user_id!r}" in refused["error"]["message"]
            assert "code" not in refused
        plain = await guest.issue(user="alice")  # no reveal: any producer, as before
        assert plain["status"] == "issued" and "code" not in plain
    async with OtpClient.connect(listed_user[1]) as otp:
        issued = await otp.issue(user="bob", client="test-app", channel="none", reveal=True)
        assert issued.status == "issued" and issued.code is not None
        AUDIT.codes.add(issued.code)
        confirmed = await otp.confirm(user="bob", client="test-app", code=issued.code)
        assert confirmed.status == "confirmed"
        other = await otp.issue(user="carol", client="other-app", channel="none", reveal=True)
        assert other.status == "rejected" and other.error is not None
        assert other.error.type == "reveal_not_permitted"
    # The worker parks them under its own login: a copy that kept the publisher's user_id
    # would be refused by the broker, and the command requeued for ever.
    parked = await drain_dead_letters(amqp_url)
    assert [m.headers[ERROR_TYPE_HEADER] for m in parked] == ["reveal_not_permitted"] * 3
    assert [m.user_id for m in parked] == [None] * 3


@pytest.mark.parametrize("broker_users", ["", "svc-qa"])
async def test_reveal_on_the_client_field_alone_is_warned_about_at_start(
    start_worker: WorkerFactory, broker_users: str
) -> None:
    with capture_logs() as logs:
        await start_worker(reveal_clients="test-app", reveal_broker_users=broker_users)
    warned = [e for e in logs if e["event"].startswith("reveal is allowed on the client field")]
    assert [e["reveal_clients"] for e in warned] == ([] if broker_users else [["test-app"]])


async def test_no_reveal_no_warning(start_worker: WorkerFactory) -> None:
    with capture_logs() as logs:
        await start_worker()
    assert not [e for e in logs if e["event"].startswith("reveal")]
    assert [e for e in logs if e["event"] == "worker consuming"]


async def test_the_broker_refuses_a_user_id_that_is_not_the_publishers(
    amqp_url: str, listed_user: tuple[str, str]
) -> None:
    """What the setting rests on: guest cannot publish as the listed user."""
    async with producer(amqp_url) as guest:
        forged = aio_pika.Message(
            orjson.dumps(reveal_command("mallory")),
            content_type="application/json",
            reply_to=guest.reply_queue.name,
            user_id=listed_user[0],
        )
        channel = await guest.connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(COMMANDS_EXCHANGE, ensure=False)
        with pytest.raises(ChannelPreconditionFailed, match="user_id"):
            await exchange.publish(forged, routing_key="code.issue", timeout=15)
        assert guest.reply_messages == []


async def test_a_named_broker_user_is_sent_and_a_wrong_one_refused_in_one_clear_error(
    amqp_url: str, listed_user: tuple[str, str]
) -> None:
    """``broker_user=`` is for ``auth=external``, where the URL has no login. With a plain
    login only that login is valid, so naming another user over guest's connection shows both
    that the name is what gets sent (the URL's login would get ``reveal_not_permitted``) and
    how a wrong one ends."""
    async with OtpClient.connect(amqp_url, broker_user=listed_user[0], timeout=5) as otp:
        with pytest.raises(OtpBrokerUserRefused, match=listed_user[0]) as refused:
            await otp.issue(
                user="mallory", client="test-app", channel="none", reveal=True, retries=2
            )
        assert "guest" in str(refused.value)
        # The channel the broker closed is reopened: the client goes on working.
        plain = await otp.issue(user="mallory", client="test-app", channel="none")
        assert plain.status == "issued" and plain.code is None


async def test_the_cli_names_its_broker_user_and_reports_a_wrong_one_in_one_line(
    amqp_url: str, listed_user: tuple[str, str], tmp_path: Path
) -> None:
    scope = ("--user", "dave", "--client", "test-app", "--reveal", "--json")
    named = ("--broker-user", listed_user[0])
    issued = await otp("issue", *scope, *named, env=cli_env(listed_user[1]), cwd=tmp_path)
    assert issued.rc == 0, issued
    assert json.loads(issued.out)["code"].isdigit()

    refused = await otp("issue", *scope, *named, env=cli_env(amqp_url), cwd=tmp_path)
    assert_one_error_line(refused, 1, "otp: the broker refused 'code.issue'")
    assert f"user_id '{listed_user[0]}'" in refused.err
    assert "authenticated user was 'guest'" in refused.err
