"""``kernel="auto"`` on the CPU: what timing the candidates costs on first use, and what it buys.

Per format, on one quantized model: the seconds spent timing candidates while a generation workload
(prefill chunks, decode at batch 1 and 8) meets every layer shape and rows bucket for the first
time; then the rule table's choices against the timed ones, interleaved rep by rep on the same
model (the modules re-bind their kernels at each switch), for a 256-token prefill and for decode
steps at batch 1 and 8. Every step runs on the per-layer path (``fused_decode=False``): the fused CPU
step reads the packed weights itself, for decode rows and, since it takes prompt chunks too, for
prefills, and never calls these kernels, so the default path is the same either way.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..generation import Generator, SamplingParams
from ..quant import quantize
from ..quant.kernels import tuning
from .models import load_model
from .steps import decode_step_ms

FORMATS = ("int8", "int4", "nf4")


def _rebind(model) -> None:
    """Make every quantized module choose its kernels again on its next call."""
    for module in model.module.modules():
        if hasattr(module, "_kernels"):
            module._kernels = {}


def _mode(model, tuned: bool) -> None:
    os.environ[tuning.AUTOTUNE_ENV] = "1" if tuned else "0"
    _rebind(model)


def _prompt(model, n: int) -> list[int]:
    """``n`` token ids of code (random ids in range for a model without a tokenizer)."""
    if model.tokenizer is None:
        return torch.randint(1, model.spec.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    ids = model.tokenizer("def f(x):\n    return x + 1\n" * 64)["input_ids"]
    return list(ids[:n])


def _decode_step_ms(model, batch: int, steps: int) -> float:
    """Median ms of decode-only steps with ``batch`` running sequences on the per-layer path."""
    return decode_step_ms(model, [_prompt(model, 32 + i) for i in range(batch)], steps, fused_decode=False)[0]


def _prefill_ms(model, tokens: int) -> float:
    """Ms of one ``tokens``-token prompt step on the per-layer path (the fused step takes prompt chunks too, in C++)."""
    g = Generator(model, kv_cache_tokens=1024, progress=False, fused_decode=False)
    g.add_request(_prompt(model, tokens), SamplingParams(max_new_tokens=1, temperature=0.0))
    start = time.perf_counter()
    g.step()
    return (time.perf_counter() - start) * 1e3


def _first_use(model) -> tuple[float, float, int]:
    """Seconds timing candidates, total seconds, and choices made, for a workload run on an empty store.

    The workload meets every layer shape at the rows buckets prefill and decode use."""
    _mode(model, True)
    store = tuning.reset(Path(tempfile.mkdtemp(prefix="llmspeed-autotune-")))
    start = time.perf_counter()
    with torch.inference_mode():
        _prefill_ms(model, 256)
        _prefill_ms(model, 40)
        for batch in (1, 8):
            _decode_step_ms(model, batch, 2)
    return store.seconds, time.perf_counter() - start, len(store.choices)


def run(device: str = "cpu", model: str = "smollm2", quick: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Rows ``{table, format, ...}``: ``tuning cost`` (first use) and ``rule table vs tuned`` (interleaved, with
    the rule table measured twice: the spread between those two is the noise floor of the comparison); ``progress``:
    a tqdm bar over the formats (and transformers' over a checkpoint folder's weights)."""
    if device != "cpu":
        raise ValueError(f"the autotune suite measures the CPU tuner; got device={device!r}")
    reps, steps = (3, 6) if quick else (7, 12)
    saved = os.environ.get(tuning.AUTOTUNE_ENV)
    rows: list[dict[str, Any]] = []
    try:
        for fmt in tqdm(FORMATS, disable=not progress, desc="autotune"):
            m = load_model(model, "cpu", progress=progress)
            quantize(m, fmt)
            timing_s, total_s, choices = _first_use(m)
            entries = list(tuning.store().choices.values())
            differ = [e for e in entries if e["kernel"] != e["guess"]]
            gain = [e["ms"][e["guess"]] / e["ms"][e["kernel"]] for e in differ if e["guess"] in e["ms"]]
            rows.append({"table": "tuning cost", "format": fmt, "choices timed": choices,
                         "seconds timing": round(timing_s, 2), "first workload s": round(total_s, 2),
                         "kernels chosen": ", ".join(sorted({e["kernel"] for e in entries})),
                         "differ from rules": len(differ),
                         "rule kernel / tuned kernel (timed)": ", ".join(f"{g:.2f}x" for g in sorted(gain)) or "-"})  # fmt: skip
            samples: dict[tuple[str, str], list[float]] = {}
            with torch.inference_mode():
                for _ in range(reps):
                    for name in ("rules", "tuned", "rules again"):  # interleaved: drift hits all alike
                        _mode(m, name == "tuned")
                        samples.setdefault(("prefill 256", name), []).append(_prefill_ms(m, 256))
                        for batch in (1, 8):
                            samples.setdefault((f"decode b={batch}", name), []).append(_decode_step_ms(m, batch, steps))
            for what in ("prefill 256", "decode b=1", "decode b=8"):
                rules_ms = statistics.median(samples[(what, "rules")])
                tuned_ms = statistics.median(samples[(what, "tuned")])
                again_ms = statistics.median(samples[(what, "rules again")])
                rows.append({"table": "rule table vs tuned", "format": fmt, "workload": what,
                             "rules ms": round(rules_ms, 2), "tuned ms": round(tuned_ms, 2),
                             "tuned / rules": round(tuned_ms / rules_ms, 3),
                             "rules again / rules (noise)": round(again_ms / rules_ms, 3)})  # fmt: skip
    finally:
        if saved is None:
            os.environ.pop(tuning.AUTOTUNE_ENV, None)
        else:
            os.environ[tuning.AUTOTUNE_ENV] = saved
        tuning.reset()
    return rows
