"""The report's charts: inline SVG, text kept as text, the same bytes for the same data."""

from __future__ import annotations

from billing_jobs import charts

PERIODS = ["2026-08", "2026-09", "2026-10"]


def test_a_chart_is_inline_svg_with_its_text_as_text() -> None:
    svg = charts.stacked_bars("Fees by line type", PERIODS, {"storage_fee": [290_000, 0, 125]})
    assert svg.startswith("<svg")
    assert "<?xml" not in svg
    assert "<!DOCTYPE" not in svg
    assert "<metadata" not in svg
    assert ">Fees by line type</text>" in svg  # svg.fonttype none: no glyph paths
    assert ">2026-09</text>" in svg
    assert "<image" not in svg


def test_the_same_data_give_the_same_bytes() -> None:
    series = {"funded": [10_000, 20_000, 0], "drawn": [5_000, 0, 1]}
    first = charts.grouped_bars("Credits funded and drawn", PERIODS, series)
    assert first == charts.grouped_bars("Credits funded and drawn", PERIODS, series)
    other = {**series, "drawn": [50_000, 0, 1]}
    assert first != charts.grouped_bars("Credits funded and drawn", PERIODS, other)
