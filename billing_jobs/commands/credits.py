"""`billing-jobs credits ...`: prepaid credits for finance and support (contract.md, Credits).

Thin: parse, call `jobs.credits` or the rules, print. Money is printed with two
decimals in the `[top_up] currency`; credits as plain decimals.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, TextIO, TypeVar

import click

from billing_jobs.commands import common
from billing_jobs.commands.common import Context
from billing_jobs.rules.calendar import Month, day_number
from billing_jobs.rules.money import UNITS_PER_CREDIT, format_cents, format_decimal, format_units

if TYPE_CHECKING:  # imported by the commands that run (start-up time)
    from rich.console import Console

T = TypeVar("T")


def _console() -> Console:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 200)


def _decimal(value: str, name: str, places: int) -> Decimal:
    try:
        d = Decimal(value)
    except InvalidOperation:
        raise click.BadParameter(f"expected a decimal number, got {value!r}", param_hint=name) from None
    exponent = d.as_tuple().exponent
    if not d.is_finite() or d <= 0:
        raise click.BadParameter(f"must be a positive number, got {value!r}", param_hint=name)
    if isinstance(exponent, int) and exponent < -places:
        raise click.BadParameter(f"at most {places} decimals, got {value!r}", param_hint=name)
    return d


def _day(value: str | None, default: date, name: str) -> date:
    if value is None:
        return default
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"expected a date YYYY-MM-DD, got {value!r}", param_hint=name) from None


def _month(value: str) -> Month:
    try:
        return Month.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--month") from None


def _today(ctx: Context) -> date:
    return common.utcnow().astimezone(ctx.settings.zone).date()


@contextmanager
def _output(path: str | None) -> Iterator[TextIO]:
    """stdout, or a file written whole (a `.partial` renamed at the end)."""
    if not path:
        yield sys.stdout
        sys.stdout.flush()
        return
    tmp = Path(path).with_name(Path(path).name + ".partial")
    with tmp.open("w", newline="", encoding="utf-8") as out:
        yield out
    os.replace(tmp, path)


def _ledger_call(call: Callable[[], T]) -> T:
    from billing_jobs.jobs.credits import LedgerMissing

    try:
        return call()
    except LedgerMissing as exc:
        raise click.ClickException(str(exc)) from None


def _known_account(ctx: Context, account: str) -> None:
    """Exit 2 with one line when `accounts` has no such account."""
    from sqlalchemy import inspect, select

    from billing_jobs.db.source_tables import accounts

    if "accounts" not in inspect(ctx.engine).get_table_names():
        raise click.ClickException("the source tables do not exist in this database")
    with ctx.engine.connect() as conn:
        found = conn.execute(select(accounts.c.account_id).where(accounts.c.account_id == account)).first()
    if found is None:
        raise click.BadParameter(f"no account {account!r} in accounts", param_hint="--account")


@click.group("credits")
def credits_group() -> None:
    """Prepaid credits: prices, balances, the ledger and its reports."""


@credits_group.command("quote")
@click.option("--credits", "credits_text", default=None, metavar="N", help="Price of a top-up of N credits.")
@click.option("--amount", "amount_text", default=None, metavar="X", help="Credits a wire transfer of X buys.")
@click.option("--date", "date_text", default=None, metavar="YYYY-MM-DD", help="The day (default: today).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def quote(
    ctx: Context, credits_text: str | None, amount_text: str | None, date_text: str | None, as_json: bool
) -> None:
    """The tier price of N credits, or the credits a wire of X buys, on a day."""
    from billing_jobs.rules.credits import PRICE_SCALE, price_cents, tier_prices, wire_credits, wire_prices

    if (credits_text is None) == (amount_text is None):
        raise click.UsageError("give exactly one of --credits N or --amount X")
    settings = ctx.settings
    terms = settings.top_up_terms()
    day = _day(date_text, _today(ctx), "--date")
    n = day_number(day)
    currency = settings.currency
    smallest = terms.tiers[0]
    if credits_text is not None:
        c = _decimal(credits_text, "--credits", 4)
        units = int(c * UNITS_PER_CREDIT)
        amount = int(price_cents(terms, [units], [n])[0])
        if amount < 0:
            raise click.UsageError(
                f"--credits {credits_text}: below the smallest top-up of "
                f"{format_units(smallest.min_units)} credits"
            )
        price = Decimal(int(tier_prices(terms, [units], [n])[0])) / PRICE_SCALE
        result = {
            "credits": format_units(units),
            "price": format_decimal(price),
            "amount": format_cents(amount),
        }
        text = (
            f"{format_units(units)} credits cost {format_cents(amount)} {currency} "
            f"({format_decimal(price)} per credit, {day})"
        )
    else:
        a = _decimal(amount_text or "", "--amount", 2)
        cents = int(a * 100)
        units = int(wire_credits(terms, [cents], [n])[0])
        if units < 0:
            raise click.UsageError(
                f"--amount {amount_text}: below the smallest top-up of "
                f"{format_cents(terms.smallest_amount_cents)} {currency}"
            )
        price = Decimal(int(wire_prices(terms, [cents], [n])[0])) / PRICE_SCALE
        result = {
            "amount": format_cents(cents),
            "price": format_decimal(price),
            "credits": format_units(units),
        }
        text = (
            f"a wire of {format_cents(cents)} {currency} buys {format_units(units)} credits "
            f"({format_decimal(price)} per credit, {day})"
        )
    result.update(currency=currency, date=day.isoformat())
    click.echo(json.dumps(result) if as_json else text)


@credits_group.command("export")
@click.option("--month", "month_text", required=True, metavar="YYYY-MM", help="The ledger period.")
@common.export_options
@click.pass_obj
def export(ctx: Context, month_text: str, output: str | None, fmt: str) -> None:
    """Write the ledger entries of a month's period as CSV or Parquet."""
    from billing_jobs.jobs.credits import ledger_rows
    from billing_jobs.jobs.warehouse import write_export

    month = _month(month_text)
    common.check_export_target(fmt, output)
    rows = _ledger_call(lambda: ledger_rows(ctx.engine, str(month)))
    write_export(rows, fmt, output)


@credits_group.command("balance")
@click.option("--account", "account", required=True, help="The account id.")
@click.option(
    "--date", "date_text", default=None, metavar="YYYY-MM-DD", help="End of this day (default: yesterday)."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def balance(ctx: Context, account: str, date_text: str | None, as_json: bool) -> None:
    """An account's lots (held, valid until, refundable money) and arrears at the end of a day."""
    from rich.table import Table

    from billing_jobs.jobs.credits import account_balance

    settings = ctx.settings
    day = _day(date_text, _today(ctx) - timedelta(days=1), "--date")
    _known_account(ctx, account)
    b = _ledger_call(lambda: account_balance(ctx.engine, settings, account, day))
    if as_json:
        click.echo(json.dumps(b.as_json(settings.currency), indent=2))
        return
    data = b.as_json(settings.currency)
    console = _console()
    through = data["written_through"] or "nothing written yet"
    console.print(
        f"account {account} at the end of {day} (ledger written through {through}; later days: preview)"
    )
    table = Table(title="lots", title_justify="left")
    for col in ("lot", "channel", "held", "of credits", "paid", "valid from", "valid until", "refundable"):
        table.add_column(col, justify="left" if col in ("lot", "channel") else "right")
    for lot in data["lots"]:
        table.add_row(
            lot["lot_id"],
            lot["channel"],
            lot["held"],
            lot["credits"],
            lot["money_paid"],
            lot["valid_from"],
            lot["valid_until"],
            lot["refundable_money"],
        )
    console.print(table)
    console.print(
        f"held {data['held']} credits, arrears {data['arrears']}, balance {data['balance']}; "
        f"refundable {data['refundable_money']} {settings.currency}"
    )


@credits_group.command("history")
@click.option("--account", "account", required=True, help="The account id.")
@click.option("--month", "month_text", required=True, metavar="YYYY-MM", help="The month.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV.")
@click.pass_obj
def history(ctx: Context, account: str, month_text: str, as_csv: bool) -> None:
    """Day by day, what happened to an account's credits in a month (the ledger's entries,
    then a preview of the days not written yet)."""
    from rich.table import Table

    from billing_jobs.jobs.credits import account_balance, history_rows

    settings = ctx.settings
    month = _month(month_text)
    yesterday = _today(ctx) - timedelta(days=1)
    last = min(month.last_day, yesterday) if month.first_day <= yesterday else month.last_day
    _known_account(ctx, account)
    b = _ledger_call(lambda: account_balance(ctx.engine, settings, account, last))
    rows = history_rows(b, month)
    columns = ["day", "kind", "lot_id", "cause", "credits", "money", "corrects", "source"]
    if as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([r[c] for c in columns] for r in rows)
        sys.stdout.flush()
        return
    table = Table(title=f"credits of {account} in {month}", title_justify="left")
    for col in columns:
        table.add_column(col, justify="right" if col in ("credits", "money") else "left")
    for r in rows:
        table.add_row(*(r[c] for c in columns))
    console = _console()
    console.print(table)
    data = b.as_json(settings.currency)
    console.print(
        f"at the end of {last}: held {data['held']}, arrears {data['arrears']}, balance {data['balance']}"
    )


@credits_group.command("report")
@click.option("--month", "month_text", required=True, metavar="YYYY-MM", help="The ledger period.")
@click.option(
    "--output", type=click.Path(dir_okay=False, writable=True), default=None, help="Per-account CSV file."
)
@click.pass_obj
def report(ctx: Context, month_text: str, output: str | None) -> None:
    """The month's roll-forward, platform-wide (and per account with --output): opening,
    funded by channel, drawn, restored, expired, refunded, arrears, closing."""
    from rich.table import Table

    from billing_jobs.jobs.credits import REPORT_COLUMNS, format_report_row, month_report

    month = _month(month_text)
    df = _ledger_call(lambda: month_report(ctx.engine, str(month)))
    total: dict[str, int | str] = {c: int(df[c].sum()) if len(df) else 0 for c in REPORT_COLUMNS[1:]}
    total["account_id"] = "platform"
    formatted = dict(zip(REPORT_COLUMNS, format_report_row(total), strict=True))
    console = _console()
    table = Table(title=f"credits roll-forward {month} ({ctx.settings.currency})", title_justify="left")
    table.add_column("line")
    table.add_column("value", justify="right")
    for c in REPORT_COLUMNS[1:]:
        table.add_row(c, formatted[c])
    console.print(table)
    if output:
        with _output(output) as out:
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(REPORT_COLUMNS)
            for row in df.to_dict("records"):
                writer.writerow(format_report_row(row))
            writer.writerow(format_report_row(total))
        console.print(f"per-account roll-forward written to {output}")


@credits_group.command("exceptions")
@click.option("--month", "month_text", required=True, metavar="YYYY-MM", help="The month.")
@click.pass_obj
def exceptions(ctx: Context, month_text: str) -> None:
    """The month's price exceptions and rejected top-ups and refund requests, with reasons."""
    from rich.table import Table

    from billing_jobs.jobs.credits import month_exceptions
    from billing_jobs.rules.calendar import day_from_number

    settings = ctx.settings
    month = _month(month_text)
    priced, rejected = _ledger_call(lambda: month_exceptions(ctx.engine, settings, month))
    console = _console()
    table = Table(title=f"price exceptions {month}", title_justify="left")
    for col in ("top_up_id", "account_id", "day", "credits", "paid", "tier price"):
        table.add_column(col)
    for r in sorted(priced.itertuples(index=False), key=lambda r: str(r.top_up_id)):
        tier = int(r.tier_cents)
        table.add_row(
            str(r.top_up_id),
            str(r.account_id),
            day_from_number(int(r.day)).isoformat(),
            format_units(int(r.credit_units)),
            format_cents(int(r.amount_cents)),
            format_cents(tier) if tier >= 0 else "below the smallest top-up",
        )
    console.print(table)
    table = Table(title=f"rejected {month}", title_justify="left")
    for col in ("table", "id", "reason", "detail"):
        table.add_column(col)
    for r in sorted(rejected.itertuples(index=False), key=lambda r: (r.source_table, str(r.source_id))):
        table.add_row(r.source_table, str(r.source_id), r.reason, r.detail)
    console.print(table)
    console.print(f"price exceptions: {len(priced)}; rejected: {len(rejected)}")


@credits_group.command("codes")
@click.option("--batch", "batch", required=True, help="The batch id (an event, a campaign).")
@click.option("--count", "count", required=True, type=click.IntRange(1, 1_000_000), help="How many codes.")
@click.option("--credits", "credits_text", required=True, help="Credits each code gives.")
@click.option(
    "--redeem-by",
    "redeem_by",
    required=True,
    metavar="TIMESTAMP",
    help="UTC instant; a redemption at or after it does not count.",
)
@click.option(
    "--valid-days",
    "valid_days",
    required=True,
    type=click.IntRange(min=1),
    help="Validity of the credits from redemption.",
)
@click.option(
    "--output", type=click.Path(dir_okay=False, writable=True), default=None, help="Write to this file."
)
@click.pass_obj
def codes(
    ctx: Context,
    batch: str,
    count: int,
    credits_text: str,
    redeem_by: str,
    valid_days: int,
    output: str | None,
) -> None:
    """New redemption codes as CSV rows of `redemption_codes`, for the platform to load.

    Unique (within the batch and against every code already in `redemption_codes`),
    80 random bits each, an alphabet without look-alikes, and a check character. It
    writes no table, and refuses a batch id that `redemption_codes` already has.
    """
    from sqlalchemy import inspect, select

    from billing_jobs.db.source_tables import redemption_codes
    from billing_jobs.rules.codes import new_codes

    if not batch.strip() or len(batch) > 64:
        raise click.BadParameter("a batch id of 1 to 64 characters", param_hint="--batch")
    credits = _decimal(credits_text, "--credits", 4)
    try:
        deadline = datetime.fromisoformat(redeem_by.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"expected YYYY-MM-DD[ HH:MM[:SS]], got {redeem_by!r}", param_hint="--redeem-by"
        ) from None
    if deadline.tzinfo is not None:
        deadline = deadline.astimezone(UTC).replace(tzinfo=None)
    taken: set[str] = set()
    engine = ctx.engine
    if "redemption_codes" in inspect(engine).get_table_names():
        rc = redemption_codes.c
        with engine.connect() as conn:
            if conn.execute(select(rc.batch_id).where(rc.batch_id == batch).limit(1)).first() is not None:
                raise click.UsageError(f"--batch {batch!r}: redemption_codes already has this batch")
            taken = {c for (c,) in conn.execute(select(rc.code))}
    made = new_codes(count, taken)
    with _output(output) as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["code", "batch_id", "credits", "redeem_by", "valid_days"])
        stamp = deadline.strftime("%Y-%m-%d %H:%M:%S")
        writer.writerows((c, batch, format_decimal(credits), stamp, valid_days) for c in made)


COMMANDS = [credits_group]
