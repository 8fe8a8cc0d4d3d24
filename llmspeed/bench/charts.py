"""Charts that each answer one question about a suite's rows (registered in :data:`llmspeed.bench.plots.PLOTTERS`).

* ``batching``: how much faster than transformers ``generate_batch`` is each system? (labelled ratio
  bars, the baseline at 1), and how close is a batch-1 decode step to the time it takes to read the
  weights once? (step time beside the weight-read floor).
* ``kernels``: how does each matmul path's time grow with M, per format and weight shape? (log-log
  lines, one per path, fp32 ``F.linear`` dashed as the reference).
* ``q4_grid``: is llmspeed's int4 worse than Q4_0 when the weights favour neither's blocks? (perplexity per
  reordering, both formats and llmspeed's g32 side by side, fp32 as the floor).

Each returns the PNG paths it wrote; rows it does not understand are left out, never guessed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

Row = dict[str, Any]
_FLOOR = re.compile(r"the ([\d.]+) ms to read")
_CASE = re.compile(r"(?P<shape>\d+x\d+) M=(?P<m>\d+) (?P<rest>.+)")
_FORMATS = ("int8", "int4", "nf4")
# one colour per matmul path on every panel
_PATH_COLORS = {"cpp": "#1f77b4", "dequant_fp32": "#2ca02c", "aten_int8": "#d62728", "int8_dynamic": "#ff7f0e",
                "aten_int4_cpu": "#9467bd", "reference": "#8c564b", "fp32 F.linear": "black"}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def batching(name: str, rows: list[Row], path: Path) -> list[Path]:
    """Throughput against the ``generate_batch`` baseline (``path``) and decode step against its floor."""
    written = []
    runs = [r for r in rows if _number(r.get("vs_generate_batch")) is not None]
    if runs:
        labels = [f"{r['system']} ({r['dtype']})" for r in runs]
        ratios = [float(r["vs_generate_batch"]) for r in runs]
        fig = _figure(8, 0.42 * len(runs) + 1.5)
        ax = fig.subplots()
        colors = ["#3b75af" if r["system"].startswith("llmspeed") else "#9a9a9a" for r in runs]
        ax.barh(range(len(runs)), ratios, color=colors)
        for i, (ratio, row) in enumerate(zip(ratios, runs)):
            ax.text(ratio, i, f" {ratio:.2f}x ({row['tok_s']:.1f} tok/s)", va="center", fontsize=8)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(runs)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max([*ratios, 1.0]) * 1.35)  # the baseline in view, and never (0, 0) when every ratio is 0
        ax.set_xlabel("useful tokens/s / transformers generate_batch's (same run)", fontsize=9)
        ax.set_title("Continuous batching: throughput against transformers", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        written.append(path)
    steps = [r for r in rows if str(r.get("system", "")).startswith("batch-1 decode step")]
    if steps:
        decode_path = path.with_name(path.stem + "_decode.png")
        labels = [r["system"].removeprefix("batch-1 decode step: ") for r in steps]
        ms = [1e3 * float(r["seconds"]) for r in steps]
        floors = [float(m[1]) if (m := _FLOOR.search(str(r.get("note", "")))) else None for r in steps]
        fig = _figure(8, 0.42 * len(steps) + 1.5)
        ax = fig.subplots()
        ax.barh(range(len(steps)), ms, color="#3b75af", label="decode step")
        for i, (step, floor) in enumerate(zip(ms, floors)):
            if floor == 0:  # a tiny model: the note rounds its read time to 0.0 ms, no ratio to show
                ax.text(step, i, f" {step:.1f} ms (the floor rounds to 0.0 ms)", va="center", fontsize=8)
            elif floor is not None:
                ax.plot([floor, floor], [i - 0.4, i + 0.4], color="#c0392b", linewidth=2,
                        label="reading the weights once" if i == 0 else None)
                ax.text(step, i, f" {step:.1f} ms ({step / floor:.2f}x the floor)", va="center", fontsize=8)
            else:
                ax.text(step, i, f" {step:.1f} ms", va="center", fontsize=8)
        ax.set_yticks(range(len(steps)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max([*ms, *(f for f in floors if f)]) * 1.45 or 1.0)  # not (0, 0) when every step is 0 ms
        ax.set_xlabel("ms per step (red: weight bytes / measured memory bandwidth)", fontsize=9)
        ax.set_title("Batch-1 decode step against the weight-read floor", fontsize=10)
        ax.legend(fontsize=8, loc="upper right")
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(decode_path, dpi=100)
        written.append(decode_path)
    return written


def _kernel_points(rows: list[Row]) -> dict[tuple[str, str], dict[str, list[tuple[int, float]]]]:
    """``{(shape, format): {path: [(M, us), ...]}}`` for fp32 activations, with fp32 ``F.linear`` in each."""
    reference: dict[str, list[tuple[int, float]]] = {}
    panels: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = {}
    for row in rows:
        match = _CASE.fullmatch(str(row.get("case", "")))
        value = _number(row.get("value"))
        if match is None or value is None or row.get("unit") != "us":
            continue
        shape, m, rest = match["shape"], int(match["m"]), match["rest"].removesuffix(" (auto)")
        if rest == "fp32 F.linear":
            reference.setdefault(shape, []).append((m, value))
            continue
        parts = rest.split(" ", 2)
        if len(parts) == 3 and parts[0] in _FORMATS and parts[1] == "fp32":
            lines = panels.setdefault((shape, parts[0]), {})
            if (m, value) not in lines.setdefault(parts[2], []):
                lines[parts[2]].append((m, value))
    for (shape, _), lines in panels.items():
        if shape in reference:
            lines["fp32 F.linear"] = reference[shape]
    return panels


def kernels(name: str, rows: list[Row], path: Path) -> list[Path]:
    """Microseconds per call against M, one panel per (weight shape, format), one line per path."""
    panels = _kernel_points(rows)
    if not panels:
        return []
    shapes = sorted({s for s, _ in panels}, key=lambda s: math.prod(map(int, s.split("x"))))
    formats = [f for f in _FORMATS if any((s, f) in panels for s in shapes)]
    fig = _figure(3.4 * len(formats), 2.9 * len(shapes) + 0.6)
    axes = fig.subplots(len(shapes), len(formats), squeeze=False)
    for i, shape in enumerate(shapes):
        for j, fmt in enumerate(formats):
            ax = axes[i][j]
            for label, pts in sorted(panels.get((shape, fmt), {}).items()):
                pts = sorted(pts)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=label,
                        color=_PATH_COLORS.get(label), linestyle="--" if label == "fp32 F.linear" else "-")
            ax.set_xscale("log", base=2)
            ticks = sorted({p[0] for pts in panels.get((shape, fmt), {}).values() for p in pts})
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_yscale("log")
            ax.set_title(f"{fmt} weights, {shape}", fontsize=9)
            ax.set_xlabel("M (rows per call)", fontsize=8)
            ax.set_ylabel("microseconds per call", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=6)
    fig.suptitle("Quantized matmul paths with fp32 activations (lower is faster; dashed: fp32 F.linear)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return [path]


_GRID_SERIES = (("llmspeed int4 g64 ppl", "llmspeed int4 g64", "#1f77b4", "o"),
                ("llama.cpp Q4_0 ppl", "llama.cpp Q4_0", "#ff7f0e", "s"),
                ("llmspeed int4 g32 ppl", "llmspeed int4 g32 (5 bits a weight)", "#2ca02c", "^"))  # fmt: skip


def q4_grid(name: str, rows: list[Row], path: Path) -> list[Path]:
    """Perplexity per set of weights (the embedded model, then each reordering), one marker series per format."""
    rows = [r for r in rows if not str(r.get("weights", "")).startswith("median") and _number(r.get("llmspeed fp32 ppl"))]
    if not rows:
        return []
    fig = _figure(max(6.0, 0.55 * len(rows) + 2.5), 4.0)
    ax = fig.subplots()
    x = list(range(len(rows)))
    for key, label, color, marker in _GRID_SERIES:
        pts = [(i, _number(r.get(key))) for i, r in zip(x, rows) if _number(r.get(key)) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle="none", color=color, label=label)
    ax.axhline(_number(rows[0]["llmspeed fp32 ppl"]), color="black", linestyle="--", linewidth=1, label="fp32")
    ax.axvline(0.5, color="grey", linewidth=0.8)
    ax.set_xticks(x, ["embedded\n(Q4_1 blocks)" if str(r["weights"]).startswith("embedded") else
                      str(r["weights"]).rsplit(" ", 1)[-1] for r in rows], fontsize=7)  # fmt: skip
    ax.set_xlabel("weights: the embedded model, then reorderings by seed (the same function)", fontsize=8)
    ax.set_ylabel("perplexity (pydoc windows)", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 0.1), ncol=4)
    fig.suptitle("int4 against llama.cpp's Q4_0 when the blocks favour neither (lower is better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return [path]
