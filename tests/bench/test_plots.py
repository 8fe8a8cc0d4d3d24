"""Plots: any suite's rows become PNGs without suite-specific code."""

from __future__ import annotations

from llmspeed.bench.plots import _label_columns, _metric_columns, group_rows, plot_rows


def test_generic_rows_are_grouped_and_plotted(tmp_path):
    rows = [
        {"table": "t/a", "format": "fp32", "baseline": "fp32", "tok/s": 10.0, "ppl": 15.0, "spread_%": 3.0},
        {"table": "t/a", "format": "int8", "baseline": "fp32", "tok/s": 14.0, "ppl": 15.1, "spread_%": 9.0},
        {"table": "t/b", "M": 1, "ms": 2.0},
        {"table": "t/b", "M": 4, "ms": 3.0},
    ]
    groups = group_rows(rows, "t")
    assert list(groups) == ["t/a", "t/b"]
    assert _label_columns(groups["t/a"]) == ["format"]
    assert _metric_columns(groups["t/a"], ["format"]) == ["tok/s", "ppl"]  # no spread, no constant columns
    assert _label_columns(groups["t/b"]) == ["M"]
    paths = plot_rows("t", rows, tmp_path)
    assert [p.name for p in paths] == ["t_a.png", "t_b.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_table_without_varying_numbers_has_no_plot(tmp_path):
    assert plot_rows("s", [{"name": "x", "value": 1.0}, {"name": "y", "value": 1.0}], tmp_path) == []
