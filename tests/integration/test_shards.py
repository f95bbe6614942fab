"""A sharded month close (`--shard I/N` on N machines, then `--finalize`) gives what one
unsharded run gives, whatever N and whatever order the shards run in."""

from __future__ import annotations

from contextlib import AbstractContextManager
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
import time_machine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import SourceData, export_text, holding_writer_lock, run_cli

from billing_jobs.db.billing_tables import charge_periods, invoice_lines, invoices, rejects
from billing_jobs.db.lock import writer_lock_name
from billing_jobs.db.reads import Shard, shard_of

MONTH = "2026-05"


def _platform(db_url: str, *, late: bool = False) -> None:
    data = SourceData()
    for a in range(9):
        account = f"Acct-{a}" if a % 2 else f"acct {a}"
        for p in range(a % 3 + 1):
            pid = f"{account}-p{p}"
            if not late:
                data.project(pid, created=f"2026-0{(a + p) % 5 + 1}-0{p + 1} 08:00", account=account)
                if a % 3 == 0:
                    data.event(pid, "2026-05-03 10:00", "published", event_id=f"ev-{pid}")
                    data.cloud(pid, "2026-05-04", "page_views", str(1000 * (a + 1)), usage_id=f"cl-{pid}")
                for i in range(100 * (a % 4)):
                    data.compute(pid, "2026-05-15 12:00", "0.1", usage_id=f"cu-{pid}-{i}")
            elif p == 0:
                data.event(pid, "2026-05-20 00:00", "archived", event_id=f"late-{pid}")
    data.write_url(db_url)


def _state(db_url: str) -> dict[str, object]:
    skip = {"run_id", "recorded_at", "first_run_id", "first_seen_at", "created_at", "finalized_at"}
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            out: dict[str, object] = {}
            for table in (charge_periods, invoices, invoice_lines, rejects):
                columns = [c for c in table.c if c.name not in skip]
                out[table.name] = sorted(tuple(str(v) for v in r) for r in conn.execute(sa.select(*columns)))
    finally:
        engine.dispose()
    out["export"] = [line.rsplit(",", 1)[0] for line in export_text(db_url, MONTH).splitlines()]
    return out


def _ok(db_url: str, *args: str) -> str:
    result = run_cli(db_url, "month-end", "--month", MONTH, "--workers", "1", *args)
    assert result.code == 0, result.stderr
    return result.stdout


def _sharded(db_url: str, count: int, order: list[int]) -> None:
    for index in order:
        out = _ok(db_url, "--shard", f"{index}/{count}")
        assert "drafts written" in out
    assert "finalized" in _ok(db_url, "--finalize")


def holding_shard_lock(db_url: str, index: int, count: int) -> AbstractContextManager[object]:
    """Hold shard index/count's lock as its pod, still running, does."""
    return holding_writer_lock(
        db_url,
        since="2026-06-02 03:00",
        run_id=f"shard-{index}-of-{count}",
        name=writer_lock_name(index, count),
        host=f"pod-{index}",
        pid=7,
    )


_REFERENCE: dict[str, dict[str, object]] = {}


@pytest.fixture(autouse=True)
def clock() -> object:
    with time_machine.travel(datetime(2026, 6, 2, 3, 0, tzinfo=UTC), tick=True):
        yield


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), count=st.integers(min_value=1, max_value=4))
def test_shards_in_any_order_then_finalize_give_what_one_run_gives_first_close_and_re_close(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, count: int
) -> None:
    if not _REFERENCE:
        url = f"sqlite:///{tmp_path_factory.mktemp('whole')}/whole.db"
        _platform(url)
        _ok(url)
        _REFERENCE["close"] = _state(url)
        _platform(url, late=True)
        _ok(url)
        _REFERENCE["re-close"] = _state(url)
    url = f"sqlite:///{tmp_path_factory.mktemp('sharded')}/sharded.db"
    _platform(url)

    _sharded(url, count, data.draw(st.permutations(list(range(count))), label="first close order"))
    assert _state(url) == _REFERENCE["close"]

    _platform(url, late=True)
    _sharded(url, count, data.draw(st.permutations(list(range(count))), label="re-close order"))
    assert _state(url) == _REFERENCE["re-close"]


def test_sharded_close_on_postgresql_gives_what_one_run_gives(db_url: str, tmp_path: object) -> None:
    reference = f"sqlite:///{tmp_path}/whole.db"
    _platform(reference)
    _ok(reference)
    _platform(db_url)

    _sharded(db_url, 3, [2, 0, 1])

    assert _state(db_url) == _state(reference)


def test_finalize_names_the_missing_shards_and_finalizes_nothing(db_url: str) -> None:
    _platform(db_url)
    _ok(db_url, "--shard", "1/3")

    result = run_cli(db_url, "month-end", "--month", MONTH, "--finalize")

    assert result.code == 1
    assert "0/3, 2/3" in result.stderr.splitlines()[-1]
    assert export_text(db_url, MONTH).count("\n") == 1  # the header: nothing finalized
    _ok(db_url, "--shard", "0/3")
    _ok(db_url, "--shard", "2/3")
    _ok(db_url, "--finalize")
    assert export_text(db_url, MONTH).count("\n") > 10


def test_finalize_again_changes_nothing(db_url: str) -> None:
    _platform(db_url)
    _sharded(db_url, 2, [0, 1])
    before = _state(db_url)

    out = _ok(db_url, "--finalize")

    assert "already final" in out
    assert _state(db_url) == before


def test_finalize_exits_75_while_a_shard_still_runs(db_url: str) -> None:
    _platform(db_url)
    _ok(db_url, "--shard", "0/2")
    _ok(db_url, "--shard", "1/2")
    with holding_shard_lock(db_url, 1, 2):
        result = run_cli(db_url, "month-end", "--month", MONTH, "--finalize")

    assert result.code == 75
    assert "shard-1-of-2" in result.stderr.splitlines()[-1]


def test_shards_of_one_split_run_at_once_and_exclude_any_other_writer(db_url: str) -> None:
    _platform(db_url)
    assert run_cli(db_url, "db", "upgrade").code == 0
    with holding_shard_lock(db_url, 0, 2):
        assert run_cli(db_url, "month-end", "--month", MONTH, "--shard", "1/2").code == 0  # the same split
        assert run_cli(db_url, "month-end", "--month", MONTH, "--shard", "1/3").code == 75  # another split
        assert run_cli(db_url, "month-end", "--month", MONTH).code == 75  # a whole run
        assert run_cli(db_url, "nightly", "--date", "2026-05-04").code == 75


def test_the_shard_comes_from_a_kubernetes_indexed_job(db_url: str) -> None:
    _platform(db_url)
    env = {"JOB_COMPLETION_INDEX": "1", "BILLING_SHARDS": "2"}

    result = run_cli(db_url, "month-end", "--month", MONTH, env=env)

    assert result.code == 0, result.stderr
    assert "shard 1/2 drafts written" in result.stdout
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            accounts = {a for (a,) in conn.execute(sa.select(invoices.c.account_id))}
    finally:
        engine.dispose()
    assert accounts
    assert {shard_of(a, 2) for a in accounts} == {1}


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--shard", "2/2"], {}, "need 0 <= I < N"),
        (["--shard", "x"], {}, "expected I/N"),
        ([], {"JOB_COMPLETION_INDEX": "0"}, "BILLING_SHARDS"),
        (["--finalize", "--shard", "0/2"], {}, "--finalize takes neither"),
    ],
)
def test_bad_shard_arguments_exit_2_with_one_line(
    tmp_path: object, args: list[str], env: dict[str, str], message: str
) -> None:
    result = run_cli(f"sqlite:///{tmp_path}/b.db", "month-end", "--month", MONTH, *args, env=env)
    assert result.code == 2
    assert message in result.stderr.strip().splitlines()[-1]


def test_shard_of_is_a_stable_split_of_the_bytes() -> None:
    ids = [f"acct-{i}" for i in range(2000)] + ["Ärger", "a b", "A-b"]
    for count in (1, 2, 3, 7):
        buckets = [shard_of(a, count) for a in ids]
        assert set(buckets) == set(range(count))
        assert buckets == [shard_of(a, count) for a in ids]
    assert shard_of("acct-1", 4) == 0  # fixed: a new release must not move accounts between shards
    assert str(Shard(1, 4)) == "1/4"
