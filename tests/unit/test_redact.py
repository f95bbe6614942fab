"""`redact.scrub`: the database password, in whatever encoding, becomes `***`; nothing else changes."""

from __future__ import annotations

import re
from urllib.parse import quote, quote_plus

from sqlalchemy.engine import URL

from billing_jobs.redact import MASK, remember_url, scrub, scrub_value

# Distinct from every other password of the test suite: the remembered passwords are per process.
PASSWORD = "Unit-T3st-pw/%@:é +#'"
URL_TEXT = URL.create(
    "postgresql+psycopg", username="billing", password=PASSWORD, host="db.internal", database="billing"
).render_as_string(hide_password=False)


def test_the_remembered_password_is_masked_in_every_encoding() -> None:
    remember_url(URL_TEXT)
    encoded = quote(PASSWORD, safe="")
    lower_hex = re.sub(r"%[0-9A-F]{2}", lambda m: m[0].lower(), encoded)
    forms = (PASSWORD, encoded, lower_hex, quote(PASSWORD), quote_plus(PASSWORD), repr(PASSWORD)[1:-1])
    for form in forms:
        assert scrub(f"before {form} after") == f"before {MASK} after", form
    assert scrub(f"connection to {URL_TEXT} failed") == (
        f"connection to postgresql+psycopg://billing:{MASK}@db.internal/billing failed"
    )


def test_a_password_in_a_url_or_a_libpq_string_is_masked_even_when_not_remembered() -> None:
    assert scrub("push to http://metrics:Pw0rd-x@gw.internal:9091 failed") == (
        f"push to http://metrics:{MASK}@gw.internal:9091 failed"
    )
    assert scrub("host=db port=5432 password=Other-pw1 user=x") == f"host=db port=5432 password={MASK} user=x"
    assert scrub("dbname=x password='a b\\'c' user=y") == f"dbname=x password={MASK} user=y"


def test_text_without_a_password_is_left_alone() -> None:
    for text in (
        "sqlite:///billing.db",
        "postgresql+psycopg://billing@db.internal:5432/billing",
        "http://gw.internal:9091/metrics/job/billing_jobs",
        'password authentication failed for user "billing"',
        "run.summary status=succeeded days_billed=31",
    ):
        assert scrub(text) == text


def test_a_malformed_url_still_has_its_password_remembered() -> None:
    remember_url("postgresql+psycopg//billing:Malformed-Pw9@db.internal/billing")
    assert scrub("the password was Malformed-Pw9") == f"the password was {MASK}"


def test_scrub_value_walks_log_values() -> None:
    remember_url(URL_TEXT)
    event = {"error": f"x {PASSWORD}", "args": [URL_TEXT, 3, None], "pair": (PASSWORD, True), "n": 1.5}
    assert scrub_value(event) == {
        "error": f"x {MASK}",
        "args": [f"postgresql+psycopg://billing:{MASK}@db.internal/billing", 3, None],
        "pair": (MASK, True),
        "n": 1.5,
    }
    assert scrub_value(RuntimeError(f"bad {PASSWORD}")) == f"bad {MASK}"
