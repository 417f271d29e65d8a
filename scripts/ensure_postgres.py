"""Makes sure PostgreSQL answers before the tests run, when they are to use it.

The suite runs its store tests on every backend in ``OTP_TEST_BACKENDS`` (default
``sqlite,postgresql``) against the server of ``OTP_TEST_POSTGRES_BASE``. Without this, a
stopped server shows as hundreds of connection errors; here it is started when the machine
has a local cluster that is down (``pg_ctlcluster``), or else named in one line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from ensure_broker import LOCAL_HOSTS, reachable, wait_reachable

DEFAULT_BASE = "postgresql://postgres@127.0.0.1:5432"
CLUSTERS = Path("/etc/postgresql")


def start_local_clusters() -> None:
    versions = sorted(p.name for p in CLUSTERS.iterdir()) if CLUSTERS.is_dir() else []
    for version in versions:
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
            check=False,
            capture_output=True,
        )


def main() -> int:
    backends = [
        b.strip() for b in os.environ.get("OTP_TEST_BACKENDS", "sqlite,postgresql").split(",")
    ]
    if "postgresql" not in backends:
        return 0
    parts = urlsplit(os.environ.get("OTP_TEST_POSTGRES_BASE") or DEFAULT_BASE)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5432
    if reachable(host, port):
        return 0
    if host in LOCAL_HOSTS and shutil.which("pg_ctlcluster"):
        print(f"PostgreSQL not answering at {host}:{port}; starting its cluster", flush=True)
        start_local_clusters()
        if wait_reachable(host, port, 60):
            return 0
    print(
        f"error: no PostgreSQL reachable at {host}:{port} (start it, set "
        "OTP_TEST_POSTGRES_BASE, or run with OTP_TEST_BACKENDS=sqlite)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
