"""State stores behind one interface; ``open_store`` picks the backend from the URL."""

from __future__ import annotations

from worker.store.base import Store, TransientStoreError
from worker.store.urls import backend_of


async def open_store(
    url: str,
    *,
    synchronous: str = "FULL",
    cache_mib: int = 2,
    outbox_lease_seconds: float = 30.0,
) -> Store:
    backend = backend_of(url)
    if backend == "sqlite":
        from worker.store.sqlite import SqliteStore

        return await SqliteStore.open(
            url,
            synchronous=synchronous,
            cache_mib=cache_mib,
            outbox_lease_seconds=outbox_lease_seconds,
        )
    if backend == "postgresql":
        from worker.store.postgres import PostgresStore

        store: Store = await PostgresStore.open(url, outbox_lease_seconds=outbox_lease_seconds)
        return store
    raise ValueError(f"unsupported database URL scheme: {url.split(':', 1)[0]!r}")


__all__ = ["Store", "TransientStoreError", "open_store"]
