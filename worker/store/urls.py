"""Which backend a database URL names: the settings check it at start, the stores open by it."""

from __future__ import annotations

from typing import Literal

Backend = Literal["sqlite", "postgresql"]


def backend_of(url: str) -> Backend | None:
    if url.startswith("sqlite:"):
        return "sqlite"
    if url.startswith(("postgresql:", "postgres:")):
        return "postgresql"
    return None


def store_backend(url: str) -> Backend:
    """The backend a store opens ``url`` with; any other scheme is a ``ValueError`` (the
    settings refuse one at start, so this is for callers that bypass them)."""
    backend = backend_of(url)
    if backend is None:
        raise ValueError(f"unsupported database URL scheme: {url.split(':', 1)[0]!r}")
    return backend


def path_of(url: str) -> str:
    """``sqlite:///var/otp.db`` is relative, ``sqlite:////abs/otp.db`` absolute."""
    rest = url.split(":", 1)[1]
    if rest.startswith("///"):
        return rest[3:]
    if rest.startswith("//"):
        return rest[2:]
    return rest
