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
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# The jobs use no pydantic plugin: looking for them (every installed package's entry
# points) costs a probe like `billing-jobs status` a tenth of its start-up.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from billing_jobs import errors
from billing_jobs.rules.money import MAX_FRACTION_DIGITS

if TYPE_CHECKING:
    from billing_jobs.rules.credits import TopUpTerms

DEFAULT_CONFIG_TEXT = (Path(__file__).with_name("default_billing.toml")).read_text("utf-8")
METRICS = ("page_views", "bandwidth_gb", "data_storage_gb", "domains")


SettingsError = errors.SettingsError


def _decimal(value: Any) -> Decimal:
    if isinstance(value, bool):
        raise ValueError("expected a decimal number, got a boolean")
    if isinstance(value, int | Decimal):
        result = Decimal(value)
    elif isinstance(value, str):
        try:
            result = Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(f"expected a decimal number, got {value!r}") from None
    else:
        raise ValueError(f"expected a decimal number, got {type(value).__name__}")
    if not result.is_finite():
        raise ValueError(f"expected a finite decimal, got {value!r}")
    if result < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return result


def _amount(value: Any) -> Decimal:
    result = _decimal(value)
    exponent = result.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -MAX_FRACTION_DIGITS:
        raise ValueError(f"at most {MAX_FRACTION_DIGITS} fractional digits, got {value!r}")
    return result


def _optional_decimal(value: Any) -> Decimal | None:
    if isinstance(value, str) and value.strip() == "":
        return None
    return _decimal(value)


def _date(value: Any) -> date:
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"expected a date YYYY-MM-DD, got {value!r}") from None
    raise ValueError(f"expected a date YYYY-MM-DD, got {type(value).__name__}")


def _optional_date(value: Any) -> date | None:
    if isinstance(value, str) and value.strip() == "":
        return None
    return _date(value)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number, got {value!r}")
    if value < 0:
        raise ValueError(f"must not be negative, got {value}")
    return value


def _timezone(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected an IANA timezone name such as 'Europe/Berlin'")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {value!r}") from None
    return value


def _clock(value: Any) -> time:
    if isinstance(value, time):
        return value
    if isinstance(value, str):
        try:
            return time.fromisoformat(value.strip())
        except ValueError:
            pass
    raise ValueError(f"expected a time HH:MM, got {value!r}")


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _share(value: Any) -> Decimal | None:
    if isinstance(value, str) and value.strip() == "":
        return None
    result = _decimal(value)
    if result > 1:
        raise ValueError(f"expected a share between 0 and 1, got {value!r}")
    return result


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value


Dec = Annotated[Decimal, BeforeValidator(_decimal)]
Amount = Annotated[Decimal, BeforeValidator(_amount)]
OptDec = Annotated[Decimal | None, BeforeValidator(_optional_decimal)]
Day = Annotated[date, BeforeValidator(_date)]
OptDay = Annotated[date | None, BeforeValidator(_optional_date)]
Count = Annotated[int, BeforeValidator(_count)]
Zone = Annotated[str, BeforeValidator(_timezone)]
Clock = Annotated[time, BeforeValidator(_clock)]
Text = Annotated[str, BeforeValidator(_text)]
Flag = Annotated[bool, BeforeValidator(_flag)]
OptShare = Annotated[Decimal | None, BeforeValidator(_share)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BillingSection(_Section):
    timezone: Zone = "UTC"
    require_approval: Flag = False


class StorageFeeSection(_Section):
    effective_from: Day = date(2026, 3, 24)
    credits_per_day: Amount = Decimal("1")
    monthly_cap: Amount = Decimal("29")


class PromotionsSection(_Section):
    new_project_free_months: Count = 1
    new_project_promo_until: OptDay = None
    legacy_free_months: Count = 1
    active_waiver_compute_threshold: OptDec = Decimal("30")


class CloudFeesSection(_Section):
    page_views: Dec = Decimal("0.001")
    bandwidth_gb: Dec = Decimal("0.5")
    data_storage_gb: Dec = Decimal("0.02")
    domains: Dec = Decimal("0.1")


class ScheduleSection(_Section):
    nightly_at: Clock = time(2, 30)
    month_end_day: Annotated[int, BeforeValidator(_count), Field(ge=1, le=28)] = 1
    month_end_at: Clock = time(4, 0)
    misfire_grace_seconds: Annotated[int, BeforeValidator(_count), Field(ge=1)] = 21600
    reconcile_at: Clock = time(3, 30)
    reconcile_months: Count = 3
    auto_adjust: Flag = False


class LockSection(_Section):
    # SQLite only: the lease a heartbeat renews (PostgreSQL's lock lives with its session).
    lease_seconds: Annotated[int, BeforeValidator(_count), Field(ge=5, le=86400)] = 60


class MonitoringSection(_Section):
    metrics_textfile: Text = ""
    pushgateway_url: Text = ""
    close_overdue_days: Count = 3
    adjustment_confirm_share: OptShare = None


def _tier_list(value: Any) -> tuple[tuple[Decimal, Decimal], ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty list of { min_credits, price } tables")
    tiers: list[tuple[Decimal, Decimal]] = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != {"min_credits", "price"}:
            raise ValueError(f"tier {i + 1}: expected a table {{ min_credits = ..., price = ... }}")
        try:
            minimum, price = _amount(item["min_credits"]), _amount(item["price"])
        except ValueError as exc:
            raise ValueError(f"tier {i + 1}: {exc}") from None
        if minimum <= 0 or price <= 0:
            raise ValueError(f"tier {i + 1}: min_credits and price must be positive")
        if tiers and minimum <= tiers[-1][0]:
            raise ValueError(f"tier {i + 1}: min_credits must be strictly increasing")
        if tiers and price > tiers[-1][1]:
            raise ValueError(f"tier {i + 1}: price must not increase with min_credits")
        tiers.append((minimum, price))
    return tuple(tiers)


def _currency(value: Any) -> str:
    if not isinstance(value, str) or len(value) != 3 or not value.isalpha() or not value.isupper():
        raise ValueError(f"expected an ISO 4217 code such as 'USD', got {value!r}")
    return value


DEFAULT_TIERS = (
    (Decimal("100"), Decimal("0.10")),
    (Decimal("1000"), Decimal("0.095")),
    (Decimal("5000"), Decimal("0.09")),
    (Decimal("20000"), Decimal("0.085")),
)


class TopUpSection(_Section):
    currency: Annotated[str, BeforeValidator(_currency)] = "USD"
    validity_days: Annotated[int, BeforeValidator(_count), Field(ge=1)] = 365
    tiers_from: Day = date(2026, 3, 26)
    tiers: Annotated[tuple[tuple[Decimal, Decimal], ...], BeforeValidator(_tier_list)] = DEFAULT_TIERS


class LedgerSection(_Section):
    late_data_months: Annotated[int, BeforeValidator(_count), Field(ge=0)] = 2


def _month_start(value: Any) -> date:
    day = _date(value)
    if day.day != 1:
        raise ValueError(f"a change takes effect on the first day of a billing month, got {day}")
    return day


class StorageFeeChange(_Section):
    credits_per_day: Amount | None = None
    monthly_cap: Amount | None = None


class PromotionsChange(_Section):
    new_project_free_months: Count | None = None
    new_project_promo_until: OptDay = None
    legacy_free_months: Count | None = None
    active_waiver_compute_threshold: OptDec = None


class CloudFeesChange(_Section):
    page_views: Dec | None = None
    bandwidth_gb: Dec | None = None
    data_storage_gb: Dec | None = None
    domains: Dec | None = None


class ChangeSection(_Section):
    """`[[changes]]`: prices and promotions that apply from a month on, not to history."""

    effective_from: Annotated[date, BeforeValidator(_month_start)]
    storage_fee: StorageFeeChange = StorageFeeChange()
    promotions: PromotionsChange = PromotionsChange()
    cloud_fees: CloudFeesChange = CloudFeesChange()


def _changes(value: Any) -> Any:
    if not isinstance(value, list):
        raise ValueError("expected a list of [[changes]] tables")
    return value


class _SettingsModel(_Section):
    billing: BillingSection = BillingSection()
    storage_fee: StorageFeeSection = StorageFeeSection()
    promotions: PromotionsSection = PromotionsSection()
    cloud_fees: CloudFeesSection = CloudFeesSection()
    schedule: ScheduleSection = ScheduleSection()
    lock: LockSection = LockSection()
    monitoring: MonitoringSection = MonitoringSection()
    top_up: TopUpSection = TopUpSection()
    ledger: LedgerSection = LedgerSection()
    changes: Annotated[tuple[ChangeSection, ...], BeforeValidator(_changes)] = ()


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


def _change_fields(change: ChangeSection) -> tuple[tuple[str, Any], ...]:
    fields: list[tuple[str, Any]] = []
    for section in (change.storage_fee, change.promotions):
        for name in section.model_fields_set:
            fields.append((name, getattr(section, name)))
    cloud = {m: getattr(change.cloud_fees, m) for m in METRICS if m in change.cloud_fees.model_fields_set}
    if cloud:
        fields.append(("cloud_prices", cloud))
    for name, value in fields:
        if value is None and name not in ("new_project_promo_until", "active_waiver_compute_threshold"):
            raise SettingsError(
                f"changes ({change.effective_from}): bad value for '{name}': must not be empty"
            )
    return tuple(sorted(fields, key=lambda f: f[0]))


def _changes_of(model: _SettingsModel) -> tuple[tuple[date, tuple[tuple[str, Any], ...]], ...]:
    out: list[tuple[date, tuple[tuple[str, Any], ...]]] = []
    for i, change in enumerate(model.changes):
        if out and change.effective_from <= out[-1][0]:
            raise SettingsError(
                f"bad value for 'changes.{i}.effective_from': dates must be strictly increasing"
            )
        out.append((change.effective_from, _change_fields(change)))
    return tuple(out)


def _from_model(model: _SettingsModel) -> Settings:
    return Settings(
        timezone=model.billing.timezone,
        effective_from=model.storage_fee.effective_from,
        credits_per_day=model.storage_fee.credits_per_day,
        monthly_cap=model.storage_fee.monthly_cap,
        new_project_free_months=model.promotions.new_project_free_months,
        new_project_promo_until=model.promotions.new_project_promo_until,
        legacy_free_months=model.promotions.legacy_free_months,
        active_waiver_compute_threshold=model.promotions.active_waiver_compute_threshold,
        cloud_prices={m: getattr(model.cloud_fees, m) for m in METRICS},
        nightly_at=model.schedule.nightly_at,
        month_end_day=model.schedule.month_end_day,
        month_end_at=model.schedule.month_end_at,
        misfire_grace_seconds=model.schedule.misfire_grace_seconds,
        lock_lease_seconds=model.lock.lease_seconds,
        metrics_textfile=model.monitoring.metrics_textfile,
        pushgateway_url=model.monitoring.pushgateway_url,
        close_overdue_days=model.monitoring.close_overdue_days,
        require_approval=model.billing.require_approval,
        reconcile_at=model.schedule.reconcile_at,
        reconcile_months=model.schedule.reconcile_months,
        auto_adjust=model.schedule.auto_adjust,
        adjustment_confirm_share=model.monitoring.adjustment_confirm_share,
        currency=model.top_up.currency,
        validity_days=model.top_up.validity_days,
        tiers_from=model.top_up.tiers_from,
        tiers=model.top_up.tiers,
        late_data_months=model.ledger.late_data_months,
        changes=_changes_of(model),
    )


def _first_error(exc: ValidationError, source: str) -> SettingsError:
    err = exc.errors()[0]
    key = ".".join(str(part) for part in err["loc"])
    if err["type"] == "extra_forbidden":
        return SettingsError(f"{source}: unknown key '{key}'")
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "model_type":
        message = "expected a table"
    return SettingsError(f"{source}: bad value for '{key}': {message}")


def parse_settings(text: str, source: str = "settings") -> Settings:
    """Parse and validate TOML text; raises `SettingsError` naming the key."""
    try:
        raw = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{source}: not valid TOML: {exc}") from None
    try:
        return _from_model(_SettingsModel.model_validate(raw))
    except ValidationError as exc:
        raise _first_error(exc, source) from None
    except ValueError as exc:  # checks across fields, made after validation
        raise SettingsError(f"{source}: {exc}") from None


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Settings from `path`, else `$BILLING_CONFIG`, else the built-in defaults."""
    chosen = path if path is not None else os.environ.get("BILLING_CONFIG") or None
    if chosen is None:
        return parse_settings(DEFAULT_CONFIG_TEXT, "built-in defaults")
    file = Path(chosen)
    try:
        text = file.read_text("utf-8")
    except OSError as exc:
        raise SettingsError(f"cannot read settings file {file}: {exc.strerror}") from None
    return parse_settings(text, str(file))
