"""Configuration from ``OTP_*`` environment variables (and ``.env``), for worker and notifier.

``load_settings`` turns any bad value into one line naming the variable (``ConfigError``).
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from cryptography.fernet import Fernet
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.domain.model import Policy
from worker.store.urls import backend_of, path_of

ENV_PREFIX = "OTP_"


class ConfigError(Exception):
    """A configuration value the process cannot start with; the message is one line."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", extra="ignore", frozen=True
    )

    amqp_url: str = "amqp://guest:guest@localhost:5672/"
    database_url: str = "sqlite:///var/otp.db"
    secret_key: SecretStr | None = None
    secret_key_previous: SecretStr = SecretStr("")
    delivery_key: SecretStr | None = None
    delivery_key_previous: SecretStr = SecretStr("")
    dev: bool = False
    var_dir: Path = Path("var")

    default_ttl_seconds: int = Field(300, ge=1)
    max_ttl_seconds: int = Field(900, ge=1, le=86400)
    code_length: int = Field(6, ge=6, le=10)
    max_attempts: int = Field(5, ge=1, le=100)
    resend_cooldown_seconds: int = Field(30, ge=0, le=3600)
    max_sends_per_scope_per_hour: int = Field(5, ge=1)
    max_sends_per_destination_per_hour: int = Field(10, ge=1)
    max_consecutive_failures: int = Field(20, ge=1, le=100)
    reveal_clients: str = ""
    reveal_broker_users: str = ""

    smtp_host: str = "localhost"
    smtp_port: int = Field(25, ge=1, le=65535)
    smtp_from: str = "no-reply@localhost"
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = False
    sms_gateway_url: str | None = None
    templates_dir: Path | None = None
    smtp_timeout_seconds: float = Field(15.0, gt=0)
    smtp_pool_size: int = Field(4, ge=0, le=100)
    sms_timeout_seconds: float = Field(10.0, gt=0)

    notifier_prefetch: int = Field(32, ge=1, le=1000)
    notifier_max_attempts: int = Field(5, ge=1, le=20)
    notifier_backoff_base_seconds: float = Field(1.0, gt=0, le=3600)
    notifier_dedup_retention_seconds: int = Field(7 * 86400, ge=60)
    notifier_console: bool | None = None
    notifier_claim_lease_seconds: float = Field(60.0, gt=0, le=3600)

    log_format: Literal["json", "console", "auto"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    prefetch: int = Field(512, ge=1, le=65535)
    """Twice the batch size by default: while one full batch is in its transaction, the
    broker can already deliver the next (with prefetch equal to the batch size it waits
    for the first batch's ack, and the pipeline runs one batch at a time)."""
    batch_size: int = Field(256, ge=1, le=2000)
    sqlite_synchronous: Literal["FULL", "EXTRA", "NORMAL"] = "FULL"
    sqlite_cache_mib: int = Field(2, ge=1, le=4096)
    sqlite_checkpoint_interval_seconds: float = Field(0.05, ge=0, le=60)
    """How often a thread of the worker's copies committed WAL pages back into the database
    (``worker.store.checkpointer``); 0 leaves it to SQLite, inside the commits."""
    publish_timeout_seconds: float = Field(10.0, gt=0)
    amqp_connect_timeout_seconds: float = Field(30.0, gt=0)
    """Bound on opening the broker connection, at start and on every reconnect: a broker
    that takes the TCP connection and never answers would otherwise hold it for ever."""
    outbox_lease_seconds: float = Field(10.0, gt=0)
    sweep_interval_seconds: float = Field(60.0, gt=0)
    code_retention_seconds: int = Field(86400, ge=0)
    reply_retention_seconds: int = Field(86400, ge=60)
    consumer_check_seconds: float = Field(5.0, gt=0)
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"  # noqa: S104 - probes and scrapes come from outside the pod

    @field_validator("amqp_url", "database_url", "sms_gateway_url")
    @classmethod
    def _url_usable(cls, url: str | None, info: ValidationInfo) -> str | None:
        checks: dict[str, Callable[[str], str | None]] = {
            "amqp_url": amqp_url_problem,
            "database_url": database_url_problem,
            # Unset or empty: no gateway (sms then fails permanently).
            "sms_gateway_url": lambda u: sms_gateway_url_problem(u) if u else None,
        }
        problem = checks[str(info.field_name)](url) if url is not None else None
        if problem:
            raise PydanticCustomError("url", problem)
        return url

    @field_validator("templates_dir")
    @classmethod
    def _templates_dir_exists(cls, path: Path | None) -> Path | None:
        # Not found, it would be passed over for the built-in templates without a word.
        if path is not None and not path.is_dir():
            raise PydanticCustomError("path", "is not a directory")
        return path

    @model_validator(mode="after")
    def _ttl_fits(self) -> Settings:
        # A check across fields has no single field to blame: its message names the variables.
        if self.default_ttl_seconds > self.max_ttl_seconds:
            raise PydanticCustomError(
                "ttl",
                "OTP_DEFAULT_TTL_SECONDS ({default}) must not exceed OTP_MAX_TTL_SECONDS ({max})",
                {"default": self.default_ttl_seconds, "max": self.max_ttl_seconds},
            )
        return self

    def policy(self) -> Policy:
        return Policy(
            code_length=self.code_length,
            default_ttl=timedelta(seconds=self.default_ttl_seconds),
            max_ttl=timedelta(seconds=self.max_ttl_seconds),
            max_attempts=self.max_attempts,
            resend_cooldown=timedelta(seconds=self.resend_cooldown_seconds),
            max_sends_per_scope=self.max_sends_per_scope_per_hour,
            max_sends_per_destination=self.max_sends_per_destination_per_hour,
            max_consecutive_failures=self.max_consecutive_failures,
            reveal_clients=frozenset(_split(self.reveal_clients)),
            reveal_broker_users=frozenset(_split(self.reveal_broker_users)),
        )


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def amqp_url_problem(url: str) -> str | None:
    """What keeps ``url`` from naming a broker, or None.

    aio-pika retries a URL without a host for ever, quietly: it must not get that far."""
    return _server_url_problem(url, ("amqp", "amqps"), "amqp://user:password@host:5672/vhost")


def sms_gateway_url_problem(url: str) -> str | None:
    """What keeps ``url`` from naming an HTTP gateway, or None. Found at start, not at the
    first SMS, where each one would be retried until its attempts ran out."""
    return _server_url_problem(url, ("http", "https"), "https://user:password@gateway.example/sms")


def _server_url_problem(url: str, schemes: tuple[str, ...], shape: str) -> str | None:
    """The answer never quotes the URL, which may hold a password (even where a port
    should be)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return f"cannot be read as a URL ({shape})"
    if parts.scheme not in schemes:
        return f"must start with {' or '.join(f'{s}://' for s in schemes)} ({shape})"
    if not parts.hostname:
        return f"names no host ({shape})"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        return f"the port is not a number from 1 to 65535 ({shape})"
    return None


def database_url_problem(url: str) -> str | None:
    """What keeps ``url`` from naming a store ``open_store`` can open, or None (never
    quoting the URL, which may hold a password)."""
    shapes = "sqlite:///path/otp.db or postgresql://user:password@host:5432/db"
    backend = backend_of(url)
    if backend is None:
        return f"must be a sqlite: or postgresql: URL ({shapes})"
    if backend == "sqlite" and not path_of(url):
        return f"names no file ({shapes})"
    if backend == "postgresql" and not _postgres_ports_valid(url):
        return f"a port is not a number from 1 to 65535 ({shapes})"
    return None


def _postgres_ports_valid(url: str) -> bool:
    """libpq URLs may list several hosts (``host1:5432,host2:5433``), which ``urlsplit``
    cannot read; asyncpg fails on a bad port with a traceback."""
    netloc = url.split("//", 1)[1].split("/", 1)[0] if "//" in url else ""
    netloc = netloc.split("?", 1)[0].rpartition("@")[2]
    for host in netloc.split(","):
        port = host.rpartition("]")[2] if host.startswith("[") else host
        _, colon, digits = port.rpartition(":")
        if colon and digits and not (digits.isdigit() and 1 <= int(digits) <= 65535):
            return False
    return True


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        if not first["loc"]:  # a check across fields, whose message names its variables
            raise ConfigError(first["msg"]) from None
        raise ConfigError(f"{ENV_PREFIX}{str(first['loc'][0]).upper()}: {first['msg']}") from None


class Keys:
    """The HMAC keys and delivery keys, current first, checked once at start."""

    def __init__(self, settings: Settings, *, need_secret: bool = True) -> None:
        secret = _value(settings.secret_key)
        delivery = _value(settings.delivery_key)
        if settings.dev:
            secret = secret or _dev_key(settings.var_dir / "secret_key", _new_secret)
            delivery = delivery or _dev_key(settings.var_dir / "delivery_key", _new_fernet)
        if need_secret and not secret:
            raise ConfigError(
                "OTP_SECRET_KEY: required outside dev mode (generate one with `otp keys`)"
            )
        if not delivery:
            raise ConfigError(
                "OTP_DELIVERY_KEY: required outside dev mode (generate one with `otp keys`)"
            )
        if secret and len(secret) < 16:
            raise ConfigError("OTP_SECRET_KEY: must be at least 16 characters")
        self.secret = secret.encode() if secret else b""
        self.secret_previous = [
            k.encode() for k in _split(settings.secret_key_previous.get_secret_value())
        ]
        self.delivery = _fernet_key("OTP_DELIVERY_KEY", delivery)
        self.delivery_previous = [
            _fernet_key("OTP_DELIVERY_KEY_PREVIOUS", k)
            for k in _split(settings.delivery_key_previous.get_secret_value())
        ]


def _value(secret: SecretStr | None) -> str:
    return secret.get_secret_value().strip() if secret else ""


def _fernet_key(name: str, value: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(value.encode())
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"{name}: must be a Fernet key (32 url-safe base64-encoded bytes)")
    return value.encode()


def _new_secret() -> str:
    return secrets.token_urlsafe(32)


def _new_fernet() -> str:
    return Fernet.generate_key().decode()


def _dev_key(path: Path, make: Callable[[], str]) -> str:
    """Dev mode keeps generated keys in var/ so codes survive a restart.

    Written beside and hard-linked into place, so two processes starting together agree.
    """
    try:
        return _read_or_make(path, make)
    except OSError as exc:
        detail = exc.strerror or type(exc).__name__
        where = f"cannot keep the dev keys in {path.parent}"
        raise ConfigError(f"OTP_VAR_DIR: {where}: {detail}") from None


def _read_or_make(path: Path, make: Callable[[], str]) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, make().encode())
        finally:
            os.close(fd)
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return path.read_text().strip()
