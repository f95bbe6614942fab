"""Where a chunk's time goes: wall seconds per named phase, for the chunk's DEBUG log
line (`charges.chunk`, `ledger.chunk`); the benchmarks sum them over the workers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from billing_jobs.db.sql import Chunk


@contextmanager
def phase(phases: dict[str, float] | None, name: str) -> Iterator[None]:
    """Add the block's wall seconds to `phases[name]` (nothing when `phases` is None)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        if phases is not None:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - started


@contextmanager
def rest(phases: dict[str, float] | None, name: str) -> Iterator[None]:
    """Add to `phases[name]` the block's wall seconds that no phase inside it counted
    (a step's own work around the reads it times as phases of their own)."""
    if phases is None:
        yield
        return
    counted = sum(phases.values())
    started = time.perf_counter()
    try:
        yield
    finally:
        inner = sum(phases.values()) - counted
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - started - inner


def log_chunk(
    log: Any, event: str, chunk: Chunk, started: float, phases: dict[str, float], **fields: Any
) -> None:
    """The chunk's DEBUG line: its index, accounts, wall seconds, `fields`, and each
    phase's seconds as `NAME_seconds`."""
    log.debug(
        event,
        chunk=chunk.index,
        accounts=len(chunk.accounts or ()),
        seconds=round(time.perf_counter() - started, 3),
        **fields,
        **{f"{k}_seconds": round(v, 3) for k, v in sorted(phases.items())},
    )
