"""GGUF export measured in llama.cpp: the files ``llmspeed.save(..., format="gguf")`` writes, scored by llama.cpp
itself beside llmspeed's own score of the same model, and beside the files llama.cpp's ``llama_model_quantize``
makes from the same float weights.

One table: per file, who chose the codes, its size, and the perplexity llmspeed and llama.cpp each measure on the
same token windows (the evaluation half of the pydoc text). The float row shows the two runtimes agree; the
quantized rows show that the codes llmspeed chose (round to nearest, or GPTQ) are what llama.cpp runs, and how they
compare with llama.cpp's own quantizer. llama.cpp runs in a child process (:mod:`.llama_anchor`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

import llmspeed

from ..eval.text import pydoc_text
from .llama_anchor import llama_cpp_missing, llama_perplexity_isolated, pydoc_ids, requantized
from .models import load_model

THREADS = 2
# (row, llmspeed quantize() options, GGUF type llama.cpp's quantizer makes from the float file for comparison)
FILES: list[tuple[str, dict[str, Any] | None, str | None]] = [
    ("float", None, None),
    ("int4 g32 symmetric, round to nearest", dict(fmt="int4", group_size=32, symmetric=True), "Q4_0"),
    ("int4 g32 symmetric, GPTQ", dict(fmt="int4", group_size=32, symmetric=True, method="gptq"), None),
    ("int4 g32, round to nearest", dict(fmt="int4", group_size=32), "Q4_1"),
    ("int8", dict(fmt="int8"), "Q8_0"),
]
LLAMA_FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7}  # llama.cpp's LLAMA_FTYPE_MOSTLY_* values


def _windows(model: Any, window: int, n_windows: int) -> torch.Tensor:  # [n_windows, window]
    """The token windows :func:`llmspeed.eval.perplexity.perplexity` scores for this text and size."""
    return torch.tensor(pydoc_ids(model, window * n_windows)).view(n_windows, window)


def _row(name: str, by: str, path: Path, ours: float | None, windows: torch.Tensor) -> dict[str, Any]:
    import gguf

    theirs, note = llama_perplexity_isolated(path, windows, THREADS)
    types = sorted({t.tensor_type.name for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2})
    row: dict[str, Any] = {"model": name, "codes chosen by": by, "2-D tensor types": ", ".join(types),
                           "MB": round(path.stat().st_size / 1e6, 1),
                           "llmspeed perplexity": "—" if ours is None else round(ours, 3),
                           "llama.cpp perplexity": round(theirs, 3)}  # fmt: skip
    if note:
        row["note"] = note
    return row


def run(model: str = "smollm2", quick: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """The table described in the module docstring (``quick``: two 256-token windows instead of eight of 512)."""
    from tqdm.auto import tqdm

    missing = llama_cpp_missing()
    if missing:
        raise RuntimeError(missing)
    window, n_windows = (256, 2) if quick else (512, 8)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="llmspeed-gguf-") as tmp:
        work = Path(tmp)
        float_file: Path | None = None
        for name, options, theirs in tqdm(FILES, disable=not progress, desc="gguf"):
            m = load_model(model, progress=False)
            windows = _windows(m, window, n_windows)
            if options is not None:
                options = dict(options)
                fmt = options.pop("fmt")
                llmspeed.quantize(m, fmt, **options)
            ours = llmspeed.eval.perplexity(m, pydoc_text("eval"), window, n_windows)
            path = llmspeed.save(m, work / f"{len(rows)}.gguf", format="gguf")
            rows.append(_row(name, "llmspeed", path, ours, windows))
            if options is None:
                float_file = path
            if theirs is not None and float_file is not None:
                made = requantized(theirs, LLAMA_FTYPES[theirs], THREADS, float_file, "export", work)
                rows.append(_row(f"{theirs} of the float file", "llama.cpp (llama_model_quantize)", made, None, windows))
    return rows
