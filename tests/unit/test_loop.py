"""The processes' event loop: uvloop when installed, and the coroutine's result returned."""

from __future__ import annotations

import asyncio
import importlib.util

from worker.loop import run


async def loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_runs_on_uvloop_when_it_is_installed() -> None:
    expected = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    assert run(loop_module()).split(".")[0] == expected
