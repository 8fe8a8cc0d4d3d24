"""Benchmark suite ``serving``: the Engine under online load, prefix caching, repeated calls, a soak.

Four tables, one run (``python -m llmspeed bench serving`` or ``python benchmarks/serving.py``):

* ``online load``: requests with Poisson arrivals at several offered rates (prompts 16-256 tokens,
  outputs capped-exponential, mean 48, cap 128) fed with the same schedule to llmspeed's
  :class:`~llmspeed.Engine` and to transformers' continuous batching manager
  (``continuous_batching_context_manager``). Throughput, time to first token (TTFT) and time per
  output token (TPOT), p50 / p99; a system *sustains* a rate while its p99 TTFT stays under 2 s.
* ``prefix caching``: requests sharing a long system prompt, with and without the prefix cache.
* ``repeated calls``: ``model.generate_batched`` called again and again against one long-lived Generator.
* ``soak``: many requests from 8 threads, some aborted at random moments, some invalid; every completed
  greedy output checked against the same prompt run alone; blocks, requests and memory afterwards.
"""

from __future__ import annotations

import gc
import random
import statistics
import threading
import time
from typing import Any

import torch

from ..generation import Generator, SamplingParams
from .batching import make_workload
from .models import load_model

SUSTAIN_TTFT = 2.0  # seconds: a rate is sustained while p99 time to first token stays below this


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def _arrivals(n: int, rate: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def _summary(system: str, rate: float, records: list[tuple[float, float, int, float]], elapsed: float) -> dict:
    """records: (arrival, first token, output tokens, finish) per request, perf_counter seconds."""
    ttft = [first - arrival for arrival, first, _, _ in records]
    tpot = [(end - first) / (n - 1) for _, first, n, end in records if n > 1]
    tokens = sum(n for _, _, n, _ in records)
    p99 = _pct(ttft, 99)
    return {
        "table": "online load", "system": system, "offered_req_s": rate, "requests": len(records),
        "tok_s": round(tokens / elapsed, 1), "ttft_p50_s": round(_pct(ttft, 50), 3), "ttft_p99_s": round(p99, 3),
        "tpot_p50_ms": round(_pct(tpot, 50) * 1e3, 1), "tpot_p99_ms": round(_pct(tpot, 99) * 1e3, 1),
        "sustained": p99 <= SUSTAIN_TTFT,
    }


def _feed(times: list[float], submit) -> float:
    """Call ``submit(i)`` at each arrival time (relative to now); return the start."""
    start = time.perf_counter()
    for i, t in enumerate(times):
        delay = start + t - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        submit(i)
    return start


def online_llmspeed(model: Any, prompts, lengths, times, rate: float, **engine_kwargs: Any) -> dict:
    """One offered rate through llmspeed's Engine (each request streamed: first-token time as it happens)."""
    from ..serving import Engine

    records: list[Any] = [None] * len(prompts)
    threads = []
    with Engine(model, **engine_kwargs) as engine:

        def consume(i: int, handle: Any, arrival: float) -> None:
            first = None
            for event in handle:
                if first is None and event.token_id is not None:
                    first = time.perf_counter()
            out = handle.result()
            records[i] = (arrival, first, len(out.token_ids), time.perf_counter())

        def submit(i: int) -> None:
            arrival = time.perf_counter()
            sp = SamplingParams(max_new_tokens=lengths[i], ignore_eos=True)
            t = threading.Thread(target=consume, args=(i, engine.submit(prompts[i], sp), arrival))
            t.start()
            threads.append(t)

        start = _feed(times, submit)
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
    return _summary("llmspeed Engine", rate, records, elapsed)


def online_transformers(hf: Any, prompts, lengths, times, rate: float) -> dict:
    """The same schedule through transformers' continuous batching manager (per-token timestamps recorded)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max(lengths), do_sample=False, eos_token_id=-1, pad_token_id=0)
    arrivals: dict[str, float] = {}
    records: list[Any] = []
    with hf.continuous_batching_context_manager(generation_config=config, block=True, timeout=60) as manager:

        def submit(i: int) -> None:
            arrivals[f"r{i}"] = time.perf_counter()
            manager.add_request(prompts[i], request_id=f"r{i}", max_new_tokens=lengths[i], eos_token_id=-1,
                                record_timestamps=True)

        feeder = threading.Thread(target=lambda: starts.append(_feed(times, submit)))
        starts: list[float] = []
        feeder.start()
        while len(records) < len(prompts):
            result = manager.get_result(timeout=5)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching thread stopped")
                continue
            if result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"transformers continuous batching failed: {result.error}")
                stamps = result.timestamps or [time.perf_counter()]
                records.append((arrivals[result.request_id], stamps[0], len(result.generated_tokens), stamps[-1]))
        feeder.join()
        elapsed = time.perf_counter() - starts[0]
    return _summary("transformers continuous batching", rate, records, elapsed)


def prefix_rows(model: Any, n: int, system_tokens: int, question_tokens: int, new_tokens: int) -> list[dict]:
    """``n`` requests sharing a ``system_tokens`` prompt, without and with the prefix cache."""
    from ..eval import pydoc_text

    ids = model.tokenizer.encode(pydoc_text("eval")[:200_000])
    rng = random.Random(1)
    system = ids[:system_tokens]
    prompts = []
    for _ in range(n):
        first = rng.randrange(system_tokens, len(ids) - question_tokens)
        prompts.append(system + ids[first : first + question_tokens])
    sp = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    rows: list[dict[str, Any]] = []
    outs: dict[bool, Any] = {}
    for caching in (False, True):
        gen = Generator(model, progress=False, prefix_caching=caching, kv_cache_tokens=16384, max_batch_tokens=512)
        gen.generate_batched(prompts[:1], SamplingParams(max_new_tokens=1))  # warm-up (and, cached, the system prompt)
        before, hits, queries = gen.num_tokens_computed, gen.blocks.hit_tokens, gen.blocks.query_tokens
        start = time.perf_counter()
        outs[caching] = gen.generate_batched(prompts, sp)
        elapsed = time.perf_counter() - start
        computed = gen.num_tokens_computed - before
        hits, queries = gen.blocks.hit_tokens - hits, gen.blocks.query_tokens - queries  # the timed run's lookups only
        decode = sum(len(o.token_ids) - 1 for o in outs[caching])
        rows.append({
            "table": "prefix caching", "prefix_caching": caching, "requests": n,
            "prompt_tokens": sum(len(p) for p in prompts), "prefill_tokens_computed": computed - decode,
            "seconds": round(elapsed, 2), "req_s": round(n / elapsed, 2),
            "hit_rate": round(hits / queries, 3) if queries else 0.0,
        })
    same = [o.token_ids for o in outs[True]] == [o.token_ids for o in outs[False]]
    base = rows[0]
    for row in rows:
        row["prefill_vs_uncached"] = round(row["prefill_tokens_computed"] / base["prefill_tokens_computed"], 3)
        row["throughput_vs_uncached"] = round(row["req_s"] / base["req_s"], 2)
        row["identical_greedy_outputs"] = same
    return rows


def repeated_rows(model: Any, calls: int, rounds: int) -> list[dict]:
    """``calls`` calls of ``model.generate_batched`` (1 prompt, 8 new tokens) vs the same on one Generator."""
    sp = SamplingParams(max_new_tokens=8, ignore_eos=True)
    prompt = ["What is a Python decorator?"]
    gen = Generator(model, progress=False)
    gen.generate_batched(prompt, sp)
    model.generate_batched(prompt, sp, progress=False)
    t_model, t_gen = [], []
    for _ in range(rounds):  # interleaved, so drift on a shared machine hits both alike
        start = time.perf_counter()
        for _ in range(calls):
            model.generate_batched(prompt, sp, progress=False)
        t_model.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(calls):
            gen.generate_batched(prompt, sp)
        t_gen.append(time.perf_counter() - start)
    a, b = statistics.median(t_model), statistics.median(t_gen)
    return [
        {"table": "repeated calls", "how": f"{calls} x model.generate_batched", "seconds_median": round(a, 3),
         "vs_long_lived": round(a / b, 3)},
        {"table": "repeated calls", "how": f"{calls} x one long-lived Generator", "seconds_median": round(b, 3),
         "vs_long_lived": 1.0},
    ]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def soak_rows(model: Any, requests: int, threads: int = 8, distinct: int = 48, seed: int = 0) -> list[dict]:
    """``requests`` from ``threads`` threads: 20% aborted at random moments, 1% invalid; all checked."""
    from ..serving import Engine

    rng = random.Random(seed)
    prompts, _ = make_workload(model.tokenizer, distinct, seed=seed, prompt_range=(8, 48))
    lengths = [rng.randint(2, 12) for _ in range(distinct)]
    kw: dict[str, Any] = dict(kv_cache_tokens=8192, max_batch_tokens=512, max_seqs=32)
    with Engine(model, **kw) as engine:  # reference: each prompt alone, on the same kind of engine
        expected = [engine.submit(p, SamplingParams(max_new_tokens=n, ignore_eos=True)).result().token_ids
                    for p, n in zip(prompts, lengths)]
    gc.collect()
    rss0 = _rss_mb()
    plan = [(rng.randrange(distinct), rng.random() < 0.2, rng.random() < 0.01) for _ in range(requests)]
    results: list[Any] = [None] * requests
    start = time.perf_counter()
    with Engine(model, **kw) as engine:

        def worker(w: int) -> None:
            wr = random.Random(seed * 100 + w)
            for k in range(w, requests, threads):
                i, abort, invalid = plan[k]
                prompt = [model.spec.vocab_size + 5] if invalid else prompts[i]
                h = engine.submit(prompt, SamplingParams(max_new_tokens=lengths[i], ignore_eos=True))
                if abort:
                    time.sleep(wr.random() * 0.2)
                    h.abort()
                results[k] = h.result(timeout=600)

        pool = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        elapsed = time.perf_counter() - start
        gen = engine.generator
        held_requests = gen.num_live + len(gen.scheduler.running) + len(gen.scheduler.waiting)
        held_blocks = gen.blocks.num_blocks - gen.blocks.num_free
    gc.collect()
    rss1 = _rss_mb()
    done = correct = misrouted = aborted = invalid_ok = other = 0
    for (i, _, invalid), out in zip(plan, results):
        if out is None:
            other += 1
        elif invalid:
            invalid_ok += out.finish_reason == "error" and bool(out.error)
        elif out.finish_reason == "abort":
            aborted += 1
            misrouted += out.token_ids != expected[i][: len(out.token_ids)] or out.prompt_token_ids != prompts[i]
        elif out.finish_reason == "length":
            done += 1
            correct += out.token_ids == expected[i]
            misrouted += out.prompt_token_ids != prompts[i]
        else:
            other += 1
    return [{
        "table": "soak", "requests": requests, "threads": threads, "seconds": round(elapsed, 1),
        "completed": done, "completed_equal_alone": correct, "aborted": aborted,
        "invalid": sum(1 for _, _, v in plan if v), "invalid_ended_with_error": invalid_ok,
        "misrouted": misrouted, "lost_or_unexpected": other, "requests_held_after": held_requests,
        "kv_blocks_held_after": held_blocks, "rss_growth_mb": round(rss1 - rss0, 1),
    }]


PARTS = ("online", "prefix", "repeated", "soak")


def check_load(requests: int | None, rates: tuple[float, ...] | None, least: int = 1) -> None:
    """Refuse a bad offered load before any model loads: ``requests`` (arrivals per rate) an int of at least ``least``
    or ``None``, ``rates`` (requests per second) positive numbers or ``None``; the message names the argument."""
    if requests is not None and (isinstance(requests, bool) or not isinstance(requests, int) or requests < least):
        raise ValueError(f"requests must be an int of at least {least} (arrivals per offered rate) or None; "
                         f"got {requests!r}")
    if rates is not None and (isinstance(rates, (str, bytes)) or not rates or not all(
            isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in rates)):  # fmt: skip
        raise ValueError(f"rates must be positive numbers (requests per second) or None; got {rates!r}")


def run(device: str = "cpu", model: str = "smollm2", quick: bool = False, progress: bool = False,
        parts: tuple[str, ...] = PARTS, rates: tuple[float, ...] | None = None,
        requests: int | None = None) -> list[dict]:
    """Run the serving suite (see the module docstring); ``quick`` shrinks every part.

    ``requests``: Poisson arrivals per offered rate in the online part (default 40, 12 with ``quick``). More
    arrivals keep an overloaded system overloaded for longer, so its queue, and its p99, reach steady state.
    """
    check_load(requests, rates, least=2)
    unknown = [p for p in parts if p not in PARTS]
    if unknown or isinstance(parts, str):
        raise ValueError(f"parts must be a tuple of {list(PARTS)}; got {parts!r}")
    torch.manual_seed(0)
    m = load_model(model, device, torch.float32, progress=progress)
    rows: list[dict] = []
    if "online" in parts:
        n = requests or (12 if quick else 40)
        prompts, lengths = make_workload(m.tokenizer, n, prompt_range=(16, 256), mean=16 if quick else 48,
                                         cap=32 if quick else 128)
        rates = rates or ((0.5, 2.0) if quick else (0.25, 0.5, 1.0, 2.0, 4.0))
        for k, rate in enumerate(rates):
            times = _arrivals(n, rate, seed=k)
            rows.append(online_transformers(m.hf, prompts, lengths, times, rate))
            rows.append(online_llmspeed(m, prompts, lengths, times, rate, kv_cache_tokens=16384, max_batch_tokens=512))
        for system in ("transformers continuous batching", "llmspeed Engine"):
            ok = [r["offered_req_s"] for r in rows if r.get("system") == system and r["sustained"]]
            rows.append({"table": "online load, summary", "system": system,
                         "highest_rate_with_p99_ttft_under_2s": max(ok) if ok else 0.0})
    if "prefix" in parts:
        rows += prefix_rows(m, n=16 if quick else 64, system_tokens=512, question_tokens=32, new_tokens=8)
    if "repeated" in parts:
        rows += repeated_rows(m, calls=20, rounds=3 if quick else 5)
    if "soak" in parts:
        rows += soak_rows(m, requests=200 if quick else 2000)
    return rows
