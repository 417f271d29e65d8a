"""Fills a migrated SQLite store with N codes, fast, shaped exactly like the worker's rows.

What goes in (say it in the report): per code one ``codes`` row and one ``replies`` row (the
idempotency record of the issue command that created it); a ``sends`` row only for codes
issued in the last hour, as the sweeper keeps that table to the rate-limit window. Issue times
are spread over the past 12 hours (inside every retention, so the sweeper deletes nothing
during the run); codes last 300 s, so most are expired, some confirmed or locked. Users are
random strings, so rows land in random key order, as organic traffic would put them, and
the runs' own keys (``scenarios.spread``) fall among them, not beside them.

Digests are real HMACs under the run's secret key; sealed codes are real Fernet tokens, taken
from a pool of 1,000 (sealing a million costs ~30 s and changes nothing the store sees).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import secrets
import sqlite3
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import orjson
from cryptography.fernet import Fernet

from worker.domain.codes import key_id_of
from worker.domain.model import Scope
from worker.store.keys import scope_key

CHUNK = 50_000
SPREAD_SECONDS = 12 * 3600
TTL_SECONDS = 300


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _rows(
    count: int, secret: bytes, delivery_key: bytes, client: str, now: float
) -> Iterator[tuple[list[tuple[object, ...]], list[tuple[object, ...]], list[tuple[object, ...]]]]:
    rng = random.Random(secrets.randbits(64))
    fernet = Fernet(delivery_key)
    pool = [fernet.encrypt(f"{rng.randrange(10**6):06d}".encode()).decode() for _ in range(1000)]
    key_id = key_id_of(secret)
    states = ["confirmed"] * 6 + ["active"] * 3 + ["locked"]
    window_start = now - 3600
    done = 0
    while done < count:
        codes, replies, sends = [], [], []
        for _ in range(min(CHUNK, count - done)):
            user = f"{secrets.token_hex(8)}-stored"  # spread like the runs' users
            skey = scope_key(Scope(user, client, "login"))
            code_id = str(uuid.uuid4())
            code = f"{rng.randrange(10**6):06d}"
            digest = hmac.new(secret, f"{code_id}\x00{code}".encode(), hashlib.sha256).digest()
            issued = now - rng.random() * SPREAD_SECONDS
            expires = issued + TTL_SECONDS
            state = rng.choice(states)
            attempts = 0 if state == "active" else (5 if state == "locked" else rng.randint(1, 3))
            codes.append(
                (
                    skey,
                    user,
                    client,
                    "login",
                    code_id,
                    key_id,
                    digest,
                    rng.choice(pool),
                    issued,
                    expires,
                    attempts,
                    state,
                )
            )
            command_id = str(uuid.uuid4())
            reply = orjson.dumps(
                {
                    "command_id": command_id,
                    "status": "issued",
                    "code_id": code_id,
                    "expires_at": _iso(expires),
                    "resent": False,
                }
            )
            # A keyed fingerprint of the command, as the worker keeps with each reply.
            fingerprint = hmac.new(secret, command_id.encode(), hashlib.sha256).digest()
            replies.append(("issue", command_id, reply, fingerprint, issued))
            if issued > window_start:
                sends.append((skey, None, issued))
        done += len(codes)
        yield codes, replies, sends


def fill(
    path: str, count: int, secret: bytes, delivery_key: bytes, client: str
) -> dict[str, float]:
    """Inserts ``count`` codes into the already-migrated database at ``path``."""
    started = time.perf_counter()
    db = sqlite3.connect(path, isolation_level=None)
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"codes", "replies", "sends"} <= tables:
            raise RuntimeError(f"{path} is not migrated (tables: {sorted(tables)})")
        # A throwaway database: no journal, no fsync while filling; WAL again afterwards.
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA cache_size=-1048576")  # 1 GiB: random-order inserts stay in memory
        db.execute("BEGIN")
        sends_total = 0
        for codes, replies, sends in _rows(count, secret, delivery_key, client, time.time()):
            db.executemany(f"INSERT INTO codes VALUES ({','.join('?' * 12)})", codes)  # noqa: S608
            db.executemany(
                "INSERT INTO replies (kind, command_id, reply, fingerprint, created_at) "
                "VALUES (?,?,?,?,?)",
                replies,
            )
            db.executemany(
                "INSERT INTO sends (scope_key, destination_key, sent_at) VALUES (?,?,?)", sends
            )
            sends_total += len(sends)
        db.execute("COMMIT")
        db.execute("PRAGMA journal_mode=WAL")
        stored = db.execute("SELECT count(*) FROM codes").fetchone()[0]
    finally:
        db.close()
    filled = time.perf_counter()
    _flush(path)
    return {
        "codes": float(stored),
        "sends": float(sends_total),
        "seconds": filled - started,
        "flush_seconds": time.perf_counter() - filled,
    }


def _flush(path: str) -> None:
    """Writes the filled file to disk before anything is timed.

    The fill leaves ~700 MiB of dirty pages behind (no fsync while filling). Left alone, the
    worker's first durable commits would wait for the kernel to write them back, and the
    timed run would measure the bench's own set-up, not a store that holds a million codes.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
