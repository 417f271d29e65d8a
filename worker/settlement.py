"""Acknowledging a batch of deliveries with as few frames as possible, safely."""

from __future__ import annotations

from collections.abc import Sequence

from aio_pika.abc import AbstractIncomingMessage

from worker.log import get_logger

log = get_logger(__name__)


class Settlement:
    """Acks and requeues of one batch, sent once it is done: requeues first, then one
    ``multiple`` ack per channel covering everything delivered up to its last tag.

    Batches leave the inbox in delivery order and are settled in that order, so every
    earlier delivery on a channel is already settled when a batch's multiple ack goes out.
    """

    def __init__(self) -> None:
        self._acks: list[AbstractIncomingMessage] = []
        self._requeues: list[AbstractIncomingMessage] = []

    def ack(self, message: AbstractIncomingMessage) -> None:
        self._acks.append(message)

    def requeue(self, message: AbstractIncomingMessage) -> None:
        self._requeues.append(message)

    async def flush(self) -> None:
        await requeue_all(self._requeues)
        last_by_channel: dict[int, AbstractIncomingMessage] = {}
        for message in self._acks:
            held = last_by_channel.get(id(message.channel))
            if held is None or (message.delivery_tag or 0) > (held.delivery_tag or 0):
                last_by_channel[id(message.channel)] = message
        for message in last_by_channel.values():
            try:
                await message.ack(multiple=True)
            except Exception as exc:  # channel gone: the broker redelivers, replies are replayed
                log.info(
                    "acks lost with their channel; commands will be redelivered", error=repr(exc)
                )
        self._acks.clear()
        self._requeues.clear()


async def requeue_all(messages: Sequence[AbstractIncomingMessage]) -> None:
    for message in messages:
        try:
            await message.nack(requeue=True)
        except Exception as exc:
            log.info("requeue lost with its channel; the broker redelivers", error=repr(exc))
