"""Masks personal destinations for log lines: ``a***@example.org``, ``+49******678``."""

from __future__ import annotations


def mask_destination(value: str | None) -> str | None:
    if value is None:
        return None
    if "@" in value:
        local, _, domain = value.rpartition("@")
        return f"{local[:1]}***@{domain}"
    if value.startswith("+") and len(value) > 6:
        return value[:3] + "*" * (len(value) - 6) + value[-3:]
    return "***"
