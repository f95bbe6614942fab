"""Controls around a month close: pinned settings, the adjustment share, finance's approval.

- **Pinned settings**: a close records the billing settings it billed with
  (`month_closes.settings`). A re-close (or its preview) with other settings is
  refused, naming the changed keys, unless the caller reprices on purpose.
- **Adjustment share**: a re-close whose adjustments are more than
  `[monitoring] adjustment_confirm_share` of the month's invoiced total needs a
  confirmation; the differences are shown first.
- **Approval**: `month-end --hold` leaves the month's drafts for finance;
  `month-end --approve M` finalizes them only while they still equal a fresh
  computation of the month.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, Connection, Engine, cast, func, select

from billing_jobs.db.billing_tables import invoice_lines, invoices, month_closes, month_holds
from billing_jobs.db.reads import read_frame
from billing_jobs.frames import pd
from billing_jobs.rules.calendar import Month
from billing_jobs.rules.money import format_units
from billing_jobs.settings import LOOK_BACK_KEYS, Settings

LINE_KEY = ["invoice_id", "account_id", "project_id", "line_type"]
LINE_VALUES = ["quantity_units", "unit_price", "amount_units"]


class SettingsChanged(RuntimeError):
    """A closed month would be billed again with other settings than it was closed with."""

    def __init__(self, month: Month, changes: list[str]):
        self.month, self.changes = month, changes
        super().__init__(
            f"month {month} was closed with other billing settings ({'; '.join(changes)}): "
            f"re-close it with --reprice to bill it with the settings in force now, "
            f"or run with the settings it was closed with"
        )


class NeedsConfirm(RuntimeError):
    """A re-close's adjustments are a larger share of the month than allowed without --confirm."""

    def __init__(self, month: Month, changed: int, total: int, share: Decimal, preview: Any):
        self.month, self.changed, self.total, self.share, self.preview = month, changed, total, share, preview
        super().__init__(
            f"the adjustments of {month} move {format_units(changed)} credits, more than "
            f"{(share * 100).normalize():f}% of its invoiced total of {format_units(total)} "
            f"([monitoring] adjustment_confirm_share): check the differences above, "
            f"then re-run with --confirm to write them"
        )


class NothingHeld(RuntimeError):
    """`--approve` for a month without held drafts."""


class ApprovalDiffers(RuntimeError):
    """The held drafts no longer equal a fresh computation: nothing was finalized."""

    def __init__(self, month: Month, differences: pd.DataFrame):
        self.month, self.differences = month, differences
        super().__init__(
            f"the held drafts of {month} differ from a fresh computation in "
            f"{len(differences)} line(s); nothing was finalized: hold the month again "
            f"(month-end --month {month} --hold), review, then approve"
        )


@dataclass(frozen=True)
class Pin:
    settings_hash: str | None
    values: dict[str, str] | None


def pinned(conn: Connection, month: Month) -> Pin | None:
    """The settings a closed month was last billed with; None when it is not closed."""
    row = conn.execute(
        select(month_closes.c.settings_hash, month_closes.c.settings).where(
            month_closes.c.period == str(month)
        )
    ).first()
    if row is None:
        return None
    return Pin(row.settings_hash, json.loads(row.settings) if row.settings else None)


def pin_values(settings: Settings, month: Month) -> dict[str, Any]:
    """What `month_closes` records of the settings a close billed the month with (those in
    force that month: `[[changes]]` of later months leave it alone)."""
    resolved = settings.for_month(month.first_day)
    values = json.dumps(resolved.billing_values(), sort_keys=True)
    return {"settings_hash": resolved.digest(), "settings": values}


def changes(pin: Pin | None, settings: Settings) -> list[str]:
    """`key: old -> new` for each billing setting that differs from the pinned ones
    (`settings`: those in force in the pinned month)."""
    if pin is None or pin.settings_hash is None:
        return []
    if pin.settings_hash in (settings.digest(), settings.digest(prices_only=True)):
        return []
    now = settings.billing_values()
    if pin.values is None:
        return [f"settings hash {pin.settings_hash} -> {settings.digest()} (the keys were not recorded)"]
    keys = sorted((set(now) | set(pin.values)) - LOOK_BACK_KEYS)
    return [
        f"{key}: {pin.values.get(key, '(unset)')!r} -> {now.get(key, '(unset)')!r}"
        for key in keys
        if pin.values.get(key) != now.get(key)
    ]


def check_settings(engine: Engine, month: Month, settings: Settings, *, reprice: bool) -> list[str]:
    """The changed keys of a closed month; raises `SettingsChanged` unless repricing."""
    from sqlalchemy import inspect

    if "month_closes" not in inspect(engine).get_table_names():
        return []
    with engine.connect() as conn:
        found = changes(pinned(conn, month), settings.for_month(month.first_day))
    if found and not reprice:
        raise SettingsChanged(month, found)
    return found


def invoiced_total(conn: Connection, month: Month) -> int:
    """The month's finalized invoice total (regular and adjustments), in units."""
    inv = invoices.c
    total = conn.execute(
        select(cast(func.coalesce(func.sum(inv.total_units), 0), BigInteger)).where(
            inv.period == str(month), inv.status == "finalized"
        )
    ).scalar_one()
    return int(total)


def exceeds_share(changed: int, total: int, share: Decimal) -> bool:
    """Whether adjustments moving `changed` units are more than `share` of `total`."""
    return Decimal(changed) > share * Decimal(abs(total))


def held(conn: Connection, month: Month) -> Any:
    return conn.execute(select(month_holds).where(month_holds.c.period == str(month))).first()


def draft_lines(conn: Connection, month: Month, run_id: str) -> pd.DataFrame:
    """The draft lines a held run wrote for the month."""
    il, inv = invoice_lines.c, invoices.c
    stmt = (
        select(il.invoice_id, il.account_id, il.project_id, il.line_type, *[il[c] for c in LINE_VALUES])
        .select_from(invoice_lines.join(invoices, inv.invoice_id == il.invoice_id))
        .where(inv.period == str(month), inv.status == "draft", inv.run_id == run_id)
    )
    return read_frame(conn, stmt, ints=["quantity_units", "amount_units"])


def line_differences(held_lines: pd.DataFrame, fresh: pd.DataFrame | None) -> pd.DataFrame:
    """Lines that are not the same in both (by invoice, project and line type), with both sides."""
    cols = LINE_KEY + LINE_VALUES

    def norm(frame: pd.DataFrame | None) -> pd.DataFrame:
        if frame is None or frame.empty:
            return pd.DataFrame({c: pd.Series(dtype=object) for c in cols})
        out = frame[cols].copy()
        out["unit_price"] = out["unit_price"].fillna("").astype(str)
        for c in ("quantity_units", "amount_units"):
            out[c] = out[c].astype(object).map(int)
        return out

    a, b = norm(held_lines), norm(fresh)
    both = a.merge(b, on=LINE_KEY, how="outer", suffixes=("_held", "_fresh"), indicator=True)
    same = both["_merge"] == "both"
    for c in LINE_VALUES:
        same &= both[f"{c}_held"] == both[f"{c}_fresh"]
    out = both.loc[~same].drop(columns="_merge")
    return out.sort_values(LINE_KEY, key=lambda s: s.astype(str)).reset_index(drop=True)
