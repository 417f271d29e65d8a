"""``otp check``: the few facts that say whether the service can take commands right now.

Each check runs even when an earlier one failed (a broken store is worth knowing about while
the broker is down too), with a timeout, and reports one line. "Worker consuming" is asked of
the broker (the command queue's consumer count from a passive declare), not of a process: it
is what a producer depends on, wherever the workers run.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass

from contracts.client import connect_once
from contracts.topology import COMMAND_QUEUE
from worker.store.probe import probe_store


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"

    def as_json(self) -> dict[str, object]:
        return asdict(self)


async def run_checks(
    amqp_url: str, database_url: str, *, max_backlog: int, timeout: float
) -> list[Check]:
    return [
        *await _broker_checks(amqp_url, timeout),
        *await _store_checks(database_url, max_backlog, timeout),
    ]


async def _broker_checks(url: str, timeout: float) -> list[Check]:
    try:
        connection = await connect_once(url, timeout)
    except Exception as exc:
        return [
            Check("broker reachable", False, describe(exc)),
            Check("worker consuming", False, "unknown: the broker is unreachable"),
        ]
    try:
        checks = [Check("broker reachable", True, "connected")]
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(COMMAND_QUEUE, passive=True, timeout=timeout)
            consumers = queue.declaration_result.consumer_count or 0
            waiting = queue.declaration_result.message_count or 0
            checks.append(
                Check(
                    "worker consuming",
                    consumers >= 1,
                    f"{COMMAND_QUEUE} has {consumers} consumer(s), {waiting} waiting",
                )
            )
        except Exception as exc:
            checks.append(Check("worker consuming", False, f"{COMMAND_QUEUE}: {describe(exc)}"))
        return checks
    finally:
        await connection.close()


async def _store_checks(url: str, max_backlog: int, timeout: float) -> list[Check]:
    """Through a read-only probe, never ``open_store``: that one would create a missing
    SQLite database and migrate any schema, and then report the store it had just made."""
    try:
        store = await asyncio.wait_for(probe_store(url), timeout)
    except Exception as exc:
        return [
            Check("store reachable", False, describe(exc)),
            Check("outbox backlog", False, "unknown: the store is unreachable"),
        ]
    try:
        checks = [
            Check(
                "store reachable", True, f"{store.backend}, schema version {store.schema_version}"
            )
        ]
        try:
            backlog = await asyncio.wait_for(store.outbox_backlog(), timeout)
            checks.append(
                Check(
                    "outbox backlog",
                    backlog <= max_backlog,
                    f"{backlog} event(s) waiting (bound {max_backlog})",
                )
            )
        except Exception as exc:
            checks.append(Check("outbox backlog", False, describe(exc)))
        return checks
    finally:
        await store.close()


def describe(exc: BaseException) -> str:
    """One line for any error: its message, or its type when it has none."""
    text = " ".join(str(exc).split())
    if isinstance(exc, TimeoutError) and not text:
        return "timed out"
    return text or type(exc).__name__
