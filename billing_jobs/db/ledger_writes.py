"""The credits ledger's stored state made equal to a chunk's replay (`jobs.ledger`):
its inputs, lots, balances and lot states. Each reads what is stored of the chunk's
accounts and writes only what differs, so a repeat writes nothing."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import date, datetime

from sqlalchemy import Connection, and_, bindparam, delete, func, literal, or_, select, update

from billing_jobs.db.billing_tables import (
    credit_balances,
    credit_entries,
    credit_inputs,
    credit_lot_states,
    credit_lots,
    credit_periods,
)
from billing_jobs.db.credit_reads import STATE_COLUMNS, read_lot_states
from billing_jobs.db.reads import read_frame
from billing_jobs.db.sql import Chunk, among
from billing_jobs.db.writes import bulk_insert
from billing_jobs.frames import pd
from billing_jobs.rules.calendar import Month, day_from_number, day_number

INPUT_COMPUTE, INPUT_INVOICE = "compute", "invoice"  # credit_inputs.source


def sync_lot_states(
    conn: Connection,
    chunk: Chunk,
    entries: pd.DataFrame,
    lots_changed: Mapping[str, int],
    month: Month,
    last: date,
    written_through: str | None,
    *,
    run_id: str,
) -> None:
    """Keep `credit_lot_states` true to the entries: an account's stored states of every
    period up to whose end this write adds an entry or changes a lot are dropped; then,
    when the write reaches the month's last day, the state at its end is stored for
    each of the chunk's accounts that has none (an account whose stored state is still
    true is not written again: a repeat writes nothing)."""
    firsts: dict[str, int] = dict(lots_changed)
    if len(entries):
        for account, day in entries.groupby("account_id", sort=False)["day"].min().items():
            firsts[str(account)] = min(int(day), firsts.get(str(account), int(day)))
    st = credit_lot_states.c
    top = max(month, Month.parse(written_through)) if written_through else month
    by_month: dict[Month, list[str]] = {}
    for account, day in firsts.items():
        by_month.setdefault(Month.of(day_from_number(day)), []).append(account)
    for first, accounts in sorted(by_month.items()):
        periods = []
        period = first
        while period <= top:
            periods.append(str(period))
            period = period.next()
        if periods:
            conn.execute(
                delete(credit_lot_states).where(among(st.account_id, accounts), among(st.period, periods))
            )
    if last != month.last_day or not chunk.accounts:
        return
    states, stored = read_lot_states(conn, chunk, day_number(month.last_day))
    missing = tuple(a for a in chunk.accounts if a not in stored)
    if not missing:
        return
    states = states[states["account_id"].isin(missing)]
    with_arrears = set(states.loc[states["lot_id"] == "", "account_id"])
    markers = pd.DataFrame(
        {
            "account_id": [a for a in missing if a not in with_arrears],
            "lot_id": "",
            "held_units": None,
            "drawn_units": 0,
            "funded_units": 0,
        }
    )
    rows = pd.concat(
        [states[STATE_COLUMNS].astype({"held_units": object}), markers.astype({"held_units": object})],
        ignore_index=True,
    )
    bulk_insert(conn, credit_lot_states, rows.assign(period=str(month), run_id=run_id))


INPUT_KEY = ["account_id", "day", "source"]
INPUT_COLUMNS = [*INPUT_KEY, "credit_units", "daily"]


def sync_inputs(
    conn: Connection,
    chunk: Chunk,
    inputs: pd.DataFrame,
    changed: Collection[str],
    cut: date | None,
    settled: date | None,
    last: date,
) -> None:
    """Store `inputs` (account_id, day, source, units, daily), the inputs a replay
    used, in place of the chunk's rows it replaces (invoice totals, the days after
    `cut`, every day of an account in `changed`, replayed whole; those of the settled
    periods, up to `settled`, stay as they are, and so do those after `last`, the
    replay's last day: a later month's, written by its own close).

    Only what differs is written: the replaced rows are read, a row the replay holds
    unchanged stays as it is (a repeat writes nothing), the others are deleted by
    their key and the new ones inserted. When most rows differ (a first write), the
    replaced rows are deleted by one predicate instead.
    """
    ci = credit_inputs.c
    mine = [among(ci.account_id, list(chunk.accounts or ())), ci.day <= day_number(last)]
    if settled is not None:
        mine.append(ci.day > day_number(settled))
    if cut is not None:
        replaced = [ci.source == INPUT_INVOICE, ci.day > day_number(cut)]
        if changed:
            replaced.append(among(ci.account_id, sorted(changed)))
        mine.append(or_(*replaced))
    daily = func.coalesce(ci.daily, literal("")).label("daily")  # "" for an invoice total
    stored = read_frame(
        conn,
        select(ci.account_id, ci.day, ci.source, ci.credit_units, daily).where(*mine),
        ints=["day", "credit_units"],
        aggregate=True,
    )
    wanted = inputs.rename(columns={"units": "credit_units"})
    if wanted.empty:
        wanted = stored.iloc[0:0]
    both = stored.merge(wanted, on=INPUT_COLUMNS, how="outer", indicator=True)
    gone = both.loc[both["_merge"] == "left_only", INPUT_KEY]
    new = both.loc[both["_merge"] == "right_only", INPUT_COLUMNS]
    if len(gone) * 2 > len(stored):
        conn.execute(delete(credit_inputs).where(*mine))
        new = wanted
    elif len(gone):
        keys = [
            {"a": a, "d": int(d), "s": src}
            for a, d, src in zip(gone["account_id"], gone["day"], gone["source"], strict=True)
        ]
        stmt = delete(credit_inputs).where(
            ci.account_id == bindparam("a"), ci.day == bindparam("d"), ci.source == bindparam("s")
        )
        conn.execute(stmt, keys)
    if len(new):
        new = new.astype({"day": "int64", "credit_units": "int64"})
        new["daily"] = new["daily"].where(new["daily"] != "", None)
        bulk_insert(conn, credit_inputs, new)


def sync_lots(
    conn: Connection,
    chunk: Chunk,
    lots: pd.DataFrame,
    settled: date | None,
    last: date,
    *,
    run_id: str,
    now: datetime,
) -> tuple[int, dict[str, int]]:
    """Make the chunk's stored lots equal to `lots` (those funded after `settled`: the
    settled periods' lots stay as written; and up to `last`, the replay's last day: a
    later month's lots are its close's); returns how many rows changed, and per
    account the first day any changed lot is valid from."""
    lo = credit_lots.c
    where = [among(lo.account_id, list(chunk.accounts or ())), lo.valid_from <= last]
    lots = lots[lots["valid_from"] <= day_number(last)]
    if settled is not None:
        where.append(lo.valid_from > settled)
        lots = lots[lots["valid_from"] > day_number(settled)]
    stored = {
        r.lot_id: (
            r.account_id,
            r.channel,
            int(r.credit_units),
            int(r.money_cents),
            r.valid_from,
            r.valid_until,
        )
        for r in conn.execute(select(credit_lots).where(*where))
    }
    wanted = {}
    for r in lots.itertuples(index=False):
        wanted[r.lot_id] = (
            r.account_id,
            r.channel,
            int(r.credit_units),
            int(r.money_cents),
            day_from_number(int(r.valid_from)),
            day_from_number(int(r.valid_until)),
        )
    changed = [k for k, v in wanted.items() if stored.get(k) != v]
    gone = [k for k in stored if k not in wanted]
    if changed or gone:
        conn.execute(delete(credit_lots).where(lo.lot_id.in_(changed + gone)))
    if changed:
        rows = lots[lots["lot_id"].isin(changed)].assign(run_id=run_id, updated_at=now)
        rows = rows.assign(paid_at=rows["paid_at"].astype("datetime64[us]"))
        bulk_insert(conn, credit_lots, rows, date_columns=["valid_from", "valid_until"])
    # Per account, the first day a changed lot (as it was, or is now) is valid from.
    firsts: dict[str, int] = {}
    for lot_id in changed + gone:
        for record in (stored.get(lot_id), wanted.get(lot_id)):
            if record is not None:
                account, day = str(record[0]), day_number(record[4])
                firsts[account] = min(day, firsts.get(account, day))
    return len(changed) + len(gone), firsts


def sync_balances(
    conn: Connection, chunk: Chunk, balances: pd.DataFrame, month: Month, *, run_id: str
) -> None:
    b = credit_balances.c
    stored = {
        r.account_id: (int(r.held_units), int(r.arrears_units))
        for r in conn.execute(
            select(b.account_id, b.held_units, b.arrears_units).where(
                b.period == str(month), among(b.account_id, list(chunk.accounts or ()))
            )
        )
    }
    changed = [
        (a, int(h), int(ar))
        for a, h, ar in balances.itertuples(index=False)
        if stored.get(a) != (int(h), int(ar))
    ]
    if not changed:
        return
    conn.execute(
        delete(credit_balances).where(
            and_(b.period == str(month), b.account_id.in_([a for a, _, _ in changed]))
        )
    )
    conn.execute(
        credit_balances.insert(),
        [
            {"account_id": a, "period": str(month), "held_units": h, "arrears_units": ar, "run_id": run_id}
            for a, h, ar in changed
        ],
    )


def publish_period(conn: Connection, month: Month, *, run_id: str, now: datetime) -> None:
    """Publish every entry written so far: the month's `credit_periods` row stamped with
    the latest `recorded_at` (readers show entries up to the latest stamp,
    `credit_reads.published_entries`); nothing when every entry is published already."""
    latest = conn.execute(select(func.max(credit_entries.c.recorded_at))).scalar()
    published = conn.execute(select(func.max(credit_periods.c.last_written_at))).scalar()
    stamp = now if latest is None else max(now, latest)
    exists = conn.execute(
        select(credit_periods.c.period).where(credit_periods.c.period == str(month))
    ).first()
    if exists is not None and (latest is None or (published is not None and latest <= published)):
        return  # every entry is published already: a repeat changes nothing
    if exists is None:
        conn.execute(
            credit_periods.insert().values(
                period=str(month),
                run_id=run_id,
                written_at=now,
                last_run_id=run_id,
                last_written_at=stamp,
            )
        )
    else:
        conn.execute(
            update(credit_periods)
            .where(credit_periods.c.period == str(month))
            .values(last_run_id=run_id, last_written_at=stamp)
        )
