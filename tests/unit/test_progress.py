"""Progress bars appear on a terminal's stderr only; pipes and files get logs alone."""

from __future__ import annotations

import io

import pytest

from billing_jobs import cli


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_progress_bar_when_stderr_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    update, stop = cli.progress_for("month-end")
    update(1, 2, "2026-05")
    stop()
    assert err.getvalue() == ""


def test_a_progress_bar_is_drawn_on_a_terminal_stderr_and_not_on_stdout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    err = Terminal()
    monkeypatch.setattr("sys.stderr", err)
    update, stop = cli.progress_for("month-end")
    update(1, 2, "2026-05")
    stop()
    assert "month-end 2026-05" in err.getvalue()
    assert capsys.readouterr().out == ""
