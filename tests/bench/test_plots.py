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


def test_batching_chart_answers_two_questions(tmp_path):
    from llmspeed.bench.charts import batching

    rows = [
        {"system": "transformers generate_batch", "dtype": "fp32", "tok_s": 9.0, "vs_generate_batch": 1.0, "seconds": 10.0},
        {"system": "llmspeed Generator", "dtype": "fp32", "tok_s": 27.0, "vs_generate_batch": 3.0, "seconds": 3.3},
        {"system": "batch-1 decode step: llmspeed, fused CPU step", "dtype": "fp32", "tok_s": 30.0,
         "vs_generate_batch": "", "seconds": 0.033, "note": "1.23x the 26.9 ms to read 538 MB of weights at 20.0 GB/s"},
    ]
    paths = batching("batching", rows, tmp_path / "batching.png")
    assert [p.name for p in paths] == ["batching.png", "batching_decode.png"]
    # only the throughput rows carry a ratio: the decode rows do not appear in the ratio chart and vice versa
    assert batching("batching", rows[2:], tmp_path / "b.png") == [tmp_path / "b_decode.png"]


def test_a_decode_floor_that_rounds_to_zero_is_drawn_without_a_ratio(tmp_path):
    """Regression: a tiny model's note says "the 0.0 ms to read", and the step / floor label divided by zero."""
    from llmspeed.bench.charts import batching

    rows = [{"system": "batch-1 decode step: llmspeed, fused CPU step", "dtype": "fp32", "tok_s": 900.0,
             "vs_generate_batch": "", "seconds": 0.0011, "note": "30.00x the 0.0 ms to read 1 MB of weights at 20.0 GB/s"},
            {"system": "batch-1 decode step: transformers generate", "dtype": "fp32", "tok_s": 30.0,
             "vs_generate_batch": "", "seconds": 0.033, "note": "1.23x the 26.9 ms to read 538 MB of weights at 20.0 GB/s"}]  # fmt: skip
    assert batching("batching", rows, tmp_path / "b.png") == [tmp_path / "b_decode.png"]


def test_kernel_chart_groups_paths_per_shape_and_format(tmp_path):
    from llmspeed.bench.charts import _kernel_points, kernels

    rows = [
        {"table": "kernels", "case": "64x96 M=1 fp32 F.linear", "value": 10.0, "unit": "us"},
        {"table": "kernels", "case": "64x96 M=4 fp32 F.linear", "value": 20.0, "unit": "us"},
        {"table": "kernels", "case": "64x96 M=1 int8 fp32 cpp (auto)", "value": 5.0, "unit": "us"},
        {"table": "kernels", "case": "64x96 M=4 int8 fp32 cpp", "value": 9.0, "unit": "us"},
        {"table": "kernels", "case": "64x96 M=1 int8 bf16 cpp", "value": 6.0, "unit": "us"},  # bf16 activations: not drawn
        {"table": "kernels", "case": "64x96 M=1 int4 fp32 aten_int4_cpu", "value": float("nan"), "unit": "us"},
    ]
    panels = _kernel_points(rows)
    assert panels == {("64x96", "int8"): {"cpp": [(1, 5.0), (4, 9.0)], "fp32 F.linear": [(1, 10.0), (4, 20.0)]}}
    (path,) = kernels("kernels", rows, tmp_path / "kernels.png")
    from matplotlib.image import imread

    height, width = imread(path).shape[:2]
    assert width <= 1100 and height <= 1000  # one readable panel, not a tower of bars


def test_q4_grid_chart_plots_each_set_of_weights_and_leaves_out_the_median(tmp_path):
    from llmspeed.bench.charts import q4_grid
    from llmspeed.bench.plots import plot_rows

    rows = [{"weights": "embedded (Q4_1 blocks)", "llmspeed fp32 ppl": 18.2, "llmspeed int4 g64 ppl": 23.6,
             "llmspeed int4 g32 ppl": 22.2, "llama.cpp Q4_0 ppl": 22.8},
            {"weights": "reordered, seed 1", "llmspeed fp32 ppl": 18.2, "llmspeed int4 g64 ppl": 23.9,
             "llmspeed int4 g32 ppl": 23.0, "llama.cpp": "skipped: not installed"},
            {"weights": "median of 1 reorderings", "llmspeed fp32 ppl": 18.2, "llmspeed int4 g64 ppl": 23.9}]  # fmt: skip
    (path,) = plot_rows("q4_grid", rows, tmp_path)  # registered: this chart, not generic bars
    assert path.name == "q4_grid.png" and path.stat().st_size > 1000
    assert q4_grid("q4_grid", [rows[-1]], tmp_path / "none.png") == [] and not (tmp_path / "none.png").exists()


def test_q4_grid_chart_states_the_bits_a_g32_weight_takes():
    # the legend said 6 bits, the cost while scales and zeros were fp32; they are fp16 now (4 + 32/32 bits)
    import torch

    from llmspeed.bench.charts import _GRID_SERIES
    from llmspeed.quant import QuantConfig, module_class

    lin = torch.nn.Linear(64, 32, bias=False)
    packed = module_class("int4").from_linear(lin, QuantConfig("int4", group_size=32))
    bits = 8 * sum(t.nbytes for t in packed.buffers()) / lin.weight.numel()
    (label,) = [label for key, label, _, _ in _GRID_SERIES if key == "llmspeed int4 g32 ppl"]
    assert f"({bits:g} bits a weight)" in label


def test_a_row_without_a_number_gets_no_bar_not_a_bar_at_zero(tmp_path, monkeypatch):
    """Regression: generic bars drew a row whose metric was None (a skipped or failed measurement) as a 0 bar."""
    import math

    from llmspeed.bench import plots

    figures = []
    original = plots._figure
    monkeypatch.setattr(plots, "_figure", lambda w, h: figures.append(original(w, h)) or figures[-1])
    rows = [{"format": "fp32", "tok/s": 10.0}, {"format": "int8", "tok/s": None}, {"format": "int4", "tok/s": 14.0}]
    (path,) = plot_rows("t", rows, tmp_path)
    (ax,) = figures[0].axes
    widths = [bar.get_width() for bar in ax.patches]
    assert widths[0] == 10.0 and widths[2] == 14.0 and math.isnan(widths[1]), widths
    assert [t.get_text() for t in ax.get_yticklabels()] == ["fp32", "int8", "int4"] and ax.get_title() == "tok/s"


def test_panels_speed_first_labels_skip_empty_cells_and_loss_lines_skip_missing_steps(tmp_path):
    from llmspeed.bench.plots import _label, _loss_lines

    rows = [{"format": "a", "ppl": 1.0, "tok/s": 2.0}, {"format": "b", "ppl": 3.0, "tok/s": 4.0}]
    assert _metric_columns(rows, ["format"]) == ["tok/s", "ppl"]  # speed before quality, whatever the column order
    assert _label({"format": "int4", "group": None, "method": ""}, ["format", "group", "method"]) == "int4"
    loss = [{"config": "lora", "precision": "fp32", "loss@1": 2.0, "loss@2": None, "loss@3": 1.5}]
    assert _loss_lines("training/loss", loss, tmp_path / "loss.png") == tmp_path / "loss.png"


def test_a_chart_whose_values_are_all_zero_gets_a_nonzero_axis(tmp_path):
    """Regression: every ratio (or step) at 0 set the axis to (0, 0), and matplotlib warned about identical limits."""
    import warnings

    from llmspeed.bench.charts import batching

    rows = [{"system": "llmspeed Generator", "dtype": "fp32", "tok_s": 0.0, "vs_generate_batch": 0.0, "seconds": 1.0},
            {"system": "batch-1 decode step: llmspeed, fused CPU step", "dtype": "fp32", "tok_s": 0.0,
             "vs_generate_batch": "", "seconds": 0.0}]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert batching("b", rows, tmp_path / "b.png") == [tmp_path / "b.png", tmp_path / "b_decode.png"]
