"""The broker-side backoff schedule: each retry tier waits BACKOFF_FACTOR times the one before."""

from __future__ import annotations

from itertools import pairwise

from contracts.topology import NOTIFIER_QUEUE
from worker.notifier.retry import (
    BACKOFF_FACTOR,
    MAX_DELAY_MS,
    claim_wait_spec,
    delay_ms,
    retry_queue_specs,
)


def ttls(max_attempts: int, base_seconds: float) -> list[int]:
    specs = retry_queue_specs(max_attempts, base_seconds)
    return [int(specs[failed].arguments["x-message-ttl"]) for failed in sorted(specs)]


def test_each_tier_waits_the_factor_longer_than_the_one_before() -> None:
    assert BACKOFF_FACTOR > 1
    schedule = ttls(5, 1.0)
    assert schedule == [1_000, 5_000, 25_000, 125_000]
    assert all(later == BACKOFF_FACTOR * earlier for earlier, later in pairwise(schedule))


def test_the_base_scales_the_whole_schedule() -> None:
    assert ttls(4, 0.05) == [50, 250, 1_250]
    assert delay_ms(3, 2.0) == 2 * delay_ms(3, 1.0)


def test_delays_stop_growing_at_the_cap() -> None:
    assert delay_ms(20, 1.0) == MAX_DELAY_MS
    assert ttls(20, 1.0)[-1] == MAX_DELAY_MS
    assert delay_ms(1, 0.000_001) == 1  # a TTL of 0 would expire at once: never below 1 ms


def test_every_tier_is_its_own_queue_and_leads_back_to_the_notifier() -> None:
    specs = retry_queue_specs(5, 1.0)
    assert sorted(specs) == [1, 2, 3, 4]  # no tier after the last attempt: that one fails
    assert len({spec.name for spec in specs.values()}) == len(specs)
    for spec in specs.values():
        assert spec.arguments["x-dead-letter-exchange"] == ""
        assert spec.arguments["x-dead-letter-routing-key"] == NOTIFIER_QUEUE
        assert spec.name.endswith(f".{spec.arguments['x-message-ttl']}ms")
    assert retry_queue_specs(1, 1.0) == {}
    assert claim_wait_spec(1.0) == specs[1]
