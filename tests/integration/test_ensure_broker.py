"""``scripts/ensure_broker.py`` and ``ensure_postgres.py``: what the caller will use answers,
or one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.databases import POSTGRES_BASE
from tests.support import BROKER, ROOT

UNREACHABLE = "amqp://guest:guest@192.0.2.1:5672"
"""TEST-NET-1: never answers, and not local, so the script does not try to start a broker."""


def run_script(
    script: str, *args: str, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """``scripts/<script>`` with ``args``, in an environment of no OTP_ variable but ``env``."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OTP_")}
    environment.update(env)
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        env=environment,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def ensure_broker(
    *args: str, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return run_script("ensure_broker.py", *args, cwd=cwd, **env)


def test_the_broker_the_tests_use_answers_quietly() -> None:
    result = ensure_broker("OTP_TEST_AMQP_BASE", OTP_TEST_AMQP_BASE=BROKER)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_an_unreachable_broker_is_one_line_naming_the_variable_to_set() -> None:
    result = ensure_broker("OTP_TEST_AMQP_BASE", OTP_TEST_AMQP_BASE=UNREACHABLE)
    assert result.returncode == 1
    assert result.stderr == (
        "error: no RabbitMQ broker reachable at 192.0.2.1:5672 "
        "(start one, or set OTP_TEST_AMQP_BASE)\n"
    )


def test_it_checks_the_variable_it_is_given_not_the_service_url() -> None:
    # The tests read OTP_TEST_AMQP_BASE: a service URL elsewhere must not decide for them.
    tests = ensure_broker("OTP_TEST_AMQP_BASE", OTP_AMQP_URL=UNREACHABLE)
    assert tests.returncode == 0, tests.stderr
    service = ensure_broker(OTP_AMQP_URL=UNREACHABLE)
    assert service.returncode == 1
    assert "(start one, or set OTP_AMQP_URL)" in service.stderr


def test_the_service_url_in_dot_env_is_the_one_checked(tmp_path: Path) -> None:
    # The service reads .env when the environment has no value: make run must check that
    # broker, not start or ask for a local one.
    (tmp_path / ".env").write_text(f"OTP_AMQP_URL={UNREACHABLE}\n")
    service = ensure_broker(cwd=tmp_path)
    assert service.returncode == 1
    assert "192.0.2.1:5672" in service.stderr
    overridden = ensure_broker(cwd=tmp_path, OTP_AMQP_URL=BROKER)  # the environment wins
    assert overridden.returncode == 0, overridden.stderr
    tests = ensure_broker("OTP_TEST_AMQP_BASE", cwd=tmp_path)  # not a service setting
    assert tests.returncode == 0, tests.stderr


def ensure_postgres(**env: str) -> subprocess.CompletedProcess[str]:
    return run_script("ensure_postgres.py", **env)


def test_the_postgres_the_tests_use_answers_quietly() -> None:
    result = ensure_postgres(OTP_TEST_POSTGRES_BASE=POSTGRES_BASE)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_an_unreachable_postgres_is_one_line_saying_what_to_set() -> None:
    result = ensure_postgres(OTP_TEST_POSTGRES_BASE="postgresql://postgres@192.0.2.1:5432")
    assert result.returncode == 1
    assert result.stderr == (
        "error: no PostgreSQL reachable at 192.0.2.1:5432 (start it, set "
        "OTP_TEST_POSTGRES_BASE, or run with OTP_TEST_BACKENDS=sqlite)\n"
    )


def test_postgres_is_not_looked_for_when_the_tests_do_not_use_it() -> None:
    result = ensure_postgres(
        OTP_TEST_BACKENDS="sqlite", OTP_TEST_POSTGRES_BASE="postgresql://postgres@192.0.2.1:5432"
    )
    assert (result.returncode, result.stderr) == (0, "")
