"""Broker-side backoff: one delay queue per retry tier, dead-lettering back to the notifier.

A failed delivery is parked in the tier's queue with its original body (which only carries the
sealed code); when the queue's TTL runs out the broker routes it back to the notifier queue.
The consumer never sleeps, so a slow retry never holds a prefetch slot. The delay is part of
the queue's name, because RabbitMQ refuses to redeclare a queue with a different TTL. A copy of
an event that another notifier process is delivering right now waits in the first tier too,
without spending an attempt.
"""

from __future__ import annotations

from contracts.topology import (
    DEAD_LETTER_EXCHANGE,
    EVENTS_EXCHANGE,
    NOTIFIER_QUEUE,
    NOTIFIER_RETRY_QUEUE_PREFIX,
    QueueSpec,
    event_routing_key,
)

ATTEMPT_HEADER = "x-otp-attempt"
BACKOFF_FACTOR = 5
MAX_DELAY_MS = 3_600_000
NOTIFIER_DELIVERY_LIMIT = 20

NOTIFIER_QUEUE_SPEC = QueueSpec(
    NOTIFIER_QUEUE,
    bindings=((EVENTS_EXCHANGE, event_routing_key("code.issued")),),
    arguments={
        "x-queue-type": "quorum",
        "x-delivery-limit": NOTIFIER_DELIVERY_LIMIT,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
    },
)


def delay_ms(failed_attempt: int, base_seconds: float) -> int:
    """1 s, 5 s, 25 s, 2 min … for base 1 s: roughly the shape of a mail server's own retries."""
    raw: float = base_seconds * 1000 * BACKOFF_FACTOR ** (failed_attempt - 1)
    return max(1, min(MAX_DELAY_MS, round(raw)))


def retry_queue_name(delay: int) -> str:
    return f"{NOTIFIER_RETRY_QUEUE_PREFIX}.{delay}ms"


def delay_queue_spec(delay: int) -> QueueSpec:
    return QueueSpec(
        retry_queue_name(delay),
        arguments={
            "x-queue-type": "classic",
            "x-message-ttl": delay,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": NOTIFIER_QUEUE,
        },
    )


def retry_queue_specs(max_attempts: int, base_seconds: float) -> dict[int, QueueSpec]:
    """The tier for each failed attempt that may still be retried (1 to max_attempts - 1)."""
    return {
        failed: delay_queue_spec(delay_ms(failed, base_seconds))
        for failed in range(1, max_attempts)
    }


def claim_wait_spec(base_seconds: float) -> QueueSpec:
    """Where a copy waits while another notifier holds the event's claim: the first tier's
    queue (declared even when no retries are configured), so it adds no queue of its own."""
    return delay_queue_spec(delay_ms(1, base_seconds))
