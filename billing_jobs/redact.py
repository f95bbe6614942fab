"""Keeping database passwords out of everything the jobs write.

The password of the database URL (`--db-url` / `BILLING_DB_URL`) must never
appear in logs, run records (`billing_runs.arguments` and `.error`), error
messages on stderr or metrics. The URL is remembered once, when the command (or
a worker process) makes its engine (`remember_url`); `scrub` then masks, in any
text:

- that password, as is or URL-encoded in any mix (`%2F` or `%2f` for `/`, `+`
  for a space), or escaped by `repr`;
- the password of any URL written `scheme://user:password@host`, remembered or
  not (a Pushgateway URL with credentials, say);
- a libpq `password=...` connection parameter.

Logs pass through `scrub_event` (a structlog processor, after the traceback is
formatted), the run record's error and arguments through `scrub`, and so does
the one line a failed command prints. URLs the jobs print themselves are
rendered with `hide_password=True`.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

MASK = "***"

# `scheme://user:password@`: the user part and the password stop at the first `@`, `/` or blank.
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'\"]*:)(?P<password>[^\s/@'\"]+)@")
_LIBPQ_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<password>'(?:[^'\\]|\\.)*'|[^\s'\"]+)")
_remembered: dict[str, re.Pattern[str]] = {}


def _char_pattern(char: str) -> str:
    """A character as is, percent-encoded (hex in either case), `+` for a space, or repr-escaped."""
    forms = [re.escape(char)]
    encoded = "".join(f"%{byte:02X}" for byte in char.encode("utf-8"))
    forms.append("".join(f"%(?i:{part[1:]})" for part in re.findall(r"%..", encoded)))
    if char == " ":
        forms.append(r"\+")
    if char in "\\'\"":
        forms.append(re.escape("\\" + char))
    return "(?:" + "|".join(forms) + ")"


def remember_password(password: str | None) -> None:
    """Mask `password` (in any URL encoding) in everything `scrub` sees from now on."""
    if password and password != MASK and password not in _remembered:
        _remembered[password] = re.compile("".join(_char_pattern(c) for c in password))


def remember_url(url: str | URL) -> None:
    """Mask the password of database URL `url`, even of one SQLAlchemy cannot parse."""
    from sqlalchemy.engine import make_url  # not at import: start-up time

    try:
        password = make_url(url).password
    except Exception:  # a malformed URL: what sits between the last `:` and `@` (user:password@host)
        before_host = str(url).rpartition("@")[0]
        password = before_host.rpartition(":")[2] if ":" in before_host else None
    remember_password(None if password is None else str(password))


def scrub(text: str) -> str:
    """`text` with every remembered password, URL password and libpq password masked."""
    for pattern in sorted(_remembered.values(), key=lambda p: -len(p.pattern)):
        text = pattern.sub(MASK, text)
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}@", text)
    return _LIBPQ_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", text)


def scrub_value(value: Any) -> Any:
    """`value` with `scrub` applied to every string in it (dicts, lists and tuples too)."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {key: scrub_value(item) for key, item in value.items()}
    if isinstance(value, list):
        return [scrub_value(item) for item in value]
    if isinstance(value, tuple):
        return tuple(scrub_value(item) for item in value)
    if value is None or isinstance(value, bool | int | float):
        return value
    text = str(value)
    cleaned = scrub(text)
    return value if cleaned == text else cleaned


def scrub_event(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    """structlog processor: scrub every value of the event (exception text included)."""
    return {key: scrub_value(item) for key, item in event_dict.items()}
