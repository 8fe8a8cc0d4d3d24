"""PNG plots of benchmark rows (matplotlib, headless).

Rows are grouped by their ``"table"`` key (the suite name when absent). A table with a plotter
registered in :data:`PLOTTERS` gets that plot; any other gets bar charts of its main numeric
columns, one bar per row, labelled by the row's text columns, so a new suite is plotted
without code here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]
# Columns that describe a row rather than measure it, or measure the noise: never bars.
_META = {"table", "baseline", "note", "status"}
# Metric columns plotted first when a table has more than fit: speed, then memory, then quality.
_PREFERRED = ("tok/s", "speedup", "throughput", "_ms", "ms", "MB", "memory", "ppl", "loss")
MAX_PANELS = 4


def group_rows(rows: Sequence[Row], default: str) -> dict[str, list[Row]]:
    """Rows grouped by their ``"table"`` key (``default`` when absent), in first-seen order."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(str(row.get("table", default)), []).append(row)
    return groups


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _label(row: Row, columns: list[str]) -> str:
    return " ".join(str(row[c]) for c in columns if row.get(c) not in (None, ""))


def _label_columns(rows: list[Row]) -> list[str]:
    """Columns that name a row: text columns, and integer columns that vary (like ``M``)."""
    columns: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key in _META or key in columns:
                continue
            varies = len({str(r.get(key)) for r in rows}) > 1
            if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool) and varies):
                columns.append(key)
    return columns


def _metric_columns(rows: list[Row], label_columns: list[str]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key in keys or key in _META or key in label_columns or "spread" in key:
                continue
            if _is_number(value) and len({r.get(key) for r in rows}) > 1:
                keys.append(key)

    def rank(key: str) -> int:
        return next((i for i, word in enumerate(_PREFERRED) if word in key), len(_PREFERRED))

    return sorted(keys, key=rank)[:MAX_PANELS]


def _figure(width: float, height: float):
    # the object API: no pyplot state, no GUI backend, safe inside notebooks and threads
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "plot"


def _bars(name: str, rows: list[Row], path: Path) -> Path | None:
    label_columns = _label_columns(rows)
    metrics = _metric_columns(rows, label_columns)
    if not metrics:
        return None
    labels = [_label(r, label_columns) or str(i) for i, r in enumerate(rows)]
    fig = _figure(4.2 * len(metrics), 0.45 * len(rows) + 1.6)
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        # a row without this number gets no bar (NaN draws nothing), never a bar at 0 that reads as a measurement
        values = [float(r[metric]) if _is_number(r.get(metric)) else float("nan") for r in rows]
        ax.barh(range(len(rows)), values, color="#3b75af")
        ax.set_yticks(range(len(rows)), labels if ax is axes[0][0] else [""] * len(rows), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(metric, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(name, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _matmul_lines(name: str, rows: list[Row], path: Path) -> Path | None:
    """GFLOP/s against M, one line per dtype, one panel per weight shape."""
    shapes = sorted({(r["K"], r["N"]) for r in rows})
    fig = _figure(4.5 * len(shapes), 3.4)
    axes = fig.subplots(1, len(shapes), squeeze=False)
    for ax, (k, n) in zip(axes[0], shapes):
        for dtype in dict.fromkeys(r["dtype"] for r in rows):
            pts = sorted(
                (r["M"], r["GFLOP/s"]) for r in rows if (r["K"], r["N"], r["dtype"]) == (k, n, dtype)
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=dtype)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens per matmul)")
        ax.set_ylabel("GFLOP/s")
        ax.set_title(f"F.linear, weight {n}x{k}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(name, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _loss_lines(name: str, rows: list[Row], path: Path) -> Path | None:
    """Training loss against step (the ``loss@<step>`` columns), one line per precision, one panel per config."""
    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig = _figure(4.5 * len(configs), 3.4)
    axes = fig.subplots(1, len(configs), squeeze=False)
    for ax, config in zip(axes[0], configs):
        for row in (r for r in rows if r["config"] == config):
            pts = [(int(k.split("@")[1]), v) for k, v in row.items() if k.startswith("loss@") and _is_number(v)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=row["precision"])
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats/token)")
        ax.set_title(config, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(name, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _charts(kind: str) -> Callable[[str, list[Row], Path], list[Path]]:
    def plot(name: str, rows: list[Row], path: Path) -> list[Path]:
        from . import charts

        return getattr(charts, kind)(name, rows, path)

    return plot


# a plotter returns the path it wrote (or None), or a list of paths when it draws one chart per question
PLOTTERS: dict[str, Callable[[str, list[Row], Path], Any]] = {
    "precision/matmul": _matmul_lines,
    "training/loss": _loss_lines,
    "batching": _charts("batching"),
    "kernels": _charts("kernels"),
    "q4_grid": _charts("q4_grid"),
}


def plot_rows(suite: str, rows: Sequence[Row], out_dir: str | Path) -> list[Path]:
    """Write one PNG per table of ``rows`` into ``out_dir``; return the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, table in group_rows(rows, suite).items():
        plotter = PLOTTERS.get(name, _bars)
        made = plotter(name, table, out_dir / f"{_safe_name(name)}.png")
        written += [] if made is None else made if isinstance(made, list) else [made]
    return written
