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


def path_of(url: str) -> str:
    """``sqlite:///var/otp.db`` is relative, ``sqlite:////abs/otp.db`` absolute."""
    rest = url.split(":", 1)[1]
    if rest.startswith("///"):
        return rest[3:]
    if rest.startswith("//"):
        return rest[2:]
    return rest
