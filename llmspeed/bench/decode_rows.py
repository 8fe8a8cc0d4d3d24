"""Decode steps by number of running rows: the fused C++ step (row loop or AMX tiles) against the per-layer path.

The fused step (:mod:`llmspeed.generation.fused_decode`) runs its matmuls either as GEMVs over the rows,
whose time grows with each row, or, on CPUs with AMX, as tile matmuls that read each weight once for
all rows; the per-layer path multiplies all rows at once (MKL, or the ``amx`` kernel). The crossovers set
:data:`~llmspeed.generation.fused_decode.AMX_ROWS` and :func:`~llmspeed.generation.fused_decode.default_max_rows`.
Each row count runs the three paths in turn, ``reps`` times, for fp32, int8, int4 g64, and int4 g64 with int8
activations (whose fused row loop multiplies integer codes on VNNI up to 16 rows, tiles or not).
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from tqdm.auto import tqdm

from ..generation import fused_decode
from ..quant import quantize
from .models import load_model
from .steps import decode_step_ms

ROWS = (1, 4, 8, 12, 16, 24, 32, 64)


def run(device: str = "cpu", model: str = "smollm2", quick: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Rows ``{table, format, rows, fused ms, fused AMX ms, per-layer ms, ..., default path}``; ``progress``: a tqdm
    bar over the formats (and transformers' over a checkpoint folder's weights)."""
    if device != "cpu":
        raise ValueError(f"the fused decode step runs on the CPU; got device={device!r}")
    reps, steps, rows_list = (1, 4, (1, 8, 16, 32)) if quick else (3, 8, ROWS)
    g = torch.Generator().manual_seed(0)
    out = []
    tiles = fused_decode.amx_available()
    for fmt in tqdm(("fp32", "int8", "int4", "int4, int8 activations"), disable=not progress, desc="decode rows"):
        m = load_model(model, "cpu", progress=progress)
        if fmt != "fp32":
            base, *options = fmt.split(", ")
            quantize(m, base, activations="int8" if "int8 activations" in options else "float")
        vocab = m.spec.vocab_size
        for rows in rows_list:
            prompts = [torch.randint(0, vocab, (32 + i,), generator=g).tolist() for i in range(rows)]
            fused, tiled, generic = [], [], []
            for _ in range(reps):
                fused.append(decode_step_ms(m, prompts, steps, fused_max_rows=rows, fused_amx_rows=0)[0])
                if tiles:
                    tiled.append(decode_step_ms(m, prompts, steps, fused_max_rows=rows, fused_amx_rows=1)[0])
                generic.append(decode_step_ms(m, prompts, steps, fused_decode=False)[0])
            default = decode_step_ms(m, prompts, 2)[1]
            f, p = statistics.median(fused), statistics.median(generic)
            t = statistics.median(tiled) if tiled else float("nan")
            out.append({"table": "decode step by rows", "format": fmt, "rows": rows, "fused ms": round(f, 1),
                        "fused AMX ms": round(t, 1), "per-layer ms": round(p, 1),
                        "fused / per-layer": round(f / p, 2), "fused AMX / per-layer": round(t / p, 2),
                        "default path": default, "max rows": fused_decode.default_max_rows() if fused_decode.default_max_rows() < 1 << 30 else "no limit",
                        "AMX_ROWS": fused_decode.AMX_ROWS if tiles else "(no AMX)"})  # fmt: skip
        del m
    return out
