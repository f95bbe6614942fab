"""Settings: the repository's config equals the built-in defaults; bad settings name their key."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest
from support import run_cli

from billing_jobs.settings import DEFAULT_CONFIG_TEXT, Settings, SettingsError, load_settings, parse_settings

ROOT = Path(__file__).resolve().parents[2]
REPO_CONFIG = ROOT / "config" / "billing.toml"
PACKAGED_DEFAULTS = ROOT / "billing_jobs" / "default_billing.toml"


def test_the_repository_config_is_byte_identical_to_the_built_in_defaults():
    assert REPO_CONFIG.read_bytes() == PACKAGED_DEFAULTS.read_bytes()
    assert REPO_CONFIG.read_text("utf-8") == DEFAULT_CONFIG_TEXT


def test_the_repository_config_parses_to_the_built_in_defaults(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("BILLING_CONFIG", raising=False)
    from_file = load_settings(REPO_CONFIG)
    assert from_file == load_settings(None)
    assert from_file == Settings()
    assert from_file.digest() == Settings().digest()


def test_the_defaults_are_the_values_of_the_contract():
    s = Settings()
    assert s.timezone == "UTC"
    assert s.effective_from == date(2026, 3, 24)
    assert (s.credits_per_day, s.monthly_cap) == (Decimal("1"), Decimal("29"))
    assert (s.new_project_free_months, s.new_project_promo_until, s.legacy_free_months) == (1, None, 1)
    assert s.active_waiver_compute_threshold == Decimal("30")
    assert s.cloud_prices == {
        "page_views": Decimal("0.001"),
        "bandwidth_gb": Decimal("0.5"),
        "data_storage_gb": Decimal("0.02"),
        "domains": Decimal("0.1"),
    }


def test_billing_config_in_the_environment_is_used_without_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = tmp_path / "billing.toml"
    path.write_text('[billing]\ntimezone = "Asia/Shanghai"\n')
    monkeypatch.setenv("BILLING_CONFIG", str(path))
    assert load_settings().timezone == "Asia/Shanghai"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        pytest.param('[cloud_fees]\npage_views = "0.001"', Decimal("0.001"), id="string"),
        pytest.param("[cloud_fees]\npage_views = 0.001", Decimal("0.001"), id="float-literal"),
        pytest.param("[cloud_fees]\npage_views = 1e-3", Decimal("0.001"), id="exponent-literal"),
        pytest.param("[cloud_fees]\npage_views = 2", Decimal("2"), id="integer"),
    ],
)
def test_decimals_are_read_exactly_as_strings_or_numbers(text: str, value: Decimal):
    price = parse_settings(text).cloud_prices["page_views"]
    assert isinstance(price, Decimal)
    assert price == value
    assert str(price.normalize()) == str(value.normalize())


def test_a_tenth_written_as_a_number_is_not_a_binary_float():
    s = parse_settings("[storage_fee]\ncredits_per_day = 0.1\nmonthly_cap = 2.9\n[cloud_fees]\ndomains = 0.1")
    assert s.credits_per_day == Decimal("0.1")
    assert s.monthly_cap == Decimal("2.9")
    assert s.cloud_prices["domains"] == Decimal("0.1")
    assert s.credits_per_day * 29 == s.monthly_cap


def test_an_empty_waiver_threshold_turns_the_waiver_off():
    assert (
        parse_settings('[promotions]\nactive_waiver_compute_threshold = ""').active_waiver_compute_threshold
        is None
    )
    assert parse_settings(
        "[promotions]\nactive_waiver_compute_threshold = 12.5"
    ).active_waiver_compute_threshold == (Decimal("12.5"))


def test_a_promotion_end_date_is_read_and_an_empty_one_means_no_end():
    text = '[promotions]\nnew_project_promo_until = "2026-09-01"'
    assert parse_settings(text).new_project_promo_until == date(2026, 9, 1)
    assert parse_settings('[promotions]\nnew_project_promo_until = ""').new_project_promo_until is None


def test_zero_free_months_are_allowed():
    s = parse_settings("[promotions]\nnew_project_free_months = 0\nlegacy_free_months = 0")
    assert (s.new_project_free_months, s.legacy_free_months) == (0, 0)


BAD = [
    pytest.param('[billing]\ntz = "UTC"', "billing.tz", id="unknown-key"),
    pytest.param("[surcharges]\nrate = 1", "surcharges", id="unknown-section"),
    pytest.param("[storage_fee]\nmonthly_cap = true", "storage_fee.monthly_cap", id="boolean-decimal"),
    pytest.param("[billing]\ntimezone = 5", "billing.timezone", id="number-timezone"),
    pytest.param(
        '[promotions]\nnew_project_free_months = "1"', "promotions.new_project_free_months", id="string-count"
    ),
    pytest.param(
        "[promotions]\nlegacy_free_months = 1.5", "promotions.legacy_free_months", id="fractional-count"
    ),
    pytest.param(
        "[promotions]\nlegacy_free_months = -1", "promotions.legacy_free_months", id="negative-count"
    ),
    pytest.param('[cloud_fees]\npage_views = "-0.001"', "cloud_fees.page_views", id="negative-price"),
    pytest.param("[cloud_fees]\nbandwidth_gb = -0.5", "cloud_fees.bandwidth_gb", id="negative-number-price"),
    pytest.param('[cloud_fees]\ndomains = "abc"', "cloud_fees.domains", id="non-numeric-price"),
    pytest.param("[cloud_fees]\ndomains = nan", "cloud_fees.domains", id="nan-price"),
    pytest.param("[cloud_fees]\ndomains = inf", "cloud_fees.domains", id="infinite-price"),
    pytest.param('[storage_fee]\nmonthly_cap = "-29"', "storage_fee.monthly_cap", id="negative-cap"),
    pytest.param(
        '[storage_fee]\ncredits_per_day = "0.00001"', "storage_fee.credits_per_day", id="five-fraction-digits"
    ),
    pytest.param('[billing]\ntimezone = "Mars/Olympus"', "billing.timezone", id="unknown-timezone"),
    pytest.param('[billing]\ntimezone = ""', "billing.timezone", id="empty-timezone"),
    pytest.param('[storage_fee]\neffective_from = "2026-02-30"', "storage_fee.effective_from", id="bad-date"),
    pytest.param(
        '[storage_fee]\neffective_from = "24.03.2026"', "storage_fee.effective_from", id="date-format"
    ),
    pytest.param("[storage_fee]\neffective_from = 20260324", "storage_fee.effective_from", id="number-date"),
    pytest.param(
        '[promotions]\nnew_project_promo_until = "soon"',
        "promotions.new_project_promo_until",
        id="bad-promo-end",
    ),
    pytest.param(
        '[promotions]\nactive_waiver_compute_threshold = "-30"',
        "promotions.active_waiver_compute_threshold",
        id="negative-threshold",
    ),
    pytest.param("billing = 3", "billing", id="section-not-a-table"),
]


@pytest.mark.parametrize(("text", "key"), BAD)
def test_a_bad_setting_is_a_settings_error_naming_the_key(text: str, key: str):
    with pytest.raises(SettingsError) as info:
        parse_settings(text, "billing.toml")
    assert f"'{key}'" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_datetime_where_a_date_is_expected_is_a_settings_error():
    with pytest.raises(SettingsError, match=r"storage_fee\.effective_from"):
        parse_settings("[storage_fee]\neffective_from = 2026-03-24T10:00:00")


def test_invalid_toml_is_a_settings_error():
    with pytest.raises(SettingsError, match="not valid TOML"):
        parse_settings("[billing\ntimezone = 'UTC'")


def test_a_missing_settings_file_is_a_settings_error(tmp_path: Path):
    with pytest.raises(SettingsError, match="cannot read settings file"):
        load_settings(tmp_path / "missing.toml")


@pytest.mark.parametrize(("text", "key"), [*BAD[::3], BAD[14], BAD[16]])
def test_a_bad_setting_through_the_command_line_exits_2_with_one_line_naming_the_key(
    tmp_path: Path, text: str, key: str
):
    config = tmp_path / "billing.toml"
    config.write_text(text + "\n")
    db_url = f"sqlite:///{tmp_path / 'billing.db'}"
    for args in (["month-end", "--month", "2026-05"], ["nightly", "--date", "2026-05-01"]):
        result = run_cli(db_url, "--config", str(config), *args)
        assert result.code == 2, result
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert key in lines[0]
        assert result.stdout == ""
    assert not (tmp_path / "billing.db").exists()


LEASES = [(4, False), (5, True), (60, True), (86400, True), (86401, False)]


@pytest.mark.parametrize(("seconds", "ok"), LEASES)
def test_the_sqlite_lock_lease_is_between_5_seconds_and_a_day(seconds: int, ok: bool):
    text = f"[lock]\nlease_seconds = {seconds}"
    if ok:
        assert parse_settings(text).lock_lease_seconds == seconds
    else:
        with pytest.raises(SettingsError, match=r"'lock\.lease_seconds'"):
            parse_settings(text)
