"""The event loop every long-running process of ours runs on."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop when it is installed (it is a dependency, but the code keeps
    working on the standard loop where a platform has no wheel for it): uvloop costs less CPU
    per message, which counts on a host whose broker shares the cores with us."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
