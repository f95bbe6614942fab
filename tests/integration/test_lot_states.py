"""The ledger's stored states (`credit_lot_states`), on SQLite and PostgreSQL: each
month-end stores every account's lots and arrears at the end of its period; a later
close continues from them instead of summing each lot's entries since it was funded.
What they hold must always be what the entries give: after closes in order, after a
correction of a settled period (which drops the states it made untrue), after a
repeat (which writes none), and a close without them (a database written before
they existed) writes the same ledger as one with them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa
from support import SourceData, run_cli
from test_ledger_periods import MONTHS, _all_entries, _config, _late_june, _month_end, _platform

from billing_jobs.db.billing_tables import credit_lot_states
from billing_jobs.db.credit_reads import (
    STATE_COLUMNS,
    ledger_accounts,
    lot_states_of,
    read_entry_sums,
    read_lot_states,
)
from billing_jobs.db.sql import Chunk
from billing_jobs.rules.calendar import Month, day_number


def _rows(frame: pd.DataFrame) -> set[tuple[Any, ...]]:
    return {
        (a, lot, int(h), int(d), int(f)) for a, lot, h, d, f in frame[STATE_COLUMNS].itertuples(index=False)
    }


def _check_states(engine: sa.Engine, months: tuple[str, ...]) -> set[str]:
    """For each month's end: the state read through the stored states equals the living
    lots' entries summed. Returns the accounts whose state at the last month's end is
    stored."""
    stored: frozenset[str] = frozenset()
    with engine.connect() as conn:
        chunk = Chunk(tuple(ledger_accounts(conn)))
        for month in months:
            end = day_number(Month.parse(month).last_day)
            read, stored = read_lot_states(conn, chunk, end)
            summed = lot_states_of(read_entry_sums(conn, chunk, end, alive=True))
            assert _rows(read) == _rows(summed), month
            assert _rows(read), month
    return set(stored)


def _state_rows(engine: sa.Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return sorted(tuple(r) for r in conn.execute(sa.select(credit_lot_states)).all())


def _periods_of(engine: sa.Engine, account: str) -> set[str]:
    st = credit_lot_states.c
    with engine.connect() as conn:
        return set(conn.execute(sa.select(st.period).where(st.account_id == account)).scalars())


def test_stored_states_are_what_the_entries_give_through_closes_corrections_and_repeats(
    db_url: str, db_engine: sa.Engine, tmp_path: Path
) -> None:
    env = _config(tmp_path, 2)
    _platform(db_url)
    for month in MONTHS:
        _month_end(db_url, env, "--month", month)
    assert _periods_of(db_engine, "a") == set(MONTHS)
    assert _check_states(db_engine, MONTHS) == {"a", "b"}

    # Late June, corrected on request: entries of June days are added in September,
    # so a's states at the ends of June, July and August are no longer true: dropped.
    _late_june(db_url)
    _month_end(db_url, env, "--month", "2026-09", "--ledger-from", "2026-06")
    assert _periods_of(db_engine, "a") == {"2026-04", "2026-05", "2026-09"}
    assert _periods_of(db_engine, "b") == set(MONTHS)
    assert _check_states(db_engine, MONTHS) == {"a", "b"}

    before = _state_rows(db_engine)
    _month_end(db_url, env, "--month", "2026-09")
    assert _state_rows(db_engine) == before, "a repeated month-end rewrote stored states"


def test_a_close_without_stored_states_writes_the_same_ledger(
    db_url: str, db_engine: sa.Engine, tmp_path: Path
) -> None:
    """Closes on a database whose stored states are gone before each close (all of
    them, or one account's), against closes that keep them."""
    kept = f"sqlite:///{tmp_path / 'kept.db'}"
    env = _config(tmp_path, 1)
    for url in (db_url, kept):
        _platform(url)
        extra = SourceData()
        extra.top_up("C", "2026-06-05 09:00", "online", account="b", credits="50", amount="5.00")
        extra.refund_request("R", "2026-08-03 10:00", account="b")
        extra.accounts.clear()  # written with the platform
        extra.write_url(url)
    assert run_cli(db_url, "db", "upgrade").code == 0
    for n, month in enumerate(MONTHS):
        if month == "2026-08":
            _late_june(db_url)
            _late_june(kept)
        with db_engine.begin() as conn:
            st = credit_lot_states.c
            conn.execute(sa.delete(credit_lot_states).where(sa.true() if n % 2 else st.account_id == "b"))
        _month_end(db_url, env, "--month", month)
        _month_end(kept, env, "--month", month)
    _month_end(db_url, env, "--month", "2026-09", "--ledger-from", "2026-06")
    _month_end(kept, env, "--month", "2026-09", "--ledger-from", "2026-06")

    def entries(url: str) -> list[tuple[str, ...]]:
        keys = ("entry_id", "account_id", "lot_id", "kind", "day", "period", "corrects", "credits", "money")
        return sorted(tuple(r[k] for k in keys) for r in _all_entries(url))

    assert entries(db_url) == entries(kept)
    assert any(r[6] == "2026-06" for r in entries(kept)), "the late June compute was not corrected"
    assert _check_states(db_engine, MONTHS) == {"a", "b"}
