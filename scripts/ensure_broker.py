"""Makes sure a RabbitMQ broker answers before tests or the dev service start.

Starts the machine's rabbitmq-server when it is installed but stopped; otherwise fails with
one clear line instead of a wall of connection errors later.

``ensure_broker.py [VARIABLE]`` checks the broker named by the environment variable the
caller itself reads (``OTP_TEST_AMQP_BASE`` for the tests, ``OTP_BENCH_AMQP_BASE`` for the
benchmark; ``OTP_AMQP_URL`` by default, as the service reads it), so the broker checked is
the one that will be used, and the line says which variable to set.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
"""Where a server that is down may be started here."""


def wait_reachable(host: str, port: int, seconds: float) -> bool:
    """Whether ``host:port`` answers within ``seconds`` (a server just started)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if reachable(host, port):
            return True
        time.sleep(0.5)
    return False


SERVICE_VARIABLE = "OTP_AMQP_URL"


def configured(variable: str) -> str | None:
    """What the caller will read: the environment, and for the service's own setting also
    ``.env`` in the working directory, which its settings read when the environment has
    no value (python-dotenv comes with pydantic-settings)."""
    value = os.environ.get(variable)
    if value is None and variable == SERVICE_VARIABLE and os.path.isfile(".env"):
        from dotenv import dotenv_values

        value = dotenv_values(".env").get(variable)
    return value


def main(argv: list[str]) -> int:
    variable = argv[0] if argv else SERVICE_VARIABLE
    url = configured(variable) or DEFAULT_URL
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5672
    if reachable(host, port):
        return 0
    if host in LOCAL_HOSTS and shutil.which("rabbitmq-server"):
        print(f"RabbitMQ not answering at {host}:{port}; starting rabbitmq-server", flush=True)
        subprocess.run(["rabbitmq-server", "-detached"], check=False)
        if wait_reachable(host, port, 90):
            if shutil.which("rabbitmqctl"):
                subprocess.run(["rabbitmqctl", "await_startup"], check=False, capture_output=True)
            return 0
    print(
        f"error: no RabbitMQ broker reachable at {host}:{port} (start one, or set {variable})",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
