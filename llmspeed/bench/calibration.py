"""Benchmark suite ``calibration``: how much of the int4 accuracy gap GPTQ and HQQ close, and at what cost.

Rows: fp32 (the baseline of every row), then round-to-nearest / HQQ / GPTQ at int4 g64 and g128,
NF4 g64 and int8 with and without GPTQ. Columns: perplexity on the pydoc evaluation windows (text
no method ever sees), its change vs fp32, the calibration time (wall and CPU seconds; the machine
may be shared, CPU seconds are the steadier number) and, for fp32 and int4 g64 RTN/GPTQ, perplexity on the
calibration text itself ("seen") and on a held-out slice of the same half ("held-out") that
calibration never saw: a method that overfits its calibration text gains on "seen" only.

Text split: the pydoc ``"train"`` half is cut by characters at :data:`CALIB_FRACTION`; GPTQ
calibrates on the first part, the held-out windows come from the second. The evaluation windows
come from the ``"eval"`` half, as everywhere in llmspeed.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

CALIB_FRACTION = 0.6  # of the pydoc "train" half's characters used for calibration


def _load(model: str, device: str):
    import llmspeed

    if model == "smollm2":
        return llmspeed.models.smollm2(device=device)
    raise ValueError(f"model must be 'smollm2' (calibration needs a real model and tokenizer); got {model!r}")


def _texts() -> tuple[str, str]:
    from ..eval import pydoc_text

    train = pydoc_text("train")
    cut = int(len(train) * CALIB_FRACTION)
    return train[:cut], train[cut:]


def run(
    *,
    device: str = "cpu",
    model: str = "smollm2",
    quick: bool = False,
    progress: bool = True,
    formats: tuple[str, ...] = ("int4", "nf4", "int8"),
) -> list[dict[str, Any]]:
    """Quantize ``model`` with each method and measure perplexity; returns one row per configuration.

    ``quick`` keeps fp32 and the int4 g64 rows, calibrates on 32 sequences and scores 4 windows.
    ``formats`` limits the quantized rows (the fp32 baseline row is always measured).
    """
    unknown = set(formats) - {"int4", "nf4", "int8"}
    if unknown:
        raise ValueError(f"formats must be among ['int4', 'nf4', 'int8']; got {sorted(unknown)}")
    import llmspeed

    from ..eval import perplexity

    calib_text, heldout_text = _texts()
    n_eval, n_side = (4, 2) if quick else (16, 4)
    gptq_opts = dict(n_sequences=32 if quick else 128, seq_len=128, progress=progress)
    configs: list[tuple[str, int | None, str]] = [("fp32", None, "-")]
    for g in (64,) if quick else (64, 128):
        configs += [("int4", g, "rtn"), ("int4", g, "gptq"), ("int4", g, "hqq")]
    if not quick:
        configs += [("nf4", 64, "rtn"), ("nf4", 64, "gptq"), ("int8", None, "rtn"), ("int8", None, "gptq")]
    configs = [c for c in configs if c[0] == "fp32" or c[0] in formats]

    # GPTQ g64 first: on a busy machine the headline number arrives first. vs_fp32 is filled in at the end.
    configs.sort(key=lambda c: 0 if c == ("int4", 64, "gptq") else 1)
    rows: list[dict[str, Any]] = []
    for fmt, group, method in configs:
        m = _load(model, device)
        wall = cpu = 0.0
        load1 = os.getloadavg()[0]
        if fmt != "fp32":
            t0, c0 = time.perf_counter(), time.process_time()
            llmspeed.quantize(
                m,
                fmt,
                group,
                method=method,
                calibration=calib_text if method == "gptq" else None,
                method_options=gptq_opts if method == "gptq" else None,
            )
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        ppl = perplexity(m, n_windows=n_eval)
        row: dict[str, Any] = {
            "format": fmt,
            "group": "-" if group is None else group,
            "method": method,
            "ppl_eval": ppl,
            "vs_fp32": "",
            "calib_wall_s": round(wall, 1),
            "calib_cpu_s": round(cpu, 1),
            "load_avg": round(load1, 1),
            "ppl_seen": "",
            "ppl_heldout": "",
            "baseline": "fp32 (same run)",
        }
        if fmt == "fp32" or (fmt == "int4" and group == 64 and method in ("rtn", "gptq")):
            row["ppl_seen"] = perplexity(m, calib_text, n_windows=n_side)
            row["ppl_heldout"] = perplexity(m, heldout_text, n_windows=n_side)
        rows.append(row)
        if progress:
            print(row, flush=True)
        del m
        if device == "cuda":
            torch.cuda.empty_cache()
    fp32_ppl = next(r["ppl_eval"] for r in rows if r["format"] == "fp32")
    for r in rows:
        r["vs_fp32"] = f"{(r['ppl_eval'] / fp32_ppl - 1) * 100:+.1f}%"
    order = {
        c: i
        for i, c in enumerate(
            sorted(
                configs,
                key=lambda c: (
                    c[0] != "fp32",
                    ["fp32", "int4", "nf4", "int8"].index(c[0]),
                    c[1] or 0,
                    c[2] != "rtn",
                    c[2],
                ),
            )
        )
    }
    return sorted(
        rows, key=lambda r: order[(r["format"], None if r["group"] == "-" else r["group"], r["method"])]
    )
