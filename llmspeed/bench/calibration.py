"""Benchmark suite ``calibration``: how much of the 4-bit accuracy gap each method closes, on text the
calibration saw the like of and on text of kinds it never saw, and at what calibration cost.

Rows: fp32 (the baseline of every row), then round-to-nearest, HQQ, GPTQ, AWQ and AWQ+GPTQ at int4
g64 and g128, the calibrated methods at NF4 g64, int8 round-to-nearest, GPTQ int4 g64 calibrated
on the pydoc text alone (the default before the calibration mix), AWQ+GPTQ int4 g64 with
``damp=0.1``, and GPTQ and AWQ+GPTQ int4 at every group size with the MLP down projections at int8
(``int8_layers=SENSITIVE``), and round-to-nearest and GPTQ int4 at every group size with the down
projections quantized in a Hadamard-rotated basis (``hadamard_layers=SENSITIVE``), and round-to-nearest (every group size) and AWQ+GPTQ int4 g64 with int8
activations (``activations="int8"``), and the calibrated int4 rows without the least-squares scale
refit (``"no refit"``, ``refit_scales=False``), and GPTQ and AWQ+GPTQ int4 fitted to their own float
weights instead of the float model's output (``"no float targets"``, ``float_targets=False``; GPTQ also
with the down projections at int8; :data:`EXTRAS`). Every calibrated
row uses the method's default options and the default calibration text
(:func:`llmspeed.eval.calibration_mix`) unless its ``calibration`` column says otherwise.

Perplexity domains (:data:`DOMAINS`):

* ``pydoc``: the ``"eval"`` half of Python's documentation topics. The calibration domain: the mix
  holds pydoc prose from the ``"train"`` half (without the paragraphs the two halves share).
* ``license``: CPython's ``LICENSE.txt``, legal English. Never used for calibration or tuning.
* ``news``: IDLE's ``NEWS.txt``, a change log. Never used for calibration or tuning.

Columns: perplexity per domain, its change vs fp32, ``spread`` (the largest minus the smallest of the
three changes: a method whose cost does not depend on the text has a small spread), ``linear_MB``
(bytes of the linear layers, packed weights, scales and zero points: what ``int8_layers`` costs), the
calibration time (wall and CPU seconds; the machine may be shared, CPU seconds are the steadier number) and the
1-minute load average when the row started.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

CALIBRATED = ("gptq", "awq", "awq+gptq")
DOMAINS = ("pydoc", "license", "news")
UNSEEN = ("license", "news")  # never used for calibration or tuning
WINDOWS = {"pydoc": 16, "license": 6, "news": 16}  # 512-token windows; LICENSE.txt holds about 6


def _load(model: str, device: str):
    import llmspeed

    if model == "smollm2":
        return llmspeed.models.smollm2(device=device)
    raise ValueError(f"model must be 'smollm2' (calibration needs a real model and tokenizer); got {model!r}")


def domain_texts() -> dict[str, str]:
    """``{domain: text}`` of :data:`DOMAINS`."""
    from ..eval import license_text, news_text, pydoc_text

    return {"pydoc": pydoc_text("eval"), "license": license_text(), "news": news_text()}


Config = tuple[str, int | None, str, str, str]  # format, group, method, calibration, non-default options
# The non-default settings a row may carry (its options column): quantize keyword arguments.
EXTRAS: dict[str, dict[str, Any]] = {
    "-": {},
    "damp=0.1": {"method_options": {"damp": 0.1}},
    "no refit": {"method_options": {"refit_scales": False}},  # the scales as GPTQ / AWQ fitted them
    # each layer fitted to its own float weights on the quantized inputs (GPTQ's original objective)
    "no float targets": {"method_options": {"float_targets": False}},
    "int8 down_proj (no float targets)": {
        "int8_layers": ["*.mlp.down_proj"],
        "method_options": {"float_targets": False},
    },
    "int8 down_proj": {"int8_layers": ["*.mlp.down_proj"]},
    "hadamard down_proj": {"hadamard_layers": ["*.mlp.down_proj"]},  # down_proj's input rotated within groups
    "int8 activations": {"activations": "int8"},
    "int8 lm_head": {"lm_head": "int8"},  # the output head (and tied embedding) at int8: quantize's default
    "fp32 lm_head": {"lm_head": None},  # the output head left in float
}


def settings(fmt: str, extra: str) -> dict[str, Any]:
    """The ``quantize`` keyword arguments of a row's options (an int8 model's head is int8 without ``int8_layers``)."""
    out = dict(EXTRAS[extra])
    if fmt == "int8":
        out.pop("int8_layers", None)
    return out


def configurations(
    quick: bool,
    formats: tuple[str, ...],
    groups: tuple[int, ...] = (64, 128),
    methods: tuple[str, ...] | None = None,
    options: tuple[str, ...] | None = None,
) -> list[Config]:
    """``(format, group, method, calibration, options)`` rows, the headline (AWQ+GPTQ int4 g64) first.

    ``groups``: the int4 group sizes to measure (``quick``: 64 only); the comparison rows are g64 ones.
    ``methods``: keep only the rows of these methods (and the fp32 baseline); ``None``: all.
    ``options``: keep only the rows with these options (keys of :data:`EXTRAS`); ``None``: all.
    """
    rows: list[Config] = [("fp32", None, "-", "-", "-")]
    for g in (64,) if quick else groups:
        rows += [("int4", g, m, "-", "-") for m in ("rtn", "hqq")]
        rows += [("int4", g, m, "mix", "-") for m in CALIBRATED]
        rows += [("int4", g, "rtn", "-", "int8 activations")]
        rows += [("int4", g, m, "mix", "int8 down_proj") for m in ("gptq", "awq+gptq")]
        rows += [("int4", g, "rtn", "-", "hadamard down_proj"), ("int4", g, "gptq", "mix", "hadamard down_proj")]
        rows += [("int4", g, "rtn", "-", "fp32 lm_head")]
        rows += [("int4", g, m, "mix", "no refit") for m in CALIBRATED]
        rows += [("int4", g, m, "mix", "no float targets") for m in ("gptq", "awq+gptq")]
        rows += [("int4", g, "gptq", "mix", "int8 down_proj (no float targets)")]
    if quick or 64 in groups:  # int4 g64 comparison rows: only when g64 is measured
        rows += [
            ("int4", 64, "awq+gptq", "mix", "int8 activations"),
            ("int4", 64, "awq+gptq", "mix", "fp32 lm_head"),
        ]
    if not quick:
        rows += [("nf4", 64, "rtn", "-", "-")] + [("nf4", 64, m, "mix", "-") for m in CALIBRATED]
        rows += [("int8", None, "rtn", "-", "-"), ("int8", None, "rtn", "-", "fp32 lm_head")]
        if 64 in groups:
            rows += [("int4", 64, "gptq", "pydoc", "-"), ("int4", 64, "awq+gptq", "mix", "damp=0.1")]
    rows = [r for r in rows if r[0] == "fp32" or (r[0] in formats and (methods is None or r[2] in methods))]
    rows = [r for r in rows if r[0] == "fp32" or options is None or r[4] in options]
    rows.sort(key=lambda r: (r != ("int4", 64, "awq+gptq", "mix", "-"), r[0] != "fp32"))
    return rows


def run(
    *,
    device: str = "cpu",
    model: str = "smollm2",
    quick: bool = False,
    progress: bool = True,
    formats: tuple[str, ...] = ("int4", "nf4", "int8"),
    groups: tuple[int, ...] = (64, 128),
    methods: tuple[str, ...] | None = None,
    options: tuple[str, ...] | None = None,
) -> list[dict[str, Any]]:
    """Quantize ``model`` with each method and measure perplexity on every domain; one row per configuration.

    ``quick`` keeps fp32 and the int4 g64 rows, calibrates on 32 sequences and scores 4 windows
    per domain. ``formats`` limits the quantized rows (the fp32 baseline row is always measured);
    ``groups`` the int4 group sizes, ``methods`` the methods, ``options`` the options (:func:`configurations`).
    """
    unknown = set(formats) - {"int4", "nf4", "int8"}
    if unknown:
        raise ValueError(f"formats must be among ['int4', 'nf4', 'int8']; got {sorted(unknown)}")
    import llmspeed

    from ..eval import perplexity, pydoc_text

    texts = domain_texts()
    windows = {d: 4 if quick else n for d, n in WINDOWS.items()}
    calibration_options = dict(n_sequences=32 if quick else 128, seq_len=128, progress=progress)
    configs = configurations(quick, formats, groups, methods, options)
    rows: list[dict[str, Any]] = []
    for fmt, group, method, calibration, extra in configs:
        m = _load(model, device)
        wall = cpu = 0.0
        load1 = os.getloadavg()[0]
        if fmt != "fp32":
            calibrated = method in CALIBRATED
            kwargs = settings(fmt, extra)
            extra_options = kwargs.pop("method_options", {})
            method_options = {**calibration_options, **extra_options} if calibrated else None
            t0, c0 = time.perf_counter(), time.process_time()
            llmspeed.quantize(
                m,
                fmt,
                group,
                method=method,
                calibration=pydoc_text("train") if calibration == "pydoc" and calibrated else None,
                method_options=method_options,
                **kwargs,
            )
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        row: dict[str, Any] = {
            "format": fmt,
            "group": "-" if group is None else group,
            "method": method,
            "calibration": calibration,
            "options": extra,
        }
        for d in DOMAINS:
            row[f"ppl_{d}"] = perplexity(m, texts[d], n_windows=windows[d])
        row["linear_MB"] = round(llmspeed.memory_footprint(m)["linear"] / 1e6, 1)
        row.update(calib_wall_s=round(wall, 1), calib_cpu_s=round(cpu, 1), load_avg=round(load1, 1))
        rows.append(row)
        if progress:
            print(row, flush=True)
        del m
        if device == "cuda":
            torch.cuda.empty_cache()
    return _with_changes(rows)


def _with_changes(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add each domain's change vs fp32 and the spread between domains; sort rows by format, group, method."""
    base = next(r for r in rows if r["format"] == "fp32")
    out = []
    for r in rows:
        change = {d: (r[f"ppl_{d}"] / base[f"ppl_{d}"] - 1) * 100 for d in DOMAINS}
        new: dict[str, Any] = {k: r[k] for k in ("format", "group", "method", "calibration", "options")}
        for d in DOMAINS:
            new[f"ppl_{d}"] = r[f"ppl_{d}"]
            new[f"{d}_vs_fp32"] = f"{change[d]:+.1f}%"
        new["spread"] = f"{max(change.values()) - min(change.values()):.1f} pt"
        new.update({k: r[k] for k in ("linear_MB", "calib_wall_s", "calib_cpu_s", "load_avg") if k in r})
        new["baseline"] = "fp32 (same run)"
        out.append(new)
    fmt_order = ["fp32", "int4", "nf4", "int8"]
    method_order = ["-", "rtn", "hqq", "gptq", "awq", "awq+gptq"]
    return sorted(
        out,
        key=lambda r: (
            fmt_order.index(r["format"]),
            0 if r["group"] == "-" else r["group"],
            r["calibration"] == "pydoc" or r["options"] != "-",
            method_order.index(r["method"]),
        ),
    )
