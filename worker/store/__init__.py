"""State stores behind one interface; ``open_store`` picks the backend from the URL."""

from __future__ import annotations

from worker.store.base import Store, TransientStoreError
from worker.store.urls import store_backend


async def open_store(
    url: str,
    *,
    synchronous: str = "FULL",
    cache_mib: int = 2,
    outbox_lease_seconds: float = 30.0,
    checkpoint_interval: float = 0.0,
) -> Store:
    if store_backend(url) == "sqlite":
        from worker.store.sqlite import SqliteStore

        return await SqliteStore.open(
            url,
            synchronous=synchronous,
            cache_mib=cache_mib,
            outbox_lease_seconds=outbox_lease_seconds,
            checkpoint_interval=checkpoint_interval,
        )
    from worker.store.postgres import PostgresStore

    store: Store = await PostgresStore.open(url, outbox_lease_seconds=outbox_lease_seconds)
    return store


__all__ = ["Store", "TransientStoreError", "open_store"]
