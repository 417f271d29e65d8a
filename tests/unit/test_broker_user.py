"""Which broker user a client's reveal commands name in ``user_id``."""

from __future__ import annotations

import pytest
from aio_pika.connection import make_url

from contracts.client import broker_user_of


@pytest.mark.parametrize(
    ("url", "user"),
    [
        ("amqp://svc-qa:secret@broker:5672/otp", "svc-qa"),
        ("amqp://svc%40qa:secret@broker/", "svc@qa"),
        ("amqp://broker/", "guest"),
        ("amqps://svc-qa:secret@broker/?auth=plain", "svc-qa"),
        ("amqps://svc-qa@broker/?auth=external", None),
        ("amqps://broker/?auth=EXTERNAL", None),
    ],
)
def test_the_login_aiormq_sends_or_none_when_the_broker_names_the_user(
    url: str, user: str | None
) -> None:
    assert broker_user_of(make_url(url)) == user
