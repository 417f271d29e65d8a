"""Dev-mode keys, required secrets, and the sweeper."""

from __future__ import annotations

import stat
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.conftest import WorkerFactory
from tests.integration.test_commands import Clock
from tests.support import producer
from worker.settings import ConfigError, Keys, Settings
from worker.store import open_store
from worker.store.sqlite import SqliteStore


def test_dev_mode_generates_keys_once_and_keeps_them(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, dev=True, var_dir=tmp_path / "var")  # type: ignore[call-arg]
    first, second = Keys(settings), Keys(settings)
    assert first.secret == second.secret and len(first.secret) >= 32
    assert first.delivery == second.delivery
    for name in ("secret_key", "delivery_key"):
        mode = (tmp_path / "var" / name).stat().st_mode
        assert stat.S_IMODE(mode) == 0o600


def test_keys_are_required_outside_dev_mode(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="OTP_SECRET_KEY"):
        Keys(Settings(_env_file=None, var_dir=tmp_path))  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="OTP_DELIVERY_KEY"):
        Keys(Settings(_env_file=None, secret_key="x" * 32, var_dir=tmp_path))  # type: ignore[call-arg]
    assert not (tmp_path / "secret_key").exists()


def test_the_reveal_lists_are_read_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTP_REVEAL_CLIENTS", "qa, e2e")
    monkeypatch.setenv("OTP_REVEAL_BROKER_USERS", " svc-qa ,,svc-e2e")
    policy = Settings(_env_file=None, var_dir=tmp_path).policy()  # type: ignore[call-arg]
    assert policy.reveal_clients == {"qa", "e2e"}
    assert policy.reveal_broker_users == {"svc-qa", "svc-e2e"}
    monkeypatch.delenv("OTP_REVEAL_BROKER_USERS")
    assert Settings(_env_file=None, var_dir=tmp_path).policy().reveal_broker_users == set()  # type: ignore[call-arg]


async def test_the_sweeper_forgets_expired_codes_and_old_replies(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    clock = Clock()
    worker = await start_worker(clock=clock, reveal_clients="test-app", code_retention_seconds=60)
    async with producer(amqp_url) as otp:
        command = {"command_id": "old", "user": "s", "client": "test-app", "channel": "none"}
        first = await otp.call("code.issue", command)
        clock.advance(30)
        assert (await otp.confirm(user="s", code="1"))["status"] == "invalid"

        worker.clock = clock  # the sweeper reads the same clock as the handlers
        clock.now += timedelta(seconds=900 + 60 + 86400)
        swept = await worker.sweep_once()
        assert swept.codes == 1 and swept.replies == 2 and swept.sends == 1
        assert (await otp.confirm(user="s", code="1"))["status"] == "not_found"
        again = await otp.call("code.issue", command)
        assert again["code_id"] != first["code_id"]


async def test_the_sqlite_page_cache_is_the_configured_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTP_SQLITE_CACHE_MIB", "16")
    settings = Settings(_env_file=None, var_dir=tmp_path)  # type: ignore[call-arg]
    store = await open_store(
        f"sqlite:///{tmp_path / 'otp.db'}", cache_mib=settings.sqlite_cache_mib
    )
    try:
        assert isinstance(store, SqliteStore)
        rows = list(await store._db.execute_fetchall("PRAGMA cache_size"))
        assert rows[0][0] == -16 * 1024  # negative: KiB, not pages
    finally:
        await store.close()
    monkeypatch.setenv("OTP_SQLITE_CACHE_MIB", "0")
    with pytest.raises(ValidationError, match="sqlite_cache_mib"):
        Settings(_env_file=None, var_dir=tmp_path)  # type: ignore[call-arg]
