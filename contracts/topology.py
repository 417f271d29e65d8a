"""Every broker name of the contract, spelled once.

The worker and the notifier declare from these objects; tests, the client and the deploy
files read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

COMMANDS_EXCHANGE = "otp.commands"
EVENTS_EXCHANGE = "otp.events"
DEAD_LETTER_EXCHANGE = "otp.dead-letter"
DEAD_LETTER_QUEUE = "otp.dead-letter"

ISSUE_ROUTING_KEY = "code.issue"
CONFIRM_ROUTING_KEY = "code.confirm"
COMMAND_ROUTING_KEYS = (ISSUE_ROUTING_KEY, CONFIRM_ROUTING_KEY)

# Queues the contract leaves to the implementation.
COMMAND_QUEUE = "otp.worker.commands"
# Where the broker puts a command that reached its delivery limit: the worker parks it in
# otp.dead-letter itself, so a confirm's code is redacted even then.
UNDELIVERABLE_QUEUE = "otp.worker.undeliverable"
NOTIFIER_QUEUE = "otp.notifier.code-issued"
NOTIFIER_RETRY_QUEUE_PREFIX = "otp.notifier.retry"
# Event subscribers' queues (the client's own included): the deploy files' otp-subscriber
# user may declare and read these and no others, and no other role may read them.
SUBSCRIBER_QUEUE_PREFIX = "otp.subscriber."

# Headers the service sets on a dead-lettered command.
REASON_HEADER = "x-otp-reason"
ERROR_TYPE_HEADER = "x-otp-error-type"
ROUTING_KEY_HEADER = "x-otp-routing-key"
REDACTED_HEADER = "x-otp-redacted"
# Set by `otp dead-letters replay`: how often a command came back from the dead letters.
REPLAYS_HEADER = "x-otp-replays"

MAX_BODY_BYTES = 64 * 1024
COMMAND_DELIVERY_LIMIT = 10

ExchangeType = Literal["direct", "topic", "fanout"]


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    type: ExchangeType
    durable: bool = True


@dataclass(frozen=True)
class QueueSpec:
    name: str
    bindings: tuple[tuple[str, str], ...] = ()
    arguments: dict[str, Any] = field(default_factory=dict)
    durable: bool = True
    adopt_existing: bool = False
    """Use the queue as it is when it already exists with other arguments, instead of
    failing: for a queue that others may declare too."""


COMMANDS = ExchangeSpec(COMMANDS_EXCHANGE, "direct")
EVENTS = ExchangeSpec(EVENTS_EXCHANGE, "topic")
DEAD_LETTER = ExchangeSpec(DEAD_LETTER_EXCHANGE, "fanout")

# Plain durable, as the contract names it, so a foreign client's plain declare matches ours.
# One left by earlier versions (a quorum queue) or declared otherwise by someone else is used
# as it is: it holds dead letters, and nobody should have to delete it for us to start.
DEAD_LETTERS = QueueSpec(
    DEAD_LETTER_QUEUE,
    bindings=((DEAD_LETTER_EXCHANGE, ""),),
    adopt_existing=True,
)

COMMAND_QUEUE_SPEC = QueueSpec(
    COMMAND_QUEUE,
    bindings=tuple((COMMANDS_EXCHANGE, key) for key in COMMAND_ROUTING_KEYS),
    arguments={
        "x-queue-type": "quorum",
        "x-delivery-limit": COMMAND_DELIVERY_LIMIT,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": UNDELIVERABLE_QUEUE,
    },
)

UNDELIVERABLE = QueueSpec(UNDELIVERABLE_QUEUE, arguments={"x-queue-type": "quorum"})

EXCHANGES = (COMMANDS, EVENTS, DEAD_LETTER)


def event_routing_key(event_name: str) -> str:
    """Events are routed by their own name, e.g. ``code.issued``."""
    return event_name
