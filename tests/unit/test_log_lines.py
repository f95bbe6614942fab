"""A log record is one write, newline included: the worker processes of a run share
stderr, and a record written in two parts (text, then newline) lets another
process's record in between, leaving two JSON objects on one line."""

from __future__ import annotations

import io
import json
import sys

import pytest

from billing_jobs import logs


class Writes(io.StringIO):
    """A stderr that remembers each write call, as an unbuffered stream passes each
    one to the operating system."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)

    def isatty(self) -> bool:
        return False


def test_each_log_record_is_one_write_ending_in_its_newline(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = Writes()
    monkeypatch.setattr(sys, "stderr", stderr)
    before = logs.configured()
    try:
        logs.configure("DEBUG", json=True)
        log = logs.named("billing_jobs.test")
        log.info("first.event", chunk=1)
        log.debug("second.event", detail="x" * 300)
    finally:
        monkeypatch.undo()
        logs.configure(before[0], json=before[1])
    assert len(stderr.calls) == 2
    for call in stderr.calls:
        assert call.endswith("\n")
        assert call.count("\n") == 1
        json.loads(call)
    assert [json.loads(c)["event"] for c in stderr.calls] == ["first.event", "second.event"]
