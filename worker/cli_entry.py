"""The ``otp`` script: ``worker.cli``, once the worker extra is known to be installed.

A bare ``pip install .`` (producers: the contracts and their client) installs the script
too, and the CLI imports worker-only packages: without this, ``otp`` would end in a
traceback about ``orjson`` instead of saying what to install.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from worker.cli import main as run
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in ("worker", "contracts"):
            raise  # our own code is missing: a broken install, not a missing extra
        print(
            f"otp: the otp command needs the worker extra, which is not installed here (no "
            f"module {exc.name}): pip install '.[worker]' in the otp-service checkout",
            file=sys.stderr,
        )
        return 2
    return run(argv)
