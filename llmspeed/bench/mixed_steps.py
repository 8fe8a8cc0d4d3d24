"""Steps with a prompt chunk: the fused C++ step against the per-layer path, format by format.

Under load a serving step mixes decode rows with prompt chunks. The fused C++ step runs such steps (one row
per token; its matrices as tile matmuls where the CPU has AMX, fp32 and bf16 ones of 64+ rows as torch's
GEMM, quantized ones as the per-layer path runs them, short steps in its row loop) where
:meth:`~llmspeed.generation.fused_decode.FusedDecode.takes_prompt` says; otherwise, and with ``mixed``
off, they run per layer (``model.forward_batch``: SDPA over gathered blocks, one torch op at a time).
Each case builds a generator with ``running`` sequences decoding, then times the one step that also takes
a new ``prompt``-token request, both ways in turn, ``reps`` times (medians); ``default`` is the way a
generator with default settings takes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from ..generation import Generator, SamplingParams
from ..precision import cast
from ..quant import quantize
from .models import load_model

CASES = ((0, 256), (8, 16), (8, 40), (8, 64), (16, 480))  # (running sequences, prompt tokens)
FORMATS = ("fp32", "bf16", "int8", "int8, int8 activations", "int4", "int4, int8 activations", "nf4")


def default_paths(model) -> Callable[[int], str]:
    """``rows -> "fused" | "per-layer"``: how a generator with default settings runs a prompt step of ``rows`` rows."""
    fused = Generator(model, kv_cache_tokens=64, progress=False).runner.fused
    return lambda rows: "fused" if fused is not None and fused.takes_prompt(rows) else "per-layer"


def step_ms(model, running: int, prompt: int, mixed: bool) -> tuple[float, str]:
    """Milliseconds of the step that adds a ``prompt``-token request to ``running`` decoding ones, and its path."""
    vocab = model.spec.vocab_size
    gen = Generator(model, kv_cache_tokens=max(1024, 2 * (running * 160 + prompt)), progress=False)
    if gen.runner.fused is not None:
        gen.runner.fused.mixed = mixed
    rids = {gen.add_request([(7 * i + j) % vocab for j in range(100)], SamplingParams(max_new_tokens=50, ignore_eos=True))
            for i in range(running)}  # fmt: skip
    started: set[int] = set()
    while started != rids:  # their prompts, in chunks of max_batch_tokens (16 of 100 tokens take 4 steps)
        started |= {e.request_id for e in gen.step() if e.token_id is not None}
    gen.step()  # then a decode step
    gen.add_request([(3 * j + 1) % vocab for j in range(prompt)], SamplingParams(max_new_tokens=4, ignore_eos=True))
    before, computed = dict(gen.step_paths), gen.num_tokens_computed
    start = time.perf_counter()
    gen.step()
    elapsed = time.perf_counter() - start
    if gen.num_tokens_computed - computed != running + prompt:  # a prompt chunked, or older prompts in the step
        raise RuntimeError(f"the timed step ran {gen.num_tokens_computed - computed} tokens, not {running} decode "
                           f"rows and a {prompt}-token prompt")
    (path,) = [p for p, (n, _) in gen.step_paths.items() if n != before.get(p, (0, 0.0))[0]]
    return elapsed * 1e3, path


def run(device: str = "cpu", model: str = "smollm2", quick: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Rows ``{table, format, running, prompt tokens, per-layer ms, fused ms, per-layer / fused, fused path}``."""
    if device != "cpu":
        raise ValueError(f"the fused step runs on the CPU; got device={device!r}")
    reps, cases, formats = (1, CASES[:2], FORMATS[::2]) if quick else (5, CASES, FORMATS)
    out = []
    for fmt in formats:
        m = load_model(model, "cpu", progress=progress)
        if fmt == "bf16":
            cast(m, "bf16")
        elif fmt != "fp32":
            base, *options = fmt.split(", ")
            quantize(m, base, activations="int8" if "int8 activations" in options else "float")
        default = default_paths(m)  # one generator per format, not per case
        for running, prompt in cases:
            step_ms(m, running, prompt, False)  # warm: kernel builds, allocator, timed kernel choices
            step_ms(m, running, prompt, True)
            generic, fused = [], []
            for _ in range(reps):
                generic.append(step_ms(m, running, prompt, False)[0])
                ms, path = step_ms(m, running, prompt, True)
                fused.append(ms)
            g, f = statistics.median(generic), statistics.median(fused)
            out.append({"table": "steps with a prompt chunk", "format": fmt, "running": running,
                        "prompt tokens": prompt, "per-layer ms": round(g, 1), "fused ms": round(f, 1),
                        "per-layer / fused": round(g / f, 2), "fused path": path,
                        "default": default(running + prompt)})  # fmt: skip
        del m
    return out
