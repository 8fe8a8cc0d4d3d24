"""PagedAttention against plain causal attention over each sequence's full context."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import llmspeed
from llmspeed import Generator, SamplingParams
from llmspeed.generation import fused_decode, triton_attention
from llmspeed.generation.kv_cache import PagedAttention, PagedKVCache, block_tables, cache_dtype
from llmspeed.protocol import ModelSpec

SPEC = ModelSpec("Test", 1, 4, 2, 8, 32, 10, 64, torch.float32, torch.device("cpu"))


def _reference(q, k, v):  # q [H, t, D] for the last t positions of k/v [Hkv, L, D]
    length, t = k.shape[1], q.shape[1]
    mask = torch.arange(length)[None, :] <= torch.arange(length - t, length)[:, None]  # [t, L]
    k = k.repeat_interleave(2, dim=0)  # [H, L, D]
    v = v.repeat_interleave(2, dim=0)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask)[0].transpose(0, 1)  # [t, H, D]


@pytest.mark.parametrize(
    "expand_gqa, decode_kernel, prefill_kernel",
    [
        (False, None, None),
        (True, None, None),
        (False, triton_attention.reference, triton_attention.REFERENCE_PREFILL),
    ],
    ids=["gqa-sdpa", "expanded-keys (the CUDA prefill path)", "kernels (the plumbing, with the torch references)"],
)
def test_paged_attention_matches_dense_causal_attention(expand_gqa, decode_kernel, prefill_kernel):
    torch.manual_seed(0)
    cache = PagedKVCache(SPEC, num_blocks=16, block_size=4)
    tables = {0: [5, 1, 9], 1: [2, 7], 2: [3, 0, 11, 4]}
    lengths = {0: 10, 1: 6, 2: 13}
    k_all = {s: torch.randn(2, n, 8) for s, n in lengths.items()}  # [Hkv, L, D]
    v_all = {s: torch.randn(2, n, 8) for s, n in lengths.items()}
    q_all = {s: torch.randn(4, n, 8) for s, n in lengths.items()}  # [H, L, D]
    done = {0: 0, 1: 0, 2: 0}
    # step 1: prefill seq 0 fully, seq 2 partly (chunked); step 2: decode 0, prefill 1, rest of 2
    for plan in ({0: 9, 2: 7}, {0: 1, 1: 6, 2: 6}):
        order = sorted(plan, key=lambda s: plan[s] != 1)
        chunks = [(tables[s], done[s], plan[s]) for s in order]
        q = torch.cat([q_all[s][:, done[s] : done[s] + plan[s]] for s in order], dim=1)[None]  # [1, H, T, D]
        k = torch.cat([k_all[s][:, done[s] : done[s] + plan[s]] for s in order], dim=1)[None]  # [1, Hkv, T, D]
        v = torch.cat([v_all[s][:, done[s] : done[s] + plan[s]] for s in order], dim=1)[None]
        attention = PagedAttention(cache, chunks, decode_kernel, prefill_kernel)
        assert attention.expand_gqa is False  # on the CPU, masked GQA runs fused
        attention.expand_gqa = expand_gqa
        out = attention(0, q, k, v, 8**-0.5)[0]  # [T, H, D]
        row = 0
        for s in order:
            end = done[s] + plan[s]
            ref = _reference(q_all[s][:, done[s] : end], k_all[s][:, :end], v_all[s][:, :end])
            torch.testing.assert_close(out[row : row + plan[s]], ref, rtol=1e-5, atol=1e-5)
            row += plan[s]
            done[s] = end


def test_block_tables_cut_and_pad_to_a_width():
    tables = block_tables([[5, 1, 9], [2], ()], 2, torch.device("cpu"), pad=7)  # [3, 2]
    assert tables.tolist() == [[5, 1], [2, 7], [7, 7]] and tables.dtype == torch.long
    assert block_tables([[4]], 3, torch.device("cpu"), dtype=torch.int32).tolist() == [[4, 0, 0]]


def test_kv_cache_dtype_sets_the_cache_its_byte_budget_and_refuses_what_it_cannot_hold():
    model = llmspeed.models.tiny("llama", seed=0)  # fp32
    auto = Generator(model, progress=False, kv_cache_tokens=256)
    half = Generator(model, progress=False, kv_cache_tokens=256, kv_cache_dtype="float16")
    assert auto.cache.key.dtype == torch.float32 and half.cache.key.dtype == half.cache.value.dtype == torch.float16
    assert 2 * half.cache.nbytes == auto.cache.nbytes
    by_bytes = Generator(model, progress=False, kv_cache_bytes=auto.cache.nbytes, kv_cache_dtype=torch.bfloat16)
    assert by_bytes.cache.key.dtype == torch.bfloat16 and by_bytes.blocks.num_blocks == 2 * auto.blocks.num_blocks
    out = half.generate_batched([[1, 2, 3], list(range(5, 40))], SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [6, 6]
    for bad in ("int8", "fp8", torch.float64, 16):
        with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of \['auto', 'fp32', 'bf16', 'fp16'\]"):
            Generator(model, progress=False, kv_cache_tokens=256, kv_cache_dtype=bad)
    on_gpu = dataclasses.replace(model.spec, device=torch.device("cuda"))
    assert cache_dtype(on_gpu, "auto") == cache_dtype(on_gpu, " Auto ") == cache_dtype(on_gpu, "float32") == torch.float32
    with pytest.raises(ValueError, match="on cuda the attention kernels and CUDA graphs read the model's dtype"):
        cache_dtype(on_gpu, "fp16")


def test_an_fp16_cache_refuses_keys_and_values_past_its_range_before_writing():
    """fp16 rounds |x| >= 65520 to inf, and every score or output reading an inf key or value is NaN (greedy then
    picks token 0 for every request). A step whose new keys or values would overflow is refused with a
    ``ValueError`` naming ``kv_cache_dtype`` before anything is written; its requests end with that error on both
    the per-layer path and the fused step. The same values fit a bf16 cache."""
    cache = PagedKVCache(SPEC, num_blocks=4, block_size=4, dtype=torch.float16)
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    attention = PagedAttention(cache, [([1], 0, 3)])
    for big in (k, v):
        big[0, 1, 2, 5] = 7e4
        with pytest.raises(ValueError, match="kv_cache_dtype='fp16' cannot hold a key or value of magnitude 70000"):
            attention(0, q, k, v, 8**-0.5)
        assert not cache.key.any() and not cache.value.any()
        big[0, 1, 2, 5] = 6e4  # rounds to a finite fp16
    assert attention(0, q, k, v, 8**-0.5).isfinite().all()

    model = llmspeed.models.tiny("llama", seed=2)
    with torch.no_grad():  # values of about 6e5 in every layer, the same outputs
        for layer in model.hf.model.layers:
            layer.self_attn.v_proj.weight.mul_(1e6)
            layer.self_attn.o_proj.weight.div_(1e6)
    prompts, params = [[3, 1, 4, 1, 5], list(range(7, 27))], SamplingParams(max_new_tokens=3, ignore_eos=True)
    for fused in (False, None) if fused_decode.extension() is not None else (False,):
        gen = Generator(model, progress=False, kv_cache_tokens=256, kv_cache_dtype="fp16", fused_decode=fused)
        assert (gen.fused_decode_status == "on") == (fused is None)
        out = gen.generate_batched(prompts, params)
        assert [o.finish_reason for o in out] == ["error", "error"], [o.token_ids for o in out]
        assert all("kv_cache_dtype='fp16' cannot hold" in o.error for o in out)
    out = Generator(model, progress=False, kv_cache_tokens=256, kv_cache_dtype="bf16").generate_batched(prompts, params)
    assert [len(o.token_ids) for o in out] == [3, 3]


@pytest.mark.parametrize("fused", [False, None])
@pytest.mark.parametrize("start,to", [("bf16", "fp32"), ("fp32", "bf16")])
def test_an_auto_cache_follows_the_models_dtype_after_a_cast(fused, start, to):
    """Regression: with ``kv_cache_dtype="auto"`` the cache kept the model's dtype of when the generator was made, so
    after ``llmspeed.cast`` a bf16 cache rounded an fp32 model's keys and values (and an fp32 cache held a bf16
    model's, with the fused step's bf16 widening chosen for fp32): logprobs differed from a fresh generator's."""
    model = llmspeed.models.tiny("llama", seed=0)
    llmspeed.cast(model, start)
    prompts = [list(range(1, 21)), list(range(5, 14))]
    sp = SamplingParams(max_new_tokens=5, ignore_eos=True, logprobs=0)
    gen = Generator(model, progress=False, fused_decode=fused)
    gen.generate_batched(prompts, sp)
    llmspeed.cast(model, to)
    got = gen.generate_batched(prompts, sp)
    want = Generator(model, progress=False, fused_decode=fused).generate_batched(prompts, sp)
    assert gen.cache.key.dtype == gen.cache.value.dtype == llmspeed.names.CANONICAL_DTYPES[to]
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [[lp.logprob for lp in o.logprobs] for o in got] == [[lp.logprob for lp in o.logprobs] for o in want]


def test_a_model_moved_to_another_device_under_its_generator_is_named():
    """Regression: after ``model.hf.to(device)`` a Generator kept its KV cache (and graphs, kernels) on the old device
    and failed deep in a step; the request now ends with an error saying what happened and what to do."""
    import llmspeed
    from llmspeed.generation import Generator, SamplingParams

    model = llmspeed.models.tiny("llama", seed=0)
    gen = Generator(model, progress=False)
    assert gen.generate_batched([[1, 2, 3]], SamplingParams(max_new_tokens=2))[0].finish_reason == "length"
    model.hf.to("meta")  # a device this CPU-only machine has: the cache stays on the CPU
    out = gen.generate_batched([[1, 2, 3]], SamplingParams(max_new_tokens=2))[0]
    assert out.finish_reason == "error" and "the model moved to meta after this generator was made" in out.error
