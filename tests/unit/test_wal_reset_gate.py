"""Which SQLite releases may checkpoint on a second connection (the WAL-reset bug's fix)."""

from __future__ import annotations

import pytest

from worker.store.checkpointer import wal_reset_fixed


@pytest.mark.parametrize(
    ("version", "fixed"),
    [
        ((3, 40, 1), False),  # Debian 12's, this project's machines and its image
        ((3, 44, 5), False),
        ((3, 44, 6), True),  # backport
        ((3, 45, 0), False),
        ((3, 50, 6), False),
        ((3, 50, 7), True),  # backport
        ((3, 51, 2), False),
        ((3, 51, 3), True),  # the fix
        ((3, 52, 0), True),
        ((4, 0, 0), True),
    ],
)
def test_only_releases_with_the_fix_pass(version: tuple[int, int, int], fixed: bool) -> None:
    assert wal_reset_fixed(version) is fixed
