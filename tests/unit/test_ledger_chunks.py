"""The credits ledger's chunks of accounts: every worker gets several, none holds more
than `ACCOUNTS_PER_CHUNK` accounts."""

from __future__ import annotations

import math

import pytest

from billing_jobs.jobs.ledger import ACCOUNTS_PER_CHUNK, CHUNKS_PER_WORKER, accounts_per_chunk


@pytest.mark.parametrize(
    ("accounts", "workers", "size"),
    [
        (0, 2, 1),
        (3, 2, 1),
        (2_000, 1, 500),
        (2_000, 2, 250),
        (20_000, 2, 2_000),
        (125_000, 2, 2_000),
        (7, 0, 1),
        (9, 1, 2),
    ],
)
def test_chunk_sizes(accounts: int, workers: int, size: int) -> None:
    assert accounts_per_chunk(accounts, workers) == size


@pytest.mark.parametrize("accounts", [1, 9, 1_000, 2_001, 19_999, 64_000, 1_000_003])
@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_every_worker_gets_several_chunks_unless_they_would_exceed_the_largest(
    accounts: int, workers: int
) -> None:
    size = accounts_per_chunk(accounts, workers)
    chunks = math.ceil(accounts / size)
    assert 1 <= size <= ACCOUNTS_PER_CHUNK
    assert chunks >= min(accounts, workers * CHUNKS_PER_WORKER) or size == ACCOUNTS_PER_CHUNK
