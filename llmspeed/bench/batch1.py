"""Batch-1 decode steps of the batching suite: llmspeed's (fused, generic, in bursts) and transformers' eager
``generate``, and what a step must read at least once (the weights, at the measured memory bandwidth)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from ..timing import timeit


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def memory_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes per second of a full read of a large fp32 tensor (``sum``), median of a few runs."""
    x = torch.ones(nbytes // 4, device=device)
    t = timeit(lambda: x.sum().item(), repeats=5, warmup=1, device=device)
    return nbytes / t.median


def weight_bytes(model: Any) -> int:
    """Bytes of parameters and buffers (what a decode step must read at least once)."""
    module = model.module
    seen = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.nbytes
    return total


def decode_step_llmspeed(model: Any, context: int = 128, steps: int = 16, **generator_kwargs: Any) -> float:
    """Median seconds per token of llmspeed decode steps of a single request with ``context`` cached tokens (one
    token a ``step()``, or a burst's with ``num_scheduler_steps``)."""
    from ..generation import Generator, SamplingParams

    gen = Generator(model, progress=False, kv_cache_tokens=4096, max_batch_tokens=context, **generator_kwargs)
    burst = generator_kwargs.get("num_scheduler_steps", 1)
    gen.add_request(list(range(1, context + 1)), SamplingParams(max_new_tokens=(steps + 2) * burst, ignore_eos=True))
    gen.step()  # prefill
    gen.step()  # first decode (warm-up)
    times = []
    for _ in range(steps):
        sync(model.spec.device)
        t0 = time.perf_counter()
        tokens = sum(e.token_id is not None for e in gen.step())
        sync(model.spec.device)
        times.append((time.perf_counter() - t0) / max(tokens, 1))
    while gen.has_unfinished():
        gen.step()
    return statistics.median(times)


def decode_path(model: Any, generator_kwargs: dict) -> str:
    """Which path a Generator's decode steps take for ``model``: ``fused CPU step``, ``generic path``, ``CUDA graphs``
    or ``eager``, followed by ``, greedy bursts of k`` with ``num_scheduler_steps=k`` above 1 (the GPU suite times
    both on one model: the same label would name two rows)."""
    from ..generation import Generator

    burst = generator_kwargs.get("num_scheduler_steps", 1)
    bursts = f", greedy bursts of {burst}" if burst > 1 else ""
    if model.spec.device.type != "cpu":
        return ("CUDA graphs" if generator_kwargs.get("cuda_graphs", True) else "eager") + bursts
    gen = Generator(model, progress=False, kv_cache_tokens=16, block_size=16, **generator_kwargs)
    return ("fused CPU step" if gen.fused_decode_status == "on" else "generic path") + bursts


def decode_step_hf(hf: Any, context: int = 128, steps: int = 16) -> float:
    """Median seconds per new token of transformers' eager ``generate`` at batch 1 (prefill subtracted)."""
    device = next(hf.parameters()).device
    ids = torch.arange(1, context + 1, device=device)[None]  # [1, context]

    def run(n: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - t0

    run(2)
    short = sorted(run(1) for _ in range(3))[1]
    long = sorted(run(steps + 1) for _ in range(3))[1]
    return (long - short) / steps
