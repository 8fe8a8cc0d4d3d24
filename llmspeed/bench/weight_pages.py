"""Weights in 2 MiB pages against 4 KiB pages (:mod:`llmspeed.huge_pages`): decode steps and a prompt, format by
format, and the fused step's fp32 GEMV over a 96 MiB weight.

Each format loads the model twice: one copy stays where loading put it (a safetensors file's memory map, or
``torch``'s allocations after a cast or quantization: 4 KiB pages), the other is moved into 2 MiB pages. The two are
timed in turn, ``reps`` times (generators made with ``LLMSPEED_HUGE_PAGES=0`` for the first, so they leave it
there), and each ratio is the median of the turns' ratios: a shared host's drift cancels in a ratio taken in one
turn.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import huge_pages
from ..generation import Generator, SamplingParams, fused_decode
from ..precision import cast
from ..quant import quantize
from .models import load_model
from .steps import decode_step_ms

FORMATS = ("fp32", "bf16", "int8", "int4")
GEMV_MB = 96  # the probe weight: more than the last-level cache
PROMPT = 256  # tokens of the timed prompt


@contextlib.contextmanager
def _pages(on: bool) -> Iterator[None]:
    """Generators made inside move the weights into 2 MiB pages (``on``) or leave them (``LLMSPEED_HUGE_PAGES=0``)."""
    before = os.environ.get(huge_pages.ENV)
    if on:
        os.environ.pop(huge_pages.ENV, None)
    else:
        os.environ[huge_pages.ENV] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(huge_pages.ENV, None)
        else:
            os.environ[huge_pages.ENV] = before


def _model(name: str, fmt: str, progress: bool):
    m = load_model(name, "cpu", progress=progress)
    if fmt == "bf16":
        cast(m, "bf16")
    elif fmt in ("int8", "int4"):
        quantize(m, fmt)
    return m


def _prefill_ms(model, prompt: list[int]) -> float:
    g = Generator(model, kv_cache_tokens=1024, progress=False)
    g.add_request(prompt, SamplingParams(max_new_tokens=1))
    start = time.perf_counter()
    g.step()
    return (time.perf_counter() - start) * 1e3


def _gemv_rows(reps: int) -> list[dict[str, Any]]:
    """GB/s of the fused step's fp32 GEMV (``prefetch`` and ``stream`` row loops) over ``GEMV_MB`` in each page size."""
    ext = fused_decode.extension()
    if ext is None:
        return []
    k = 576
    plain = torch.ones(GEMV_MB * 2**20 // (4 * k), k)  # [n, k]
    huge = huge_pages.empty(tuple(plain.shape), torch.float32).fill_(1.0)
    x, none = torch.ones(1, k), torch.empty(0)
    times: dict[tuple[str, bool], list[float]] = {}
    for _ in range(reps * 3):
        for pages, w in (("4 KiB", plain), ("2 MiB", huge)):
            for prefetch in (True, False):
                ext.float_prefetch(prefetch)
                start = time.perf_counter()
                ext.gemv(x, w, none, none, 0, False)
                times.setdefault((pages, prefetch), []).append(time.perf_counter() - start)
    fused_decode.float_prefetch(k)  # the choice of this machine, back in the extension
    return [{"table": "fused fp32 GEMV over 96 MiB", "pages": pages, "row loop": "prefetch" if prefetch else "stream",
             "GB/s": round(plain.numel() * 4 / statistics.median(t) / 1e9, 1)}
            for (pages, prefetch), t in times.items()]  # fmt: skip


def run(device: str = "cpu", model: str = "smollm2", quick: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Rows of two tables: ``decode step by page size`` (per format: ms in 4 KiB and 2 MiB pages at one and eight
    sequences, a prompt's ms, their ratios, the seconds the move took) and ``fused fp32 GEMV over 96 MiB``."""
    if device != "cpu":
        raise ValueError(f"weight pages are a CPU measurement; got device={device!r}")
    why = huge_pages.why_not()
    if why is not None:
        raise RuntimeError(f"2 MiB pages cannot be used here: {why}")
    reps, steps = (2, 4) if quick else (5, 16)
    out = []
    for fmt in tqdm(FORMATS, disable=not progress, desc="weight pages"):
        plain, moved = _model(model, fmt, progress), _model(model, fmt, progress)
        start = time.perf_counter()
        nbytes = huge_pages.move(moved.module)
        seconds = time.perf_counter() - start
        vocab = plain.spec.vocab_size
        g = torch.Generator().manual_seed(0)
        one = [torch.randint(0, vocab, (128,), generator=g).tolist()]
        eight = [torch.randint(0, vocab, (128,), generator=g).tolist() for _ in range(8)]
        prompt = torch.randint(0, vocab, (PROMPT,), generator=g).tolist()
        t: dict[str, list[float]] = {}
        for _ in range(reps):
            for pages, m in (("4 KiB", plain), ("2 MiB", moved)):
                with _pages(pages == "2 MiB"):
                    t.setdefault(f"1 seq {pages}", []).append(decode_step_ms(m, one, steps)[0])
                    t.setdefault(f"8 seqs {pages}", []).append(decode_step_ms(m, eight, steps)[0])
                    t.setdefault(f"prompt {pages}", []).append(_prefill_ms(m, prompt))
        row: dict[str, Any] = {"table": "decode step by page size", "format": fmt, "MB moved": round(nbytes / 1e6),
                               "move s": round(seconds, 2)}  # fmt: skip
        for what in ("1 seq", "8 seqs", "prompt"):
            small, big = t[f"{what} 4 KiB"], t[f"{what} 2 MiB"]
            row[f"{what} ms, 4 KiB"] = round(statistics.median(small), 2)
            row[f"{what} ms, 2 MiB"] = round(statistics.median(big), 2)
            row[f"{what}, 2 MiB / 4 KiB"] = round(statistics.median(b / s for s, b in zip(small, big)), 3)
        out.append(row)
        del plain, moved
    return out + _gemv_rows(reps)
