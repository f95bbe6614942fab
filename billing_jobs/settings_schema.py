"""The settings file's schema: pydantic models that validate `config/billing.toml`
(each key's type and range, unknown keys refused) and turn it into `Settings`.

Imported by `settings.parse_settings` when a settings file is read, not at start-up:
building these models is a good part of what a command costs to start, and the
built-in defaults need none of it (`settings.load_settings`).
"""

from __future__ import annotations

import os
from datetime import date, time
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# The jobs use no pydantic plugin: looking for them (every installed package's entry
# points) costs a tenth of a command's start-up.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from billing_jobs.rules.money import MAX_FRACTION_DIGITS
from billing_jobs.settings import DEFAULT_TIERS, METRICS, Settings, SettingsError


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


def validated(raw: dict[str, Any], source: str) -> Settings:
    """`raw` (parsed TOML) validated into `Settings`; raises `SettingsError` naming the key."""
    try:
        return _from_model(_SettingsModel.model_validate(raw))
    except ValidationError as exc:
        raise _first_error(exc, source) from None
    except ValueError as exc:  # checks across fields, made after validation
        raise SettingsError(f"{source}: {exc}") from None
