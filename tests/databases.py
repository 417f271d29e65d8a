"""Test databases for both backends: a file per test for SQLite, a fresh database per test for
PostgreSQL (CREATE DATABASE from template0 takes ~30 ms here, so isolation costs little).

``OTP_TEST_BACKENDS`` (comma-separated, default ``sqlite,postgresql``) narrows the matrix on a
machine without PostgreSQL; ``OTP_TEST_POSTGRES_BASE`` points at the server.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg

POSTGRES_BASE = os.environ.get("OTP_TEST_POSTGRES_BASE", "postgresql://postgres@127.0.0.1:5432")
BACKENDS = [b.strip() for b in os.environ.get("OTP_TEST_BACKENDS", "sqlite,postgresql").split(",")]
_numbers = itertools.count()


@asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    """A database nobody else uses, dropped (connections and all) afterwards."""
    name = f"otp_test_{os.getpid()}_{next(_numbers)}"
    admin = await asyncpg.connect(f"{POSTGRES_BASE}/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        try:
            yield f"{POSTGRES_BASE}/{name}"
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@asynccontextmanager
async def temporary_database(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'otp.db'}"
        return
    async with postgres_database() as url:
        yield url
