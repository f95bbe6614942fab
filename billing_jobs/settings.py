"""Settings: `config/billing.toml`, read exactly and validated.

Decimals are parsed as `Decimal` (never through a binary float). Any unknown key,
wrong type or impossible value raises `SettingsError`, whose message names the
key; the command line turns it into one line on stderr and exit status 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, field, replace
from datetime import date, time
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from billing_jobs import errors

if TYPE_CHECKING:
    from billing_jobs.rules.credits import TopUpTerms

DEFAULT_CONFIG_TEXT = (Path(__file__).with_name("default_billing.toml")).read_text("utf-8")
METRICS = ("page_views", "bandwidth_gb", "data_storage_gb", "domains")


SettingsError = errors.SettingsError


DEFAULT_TIERS = (
    (Decimal("100"), Decimal("0.10")),
    (Decimal("1000"), Decimal("0.095")),
    (Decimal("5000"), Decimal("0.09")),
    (Decimal("20000"), Decimal("0.085")),
)


@dataclass(frozen=True)
class Settings:
    """Validated settings: plain values, no I/O. Built by `load_settings`."""

    timezone: str = "UTC"
    effective_from: date = date(2026, 3, 24)
    credits_per_day: Decimal = Decimal("1")
    monthly_cap: Decimal = Decimal("29")
    new_project_free_months: int = 1
    new_project_promo_until: date | None = None
    legacy_free_months: int = 1
    active_waiver_compute_threshold: Decimal | None = Decimal("30")
    cloud_prices: dict[str, Decimal] = field(
        default_factory=lambda: {
            "page_views": Decimal("0.001"),
            "bandwidth_gb": Decimal("0.5"),
            "data_storage_gb": Decimal("0.02"),
            "domains": Decimal("0.1"),
        }
    )
    nightly_at: time = time(2, 30)
    month_end_day: int = 1
    month_end_at: time = time(4, 0)
    misfire_grace_seconds: int = 21600
    lock_lease_seconds: int = 60
    metrics_textfile: str = ""
    pushgateway_url: str = ""
    close_overdue_days: int = 3
    require_approval: bool = False
    reconcile_at: time = time(3, 30)
    reconcile_months: int = 3
    auto_adjust: bool = False
    adjustment_confirm_share: Decimal | None = None
    currency: str = "USD"
    validity_days: int = 365
    tiers_from: date = date(2026, 3, 26)
    tiers: tuple[tuple[Decimal, Decimal], ...] = DEFAULT_TIERS
    late_data_months: int = 2
    # `[[changes]]`: (first day of a month, ((field, value), ...)) in date order; a value of
    # the cloud prices is a dict of the metrics it changes.
    changes: tuple[tuple[date, tuple[tuple[str, Any], ...]], ...] = ()

    def for_month(self, first_day: date) -> Settings:
        """The settings in force in the month starting `first_day`: every change effective
        on or before it applied, in date order (no changes left to apply)."""
        values: dict[str, Any] = {}
        for effective_from, fields in self.changes:
            if effective_from > first_day:
                break
            for name, value in fields:
                if name == "cloud_prices":
                    values[name] = {**values.get("cloud_prices", self.cloud_prices), **value}
                else:
                    values[name] = value
        return replace(self, changes=(), **values)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def top_up_terms(self) -> TopUpTerms:
        from billing_jobs.rules.credits import TopUpTerms  # numpy: not at start-up

        return TopUpTerms.of(self.tiers, self.tiers_from, self.validity_days, self.currency)

    def billing_values(self) -> dict[str, str]:
        """The values that change what is billed, as strings (for hashing and run records)."""
        return {
            "timezone": self.timezone,
            "effective_from": self.effective_from.isoformat(),
            "credits_per_day": str(self.credits_per_day),
            "monthly_cap": str(self.monthly_cap),
            "new_project_free_months": str(self.new_project_free_months),
            "new_project_promo_until": (
                self.new_project_promo_until.isoformat() if self.new_project_promo_until else ""
            ),
            "legacy_free_months": str(self.legacy_free_months),
            "active_waiver_compute_threshold": (
                ""
                if self.active_waiver_compute_threshold is None
                else str(self.active_waiver_compute_threshold)
            ),
            **{f"cloud_fees.{k}": str(v) for k, v in sorted(self.cloud_prices.items())},
            "top_up.currency": self.currency,
            "top_up.validity_days": str(self.validity_days),
            "top_up.tiers_from": self.tiers_from.isoformat(),
            "top_up.tiers": ";".join(f"{m}:{p}" for m, p in self.tiers),
            "ledger.late_data_months": str(self.late_data_months),
            **(
                {"changes": json.dumps([[d.isoformat(), _plain(f)] for d, f in self.changes], sort_keys=True)}
                if self.changes
                else {}
            ),
        }

    def digest(self, *, prices_only: bool = False) -> str:
        """A short hash of the billing values, stored with every run. prices_only: of
        those that change what an invoice bills (not `LOOK_BACK_KEYS`)."""
        values = self.billing_values()
        if prices_only:
            values = {k: v for k, v in values.items() if k not in LOOK_BACK_KEYS}
        blob = json.dumps(values, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# Billing values that change how far back a close looks for late data in the credits
# ledger, not what any invoice bills: a closed month is re-closed whatever they were.
LOOK_BACK_KEYS = frozenset({"ledger.late_data_months"})


def _plain(fields: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """A change's fields as JSON-able text values."""

    def text(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: str(v) for k, v in sorted(value.items())}
        return "" if value is None else str(value)

    return {name: text(value) for name, value in fields}


def parse_settings(text: str, source: str = "settings") -> Settings:
    """Parse and validate TOML text; raises `SettingsError` naming the key."""
    try:
        raw = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{source}: not valid TOML: {exc}") from None
    from billing_jobs.settings_schema import validated

    return validated(raw, source)


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Settings from `path`, else `$BILLING_CONFIG`, else the built-in defaults."""
    chosen = path if path is not None else os.environ.get("BILLING_CONFIG") or None
    if chosen is None:
        # The built-in defaults are `Settings()` (a test checks that they equal the
        # shipped default_billing.toml parsed): no schema to build, no file to read.
        return Settings()
    file = Path(chosen)
    try:
        text = file.read_text("utf-8")
    except OSError as exc:
        raise SettingsError(f"cannot read settings file {file}: {exc.strerror}") from None
    return parse_settings(text, str(file))
