"""Message ids: well-formed random (version 4) UUIDs, never repeated."""

from __future__ import annotations

import uuid

from worker.amqp import new_message_id


def test_message_ids_are_version_4_uuids() -> None:
    for _ in range(2_000):
        text = new_message_id()
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_message_ids_do_not_repeat_and_use_every_random_bit() -> None:
    ids = [uuid.UUID(new_message_id()).int for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    seen_ones = 0
    seen_zeros = 0
    for value in ids:
        seen_ones |= value
        seen_zeros |= ~value
    fixed = (0xF << 76) | (0x3 << 62)  # the version and variant bits
    random_bits = ((1 << 128) - 1) & ~fixed
    assert seen_ones & random_bits == random_bits
    assert seen_zeros & random_bits == random_bits
