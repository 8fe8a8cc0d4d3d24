"""Benchmark suite ``batching``: llmspeed's continuous batching against transformers, in one run.

Workload (the issue's): ``n`` requests, prompts of 16-256 tokens cut from the pydoc text,
output lengths capped-exponential (mean 48, cap 128), EOS ignored. Useful tokens are the
requested output tokens. Systems, all timed in the same process on the same model:

* transformers ``generate`` one request at a time (on a subset of the requests: it is slow),
* transformers ``generate`` in static batches (left-padded; a batch runs to its longest request),
* transformers ``generate_batch``-style continuous batching (its manager, per-request lengths),
* llmspeed ``Generator`` in fp32, bf16, int8 and int4 (on the CPU also with int8 activations: :func:`variants`),
* on a GPU, vLLM's ``LLM.generate`` where ``vllm`` is importable (:mod:`.vllm_peer`, in a child process; else a row
  saying why not).

Also the batch-1 decode step against the time to read the weights once at the memory bandwidth
measured here: llmspeed (on CPU: the fused C++ step and the generic path; on a GPU also per token in greedy
bursts; and the bf16/int8/int4 models), transformers' eager ``generate`` and vLLM (:mod:`.batch1`).
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from ..timing import timeit
from . import vllm_peer
from .batch1 import decode_path, decode_step_hf, decode_step_llmspeed, memory_bandwidth, sync, weight_bytes

GENERATE_BATCH = "transformers generate_batch"
VLLM = "vLLM LLM.generate"


def generator_config(gpu: bool) -> dict[str, Any]:
    """The :class:`~llmspeed.Generator` settings of the benchmark runs.

    CPU: a 16k-token KV budget, 512 tokens a step (a bigger step only adds latency: 2 cores are saturated
    by a 512-token prefill). GPU: 64k tokens of KV, 256 sequences at once, 8192 tokens a step (vLLM's
    offline default), so a prompt-heavy workload is prefilled in few large steps that keep the GPU busy.
    """
    if gpu:
        return dict(kv_cache_tokens=65536, max_batch_tokens=8192, max_seqs=256)
    return dict(kv_cache_tokens=16384, max_batch_tokens=512, max_seqs=64)


def make_workload(
    tokenizer: Any, n: int, seed: int = 0, prompt_range: tuple[int, int] = (16, 256), mean: int = 48, cap: int = 128
) -> tuple[list[list[int]], list[int]]:
    """``n`` prompts (token ids cut from the pydoc eval text) and their capped-exponential output lengths."""
    from ..eval import pydoc_text

    rng = random.Random(seed)
    ids = tokenizer.encode(pydoc_text("eval")[:400_000]) if tokenizer is not None else None
    prompts, lengths = [], []
    for _ in range(n):
        length = rng.randint(*prompt_range)
        if ids is None:
            prompts.append([rng.randrange(256) for _ in range(length)])
        else:
            start = rng.randrange(len(ids) - length)
            prompts.append(ids[start : start + length])
        lengths.append(max(1, min(cap, round(rng.expovariate(1 / mean)))))
    return prompts, lengths


def _hf_generate(hf: Any, prompts: list[list[int]], lengths: list[int], batch: int, pad_id: int) -> float:
    """Seconds for transformers ``generate`` over the prompts in static batches of ``batch`` (left padding)."""
    device = next(hf.parameters()).device
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        group, n_new = prompts[i : i + batch], max(lengths[i : i + batch])
        width = max(len(p) for p in group)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in group], device=device)  # [B, S]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)  # [B, S]
        with torch.inference_mode():
            hf.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                do_sample=False, pad_token_id=pad_id,
            )
    sync(device)
    return time.perf_counter() - start


def _hf_generate_batch(hf: Any, prompts: list[list[int]], lengths: list[int]) -> float:
    """Seconds for transformers' continuous batching manager (per-request lengths, EOS ignored)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max(lengths), do_sample=False, eos_token_id=-1, pad_token_id=0)
    device = next(hf.parameters()).device
    sync(device)
    start = time.perf_counter()
    with hf.continuous_batching_context_manager(generation_config=config, block=True, timeout=60) as manager:
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=n, eos_token_id=-1)
        done = 0
        while done < len(prompts):
            result = manager.get_result(timeout=5)
            if result is not None and result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"generate_batch failed: {result.error}")
                done += 1
            elif result is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching thread stopped")
    sync(device)
    return time.perf_counter() - start


def _llmspeed(
    model: Any, prompts: list[list[int]], lengths: list[int], progress: bool, **kwargs: Any
) -> tuple[float, str]:
    """Seconds of one ``generate_batched`` run after a warm-up, and a note on how its steps ran.

    The warm-up is a two-request run plus :meth:`Generator.warmup` (CUDA graph capture, as a serving
    engine does at start-up); its time is in the note, not in the seconds.
    """
    from ..generation import Generator, SamplingParams

    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths]
    gen = Generator(model, progress=progress, **kwargs)
    t0 = time.perf_counter()
    graphs = gen.warmup(context=max(len(p) for p in prompts) + max(lengths))
    gen.generate_batched(prompts[:2], params[:2])
    sync(model.spec.device)
    warm = time.perf_counter() - t0
    start = time.perf_counter()
    outs = gen.generate_batched(prompts, params)
    sync(model.spec.device)
    elapsed = time.perf_counter() - start
    bad = [o for o in outs if o.finish_reason != "length" or len(o.token_ids) != lengths[o.index]]
    if bad:
        raise RuntimeError(f"llmspeed run lost tokens: {bad[0].finish_reason} {bad[0].error}")
    assert gen.stats is not None
    paths = ", ".join(f"{n} {path} steps {t:.3f} s" for path, (n, t) in sorted(gen.stats.step_paths.items()))
    note = f"{paths}; attention {gen.attention_status}"
    if graphs:
        note += f"; warm-up {warm:.1f} s ({graphs} CUDA graphs), not timed"
    return elapsed, note


def _load(name: str, device: str, dtype: torch.dtype) -> Any:
    from .. import models

    if name == "smollm2":
        return models.smollm2(dtype=dtype, device=device)
    if name == "llama-1b-random":
        return models.llama_1b_random(dtype=dtype, device=device)
    raise ValueError(f"model must be 'smollm2' or 'llama-1b-random'; got {name!r}")


def _row(system: str, dtype: str, n: int, tokens: int, seconds: float, base: float | None, note: str = "") -> dict:
    tok_s = tokens / seconds
    return {
        "system": system,
        "dtype": dtype,
        "requests": n,
        "useful_tokens": tokens,
        "seconds": round(seconds, 2),
        "tok_s": round(tok_s, 2),
        "vs_generate_batch": round(tok_s / base, 2) if base else "",
        "note": note,
    }


def vllm_row(peer: dict[str, Any], rows: list[dict], dtype: str, n: int, useful: int, base: float) -> dict:
    """The row of :func:`.vllm_peer.measure`'s result ``peer`` beside ``rows`` (its note: llmspeed's default run
    against it), or, where it did not run, a row without numbers saying why."""
    if "error" in peer:
        return {**_row(VLLM, dtype, n, useful, float("inf"), base, f"not measured: {peer['error']}"),
                "seconds": "", "tok_s": "", "vs_generate_batch": ""}  # fmt: skip
    ours = next(r["tok_s"] for r in rows if r["system"] == "llmspeed Generator")  # the default settings' run
    note = f"vLLM {peer['version']}; llmspeed Generator at {ours / (useful / peer['seconds']):.2f}x of it"
    return _row(VLLM, dtype, n, useful, peer["seconds"], base, note)


def variants(gpu: bool) -> list[tuple[str, str, dict[str, Any]]]:
    """The converted models the suite runs beside the float one: (dtype label, format, ``quantize`` options).

    On the CPU: bf16, the default int8 and int4 (float activations), and both with ``activations="int8"``,
    whose matrices multiply integer codes (AVX2 / VNNI byte products, and for int4 prompts the 8-row
    panels of ``cpp_panels``): the configuration that makes quantized batching faster than fp32 on AVX2 CPUs.
    """
    quantized: list[tuple[str, str, dict[str, Any]]] = [("int8", "int8", {}), ("int4", "int4", {})]
    if gpu:
        return quantized
    acts = {"activations": "int8"}
    return [("bf16", "bf16", {}), *quantized, ("int8, int8 activations", "int8", acts), ("int4, int8 activations", "int4", acts)]


def run(
    *, device: str = "cpu", model: str = "smollm2", quick: bool = False, progress: bool = True, on_row: Any = None
) -> list[dict]:
    """Run the batching suite; rows compare every system with ``generate_batch`` measured in this run.

    ``on_row(row)`` is called as each row is ready (long runs print partial results).
    """
    from .. import precision

    dev = torch.device(device)
    gpu = dev.type == "cuda"
    n = (32 if quick else 256) if gpu else (12 if quick else 48)
    static_batch = 32 if gpu else 8
    n_seq = 2 if quick else (8 if not gpu else 16)
    float_dtype = torch.bfloat16 if gpu else torch.float32
    m = _load(model, device, float_dtype)
    fname = "bf16" if gpu else "fp32"
    mean, cap = (16, 32) if quick else (48, 128)
    prompts, lengths = make_workload(m.tokenizer, n, prompt_range=(16, 128 if quick else 256), mean=mean, cap=cap)
    useful = sum(lengths)
    gen_kwargs = generator_config(gpu)

    class _Rows(list):
        def append(self, row: dict) -> None:
            super().append(row)
            if on_row is not None:
                on_row(row)

    rows: list[dict] = _Rows()
    _hf_generate_batch(m.hf, prompts[:4], lengths[:4])  # warm-up, as llmspeed gets one
    t_cb = _hf_generate_batch(m.hf, prompts, lengths)
    pad = 0
    t_seq = _hf_generate(m.hf, prompts[:n_seq], lengths[:n_seq], 1, pad)
    t_static = _hf_generate(m.hf, prompts, lengths, static_batch, pad)
    base = useful / t_cb
    rows.append(_row("transformers generate, one at a time", fname, n_seq, sum(lengths[:n_seq]), t_seq, base,
                     f"first {n_seq} requests only"))
    rows.append(_row(f"transformers generate, static batches of {static_batch}", fname, n, useful, t_static, base))
    rows.append(_row(GENERATE_BATCH, fname, n, useful, t_cb, base, "baseline, same run"))
    t, note = _llmspeed(m, prompts, lengths, progress, **gen_kwargs)
    rows.append(_row("llmspeed Generator", fname, n, useful, t, base, note))
    if gpu:  # the same run with each attention path: all gather + SDPA, all Triton (auto mixes them)
        for option, value in (("attention", "sdpa"), ("attention", "triton"), ("num_scheduler_steps", 8)):
            t, note = _llmspeed(m, prompts, lengths, progress, **{**gen_kwargs, option: value})
            rows.append(_row(f"llmspeed Generator, {option}={value!r}", fname, n, useful, t, base, note))

    peer = vllm_peer.measure(m, prompts, lengths) if gpu else {}  # the same workload through vLLM, in a child
    if peer:
        rows.append(vllm_row(peer, rows, fname, n, useful, base))
    steps: list[tuple[str, str, Any, dict]] = []  # batch-1 decode steps to time at the end
    for name, fmt, options in variants(gpu):
        try:
            v = _load(model, device, float_dtype)
            if fmt == "bf16":
                precision.cast(v, fmt)
            else:
                from ..quant import quantize

                quantize(v, fmt, **options)
        except ImportError as exc:
            # no time, no rate and no ratio (a 0x bar would chart a run that never happened)
            rows.append({**_row("llmspeed Generator", name, n, useful, float("inf"), base), "seconds": "", "tok_s": "",
                         "vs_generate_batch": "", "note": f"skipped: {exc}"})
            continue
        t, note = _llmspeed(v, prompts, lengths, progress, **gen_kwargs)
        if fmt == "bf16" and not gpu:
            m_min = precision.cpu_matmul.crossover(torch.bfloat16)
            how_16 = "native bf16 matmul" if m_min is None else f"linears of M >= {m_min} rows in fp32 over bf16 weight blocks"
            note = f"{how_16}; {note}"
        rows.append(_row("llmspeed Generator", name, n, useful, t, base, note))
        steps.append((f"batch-1 decode step: llmspeed ({name})", name, v, {}))

    float_rate = next(r["tok_s"] for r in rows if r["system"] == "llmspeed Generator")
    for r in rows:  # the converted models against llmspeed's float one, same run (the last column stays the note)
        note = r.pop("note")
        ran = r["system"] == "llmspeed Generator" and r["tok_s"] != ""
        r[f"vs_llmspeed_{fname}"] = round(r["tok_s"] / float_rate, 2) if ran else ""
        r["note"] = note

    bw = memory_bandwidth(dev)
    steps.insert(0, ("batch-1 decode step: llmspeed", fname, m, {}))
    steps.insert(1, ("batch-1 decode step: llmspeed", fname, m, {"fused_decode": False} if not gpu else
                     {"num_scheduler_steps": 8}))  # fmt: skip
    timed = [(f"{system}, {decode_path(model_, kw)}", dtype, model_, decode_step_llmspeed(model_, **kw))
             for system, dtype, model_, kw in steps]  # fmt: skip
    timed.append(("batch-1 decode step: transformers generate", fname, m, decode_step_hf(m.hf)))
    if "decode_step" in peer:
        timed.append(("batch-1 decode step: vLLM", fname, m, peer["decode_step"]))
    for system, dtype, model_, t in timed:
        w = weight_bytes(model_)
        read = w / bw
        rows.append({
            "system": system, "dtype": dtype, "requests": 1, "useful_tokens": 1, "seconds": round(t, 4),
            "tok_s": round(1 / t, 2), "vs_generate_batch": "",
            "note": f"{t / read:.2f}x the {read * 1e3:.1f} ms to read {w / 1e6:.0f} MB of weights at {bw / 1e9:.1f} GB/s",
        })
    return rows


def attention_variants(num_seqs: int = 32, context: int = 256, block_size: int = 16, device: str = "cpu") -> list[dict]:
    """Time one layer's decode attention for ``num_seqs`` sequences of ``context`` tokens, several ways.

    SmolLM2 shapes (9 query heads, 3 KV heads, head dim 64). ``paged gather + SDPA`` is what
    :class:`~llmspeed.generation.PagedAttention` does; ``dense cache + SDPA`` is the lower bound a
    contiguous per-sequence layout would reach (no gather); the loop is one SDPA call per sequence.
    """
    import torch.nn.functional as F

    dev = torch.device(device)
    heads, kv_heads, dim = 9, 3, 64
    group = heads // kv_heads
    width = -(-context // block_size)
    num_blocks = num_seqs * width + 8
    cache = torch.randn(num_blocks, block_size, kv_heads, dim, device=dev)  # [NB, BS, Hkv, D]
    perm = torch.randperm(num_blocks - 8, device=dev)[: num_seqs * width]  # scattered blocks
    q = torch.randn(num_seqs, kv_heads, group, dim, device=dev)  # [n, Hkv, G, D]
    mask = torch.ones(num_seqs, 1, 1, width * block_size, dtype=torch.bool, device=dev)
    dense = torch.randn(num_seqs, kv_heads, width * block_size, dim, device=dev)  # [n, Hkv, L, D]
    tables = perm.view(num_seqs, width)

    def paged():
        k = cache.index_select(0, perm).view(num_seqs, -1, kv_heads, dim).transpose(1, 2)  # [n, Hkv, L, D]
        v = cache.index_select(0, perm).view(num_seqs, -1, kv_heads, dim).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def paged_gqa():
        k = cache.index_select(0, perm).view(num_seqs, -1, kv_heads, dim).transpose(1, 2)
        v = cache.index_select(0, perm).view(num_seqs, -1, kv_heads, dim).transpose(1, 2)
        qh = q.reshape(num_seqs, heads, 1, dim)  # [n, H, 1, D]
        return F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, enable_gqa=True)

    def dense_sdpa():
        return F.scaled_dot_product_attention(q, dense, dense, attn_mask=mask)

    def loop():
        outs = []
        for i in range(num_seqs):
            k = cache.index_select(0, tables[i]).view(-1, kv_heads, dim).transpose(0, 1)[None]  # [1, Hkv, L, D]
            outs.append(F.scaled_dot_product_attention(q[i : i + 1], k, k))
        return torch.cat(outs)

    rows = []
    for name, fn in (("paged gather + SDPA (GQA folded into query axis)", paged),
                     ("paged gather + SDPA (enable_gqa)", paged_gqa),
                     ("dense per-sequence cache + SDPA (no gather)", dense_sdpa),
                     ("paged, one SDPA per sequence", loop)):
        t = timeit(fn, repeats=7, warmup=2, device=dev)
        rows.append({"variant": name, "seqs": num_seqs, "context": context, "ms_per_layer": round(t.median * 1e3, 3),
                     "spread": f"±{t.spread * 50:.0f}%"})
    return rows
