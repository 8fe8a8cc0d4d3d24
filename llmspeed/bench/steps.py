"""Decode steps timed one by one on a generator whose requests have all finished prefill."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

from ..generation import Generator, SamplingParams


def decode_step_ms(
    model,
    prompts: Sequence[list[int]],
    steps: int,
    adapters: Sequence[str | None] | None = None,
    fused_decode: bool | None = None,
    fused_max_rows: int | None = None,
    fused_amx_rows: int | None = None,
    lora_dtype: str = "float16",
    kv_cache_dtype: str = "auto",
    scheduler_steps: int = 1,
) -> tuple[float, str]:
    """Median ms of ``steps`` decode steps with one running sequence per prompt, and the paths they took.

    Args:
        model: The model to run.
        prompts: Token ids, one sequence each (prefilled before any step is timed).
        steps: Decode steps to time.
        adapters: Each sequence's LoRA adapter name (default: none).
        fused_decode: Passed to :class:`~llmspeed.generation.Generator` (``False``: the per-layer path).
        fused_max_rows: Most rows the fused step takes (default
            :func:`~llmspeed.generation.fused_decode.default_max_rows`; larger steps take the per-layer path).
        fused_amx_rows: Rows from which the fused step runs its matrices on AMX tiles (0: never; default
            :data:`~llmspeed.generation.fused_decode.AMX_ROWS`).
        lora_dtype: Passed to :class:`~llmspeed.generation.Generator` (the fused step's adapter stacks).
        kv_cache_dtype: Passed to :class:`~llmspeed.generation.Generator` (``"auto"``: the model's dtype).
        scheduler_steps: The Generator's ``num_scheduler_steps``: a ``step()`` call that gives each sequence
            several tokens counts as that many steps of its mean time.
    """
    tokens = sum(len(p) + steps + scheduler_steps + 8 for p in prompts)  # every sequence stays resident: no preemption
    g = Generator(model, kv_cache_tokens=max(4096, tokens), progress=False, fused_decode=fused_decode,
                  lora_dtype=lora_dtype, kv_cache_dtype=kv_cache_dtype, num_scheduler_steps=scheduler_steps)
    if fused_max_rows is not None and g.runner.fused is not None:
        g.runner.fused.max_rows = fused_max_rows
    if fused_amx_rows is not None and g.runner.fused is not None:
        g.runner.fused.amx_rows = fused_amx_rows
    names = list(adapters) if adapters is not None else [None] * len(prompts)
    rids = {g.add_request(list(p), SamplingParams(max_new_tokens=steps + scheduler_steps + 4, ignore_eos=True, adapter=a))
            for p, a in zip(prompts, names)}  # fmt: skip
    started: set[int] = set()
    while started != rids:  # prefill until every sequence has its first token
        started |= {e.request_id for e in g.step() if e.token_id is not None}
    before = dict(g.step_paths)
    times: list[float] = []
    while len(times) < steps:
        start = time.perf_counter()
        tokens = sum(e.token_id is not None for e in g.step())
        ms = (time.perf_counter() - start) * 1e3
        count = max(1, round(tokens / len(prompts)))  # steps this call ran
        times += [ms / count] * count
    del times[steps:]
    paths = sorted(p for p, (n, _) in g.step_paths.items() if n > before.get(p, (0, 0.0))[0])
    return statistics.median(times), ",".join(paths)
