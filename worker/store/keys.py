"""Row keys shared by every backend."""

from __future__ import annotations

import orjson

from worker.domain.model import Scope


def scope_key(scope: Scope) -> str:
    """An unambiguous single-column key for (user, client, purpose)."""
    return orjson.dumps([scope.user, scope.client, scope.purpose]).decode()
