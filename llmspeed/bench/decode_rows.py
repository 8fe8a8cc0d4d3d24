"""Decode steps by number of running rows: the fused C++ step against the per-layer path, fp32 and int8.

The fused step (:mod:`llmspeed.generation.fused_decode`) runs every matmul as a GEMV over the rows, so
its time grows with each row; the per-layer path multiplies all rows at once (MKL, or the ``amx`` int8
kernel where it builds). The crossover sets :data:`~llmspeed.generation.fused_decode.MAX_ROWS`, the most
rows a step sends to the fused path. Each row count runs both paths in turn, ``reps`` times.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from ..generation import fused_decode
from ..quant import quantize
from .models import load_model
from .steps import decode_step_ms

ROWS = (1, 4, 8, 12, 16, 24, 32, 64)


def run(device: str = "cpu", model: str = "smollm2", quick: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Rows ``{table, format, rows, fused ms, per-layer ms, fused / per-layer, default path}``."""
    if device != "cpu":
        raise ValueError(f"the fused decode step runs on the CPU; got device={device!r}")
    reps, steps, rows_list = (1, 4, (1, 8, 16, 32)) if quick else (3, 8, ROWS)
    g = torch.Generator().manual_seed(0)
    out = []
    for fmt in ("fp32", "int8"):
        m = load_model(model, "cpu")
        if fmt == "int8":
            quantize(m, "int8")
        vocab = m.spec.vocab_size
        for rows in rows_list:
            prompts = [torch.randint(0, vocab, (32 + i,), generator=g).tolist() for i in range(rows)]
            fused, generic, default = [], [], ""
            for _ in range(reps):
                fused.append(decode_step_ms(m, prompts, steps, fused_max_rows=rows)[0])
                generic.append(decode_step_ms(m, prompts, steps, fused_decode=False)[0])
            default = decode_step_ms(m, prompts, 2)[1]
            f, p = statistics.median(fused), statistics.median(generic)
            out.append({"table": "decode step by rows", "format": fmt, "rows": rows, "fused ms": round(f, 1),
                        "per-layer ms": round(p, 1), "fused / per-layer": round(f / p, 2),
                        "default path": default, "MAX_ROWS": fused_decode.MAX_ROWS})  # fmt: skip
        del m
    return out
