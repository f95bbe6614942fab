"""Which locks may be held at once (`db.lock.compatible`), by name alone."""

from __future__ import annotations

import pytest

from billing_jobs.db.lock import WRITER_LOCK, compatible, writer_lock_name

RECONCILE = "billing-reconcile"


@pytest.mark.parametrize(
    ("mine", "other", "together"),
    [
        (writer_lock_name(0, 2), writer_lock_name(1, 2), True),  # shards of one split
        (writer_lock_name(0, 2), writer_lock_name(0, 2), False),
        (writer_lock_name(0, 2), writer_lock_name(1, 3), False),  # another split
        (WRITER_LOCK, writer_lock_name(0, 2), False),
        (WRITER_LOCK, WRITER_LOCK, False),
        (RECONCILE, WRITER_LOCK, True),  # a reconcile neither waits for nor blocks a close
        (WRITER_LOCK, RECONCILE, True),
        (RECONCILE, writer_lock_name(1, 2), True),
        (RECONCILE, RECONCILE, False),
    ],
)
def test_which_locks_go_together(mine: str, other: str, together: bool) -> None:
    assert compatible(mine, other) is together
    assert compatible(other, mine) is together
