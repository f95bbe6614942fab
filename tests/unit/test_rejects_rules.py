"""Rejects' ids and which open rejects a run closes: pure, no database."""

from __future__ import annotations

from billing_jobs.rules.codes import ALPHABET
from billing_jobs.rules.rejects import Examined, OpenReject, no_longer_found, reject_id, typed_id


def test_a_reject_id_is_twelve_characters_without_look_alikes_and_the_same_every_time() -> None:
    first = reject_id("compute_usage", "cu-1", "missing_amount")
    assert first == reject_id("compute_usage", "cu-1", "missing_amount")
    assert len(first) == 12
    assert set(first) <= set(ALPHABET)


def test_each_part_of_the_key_changes_the_id() -> None:
    ids = {
        reject_id("compute_usage", "cu-1", "missing_amount"),
        reject_id("cloud_usage", "cu-1", "missing_amount"),
        reject_id("compute_usage", "cu-2", "missing_amount"),
        reject_id("compute_usage", "cu-1", "unknown_project"),
        # The parts are separated: moving a character between them changes the id.
        reject_id("compute_usag", "ecu-1", "missing_amount"),
    }
    assert len(ids) == 5


def test_ten_thousand_rejects_have_ten_thousand_ids() -> None:
    ids = {reject_id("cloud_usage", f"cl-{i}", "negative_quantity") for i in range(10_000)}
    assert len(ids) == 10_000


def test_an_id_may_be_typed_in_lower_case_with_dashes_or_spaces() -> None:
    assert typed_id("7qk4-m2hx p9tb") == "7QK4M2HXP9TB"


def _open(rid: str, source_id: str, project: str | None) -> OpenReject:
    return OpenReject(rid, "compute_usage", source_id, "missing_amount", project)


def test_only_rejects_not_found_again_are_closed() -> None:
    candidates = [_open("A", "cu-a", "p1"), _open("B", "cu-b", "p2")]
    found = {("compute_usage", "cu-b", "missing_amount")}
    whole = Examined("2026-05", frozenset({"compute_usage"}), "2026-05: whole month")
    assert no_longer_found(candidates, found, whole, {}) == ["A"]


def test_a_run_over_some_accounts_closes_their_projects_and_unknown_projects_only() -> None:
    candidates = [
        _open("MINE", "cu-1", "p-mine"),
        _open("OTHER", "cu-2", "p-other"),
        _open("GHOST", "cu-3", "ghost"),  # no such project: the platform-wide scans looked
        _open("NONE", "cu-4", None),
    ]
    owners = {"p-mine": "acct-1", "p-other": "acct-2"}
    shard = Examined("2026-05", frozenset({"compute_usage"}), "shard", frozenset({"acct-1"}))
    assert no_longer_found(candidates, set(), shard, owners) == ["GHOST", "MINE", "NONE"]
