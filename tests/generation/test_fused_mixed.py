"""Steps with prompt chunks on the fused CPU step (mixed prefill and decode): logits and tokens of the generic
path, the row-loop and GEMM limits, bf16 prompt matrices."""

from __future__ import annotations

import pytest
import torch

import llmspeed
from llmspeed import Generator, SamplingParams
from llmspeed.generation import fused_decode
from llmspeed.generation.kv_cache import PagedAttention, PagedKVCache
from llmspeed.generation.runner import StepInput

from .test_fused_decode import ACT8_LOGIT_TOLERANCE, LOGIT_TOLERANCE

pytestmark = pytest.mark.skipif(fused_decode.extension() is None, reason="no C++ compiler: the generic path runs")


def _generic_step(model, cache, step):
    """The generic path's logits of any step (prompt chunks too): ``forward_batch`` over ``PagedAttention``."""
    with torch.inference_mode():
        return model.forward_batch(
            torch.tensor(step.ids), torch.tensor(step.positions), PagedAttention(cache, step.chunks),
            torch.tensor(step.rows, dtype=torch.long),
        ).float()


def _mixed_steps(block_size, seed=0):
    """Two steps over hand-made block tables: prompts from position 0 (one sampled, one not), then a decode row
    and the rest of the unsampled prompt (a chunk from position 70, as chunked prefill and prefix caching make):
    88 rows, enough for torch's GEMM on fp32 and bf16 weights (``TORCH_GEMM_ROWS``)."""
    ids = torch.randint(1, 250, (200,), generator=torch.Generator().manual_seed(seed)).tolist()
    a, b = list(range(0, 40)), list(range(40, 48))  # block tables: a's blocks, then b's
    first = StepInput.build([(a, 0, 70, ids[:70], False, None), (b, 0, 21, ids[70:91], True, None)], block_size)
    second = StepInput.build([(b, 21, 1, ids[91:92], True, None), (a, 70, 87, ids[92:179], True, None)], block_size)
    return first, second


MIXED_MODELS = [
    ("llama", None, {}),
    ("llama", "bf16", {}),  # x rounded to bf16 for torch's bf16 GEMM, or widened weights where that is slow
    ("qwen3", None, {}),  # per-head q/k norms
    ("qwen2", "int8", {}),  # q/k/v biases
    ("llama", "int4", {"group_size": 32}),
    ("llama", "nf4", {"group_size": 32}),
    ("llama", "int4", {"group_size": 32, "activations": "int8"}),
    ("llama", "int4", {"group_size": 32, "hadamard_layers": ["*.mlp.down_proj"]}),
]


@pytest.mark.parametrize("architecture, fmt, options", MIXED_MODELS)
@pytest.mark.parametrize("amx_rows", [0, 8], ids=["row-loop", "amx-tiles"])
def test_mixed_steps_match_the_generic_path(architecture, fmt, options, amx_rows):
    """Steps with prompt chunks (``FusedDecode(mixed=True)``): every row attends over its own sequence's positions
    up to its own, after the whole step's keys are written; only the sampled rows get logits, in ``step.rows``
    order; the cache afterwards holds what the generic path writes."""
    dtype = torch.bfloat16 if fmt == "bf16" else torch.float32
    model = llmspeed.models.tiny(architecture, seed=4, dtype=dtype)
    if fmt in llmspeed.quant.FORMATS:
        model = llmspeed.quantize(model, fmt, lm_head=fmt, **options)
    spec, bs = model.spec, 4
    fused_cache, generic_cache = (PagedKVCache(spec, 64, bs) for _ in range(2))
    fused = fused_decode.FusedDecode(model, fused_cache, amx_rows=amx_rows, mixed=True)
    tolerance = ACT8_LOGIT_TOLERANCE if options.get("activations") == "int8" else LOGIT_TOLERANCE[dtype]
    for step in _mixed_steps(bs):
        got = fused.run(step)
        ref = _generic_step(model, generic_cache, step)
        assert got is not None and got.shape == ref.shape == (len(step.rows), spec.vocab_size)
        assert (got - ref).abs().max() / ref.abs().max() < tolerance
    written = generic_cache.key.abs().amax(dim=(0, 2, 3, 4)) > 0  # [NB] blocks the steps wrote
    assert written[:46].all() and not written[46:].any()  # a: 157 tokens in 40 blocks, b: 22 in 6
    for fused_part, generic_part in ((fused_cache.key, generic_cache.key), (fused_cache.value, generic_cache.value)):
        assert (fused_part - generic_part).float().abs().max() / generic_part.float().abs().max() < tolerance


def test_a_mixed_step_that_samples_no_row_returns_no_logits():
    """A step of prompt chunks none of which ends a prompt (chunked prefill of a long prompt) samples nothing: its
    logits are ``[0, V]``, as the generic path's, not the output head run over every row (an empty ``logit_rows``
    asks the C++ step for every row); the keys and values are still written."""
    model = llmspeed.models.tiny("llama", seed=4)
    ids = list(range(1, 31))
    step = StepInput.build([(list(range(8)), 0, 30, ids, False, None)], 4)
    fused_cache, generic_cache = PagedKVCache(model.spec, 16, 4), PagedKVCache(model.spec, 16, 4)
    got = fused_decode.FusedDecode(model, fused_cache, mixed=True).run(step)
    ref = _generic_step(model, generic_cache, step)
    assert ref.shape == (0, model.spec.vocab_size)
    assert got is not None and got.shape == ref.shape
    assert (fused_cache.key - generic_cache.key).abs().max() < 1e-4 * generic_cache.key.abs().max()


def test_mixed_steps_stay_generic_when_turned_off_and_bad_values_are_refused():
    model = llmspeed.models.tiny("llama", seed=4)
    cache = PagedKVCache(model.spec, 64, 4)
    first, _ = _mixed_steps(4)
    assert fused_decode.FusedDecode(model, cache, mixed=False).run(first) is None
    assert not any(fused_decode.FusedDecode(model, cache, mixed=False).takes_prompt(n) for n in (1, 30, 500))
    assert all(fused_decode.FusedDecode(model, cache, mixed=True, max_rows=4).takes_prompt(n) for n in (1, 30, 500))
    with pytest.raises(ValueError, match="mixed must be None, True or False; got 'yes'"):
        fused_decode.FusedDecode(model, cache, mixed="yes")


@pytest.mark.parametrize("fmt, options", [
    (None, {}), ("bf16", {}), ("int8", {}), ("int8", {"activations": "int8"}), ("nf4", {"group_size": 32}),
    ("int4", {"group_size": 32}), ("int4", {"group_size": 32, "activations": "int8"}),
])  # fmt: skip
def test_without_amx_prompt_steps_run_fused_up_to_the_row_loop_limit_and_from_the_gemm_rows(fmt, options):
    """``mixed=None`` without AMX: steps of up to ``max_rows`` rows (the row loop's limit) and of at least
    ``gemm_rows()`` rows (GEMMs, dequantized blocks or byte-product panels) run fused; the ones between and
    any step with AMX tiles follow the rule too, and the logits of a GEMM-sized step match the generic path."""
    model = llmspeed.models.tiny("llama", seed=4, dtype=torch.bfloat16 if fmt == "bf16" else torch.float32)
    if fmt in llmspeed.quant.FORMATS:
        model = llmspeed.quantize(model, fmt, lm_head=fmt, **options)
    gemm = fused_decode.gemm_rows()
    assert gemm == 64
    ids = list(range(1, 200))
    for max_rows, runs in ((1 << 30, {12: True, 40: True, 64: True, 150: True}),
                           (12, {12: True, 13: False, 63: False, 64: True, 150: True})):  # fmt: skip
        fused = fused_decode.FusedDecode(model, PagedKVCache(model.spec, 64, 4), max_rows=max_rows)
        fused.amx = False
        for rows, expected in runs.items():
            step = StepInput.build([(list(range(40)), 0, rows, ids[:rows], True, None)], 4)
            got = fused.run(step)
            assert (got is not None) == expected == fused.takes_prompt(rows), (max_rows, rows)
            if got is not None and rows == 150:
                ref = _generic_step(model, PagedKVCache(model.spec, 64, 4), step)
                tolerance = ACT8_LOGIT_TOLERANCE if options.get("activations") == "int8" else LOGIT_TOLERANCE[model.spec.dtype]
                assert (got - ref).abs().max() / ref.abs().max() < tolerance


def test_bf16_prompt_matrices_widened_to_fp32_compute_the_fp32_product_of_the_bf16_weights():
    """Where the native bf16 GEMM is slow (``upcast_bf16``), a prompt-sized step multiplies fp32 activations by
    the bf16 weights widened: the fp32 model holding the same (bf16-representable) weights, to fp32 rounding
    (and the rotary table's, kept in the model's dtype). Without it, torch's bf16 GEMM rounds x to bf16 and
    lands further away."""
    bf16 = llmspeed.models.tiny("llama", seed=4, dtype=torch.bfloat16)
    widened = llmspeed.models.tiny("llama", seed=4, dtype=torch.bfloat16)
    widened.hf.float()
    first, _ = _mixed_steps(4)
    ref = fused_decode.FusedDecode(widened, PagedKVCache(widened.spec, 64, 4), mixed=True, amx_rows=0).run(first)
    err = {}
    for upcast in (True, False):
        cache = PagedKVCache(bf16.spec, 64, 4, torch.float32)  # keys and values as the fp32 model keeps them
        fused = fused_decode.FusedDecode(bf16, cache, mixed=True, amx_rows=0)
        fused.upcast_bf16 = upcast
        err[upcast] = ((fused.run(first) - ref).abs().max() / ref.abs().max()).item()
    assert err[True] < 1e-4 and err[False] > 10 * err[True], err  # rotary rows of a bf16 model are bf16 in both


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp32"])
def test_bf16_widening_follows_a_cast_whatever_the_caches_dtype(kv_cache_dtype, monkeypatch):
    """Regression: the fused step's bf16 widening was set again after a cast only when the cache followed the model's
    dtype (``"auto"``), so with an explicit cache dtype a generator built in fp32 kept it off after a bf16 cast."""
    from llmspeed.precision import cpu_matmul

    monkeypatch.setattr(cpu_matmul, "crossover", lambda dtype: 8)  # a CPU whose native bf16 GEMM is slow
    model = llmspeed.models.tiny("llama", seed=0)
    gen = Generator(model, progress=False, kv_cache_dtype=kv_cache_dtype)
    sp = SamplingParams(max_new_tokens=2, ignore_eos=True)
    gen.generate_batched([[1, 2, 3]], sp)
    assert gen.runner.fused.upcast_bf16 is False
    llmspeed.cast(model, "bf16")
    gen.generate_batched([[1, 2, 3]], sp)
    assert gen.runner.fused.upcast_bf16 is True


def test_mixed_steps_split_rows_of_unequal_length_over_threads(monkeypatch):
    """Two threads share out a prompt chunk's rows by their positions (rows further down the chunk see more):
    the same logits as one thread."""
    model = llmspeed.models.tiny("llama", seed=4)
    out = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        cache = PagedKVCache(model.spec, 64, 4)
        fused = fused_decode.FusedDecode(model, cache, mixed=True)
        out.append([fused.run(step) for step in _mixed_steps(4, seed=1)])
    for one, two in zip(*out):
        assert torch.allclose(one, two, rtol=0, atol=1e-5 * one.abs().max())


def _staggered(gen, prompts, params):
    """Each prompt added, then one step, so it arrives while the ones before it decode; then run to the end.
    Returns each request's tokens in prompt order."""
    ids, events = [], []
    for prompt, sp in zip(prompts, params):
        ids.append(gen.add_request(prompt, sp))
        events += gen.step()
    while gen.has_unfinished():
        events += gen.step()
    done = {e.request_id: e.output.token_ids for e in events if e.finished}
    return [done.get(i) for i in ids]


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_generator_with_mixed_fused_steps_gives_the_generic_tokens(prefix_caching):
    """Requests arriving while others decode (their prompts join decode rows in one step), a prompt longer than
    the step's token budget (chunked prefill) and, with prefix caching, prompts that share a cached prefix."""
    model = llmspeed.models.tiny("llama", seed=0)
    shared = list(range(30, 70))
    prompts = [[1, 2, 3], shared + [5, 6], list(range(100, 230)), shared + [9], [7] * 17]
    sp = SamplingParams(max_new_tokens=10, ignore_eos=True)
    results, paths = [], []
    for mixed in (True, False):
        gen = Generator(model, progress=False, block_size=8, max_batch_tokens=64, prefix_caching=prefix_caching)
        gen.runner.fused.mixed = mixed
        results.append(_staggered(gen, prompts, [sp] * len(prompts)))
        paths.append(set(gen.step_paths))
    assert results[0] == results[1] and all(r is not None and len(r) == 10 for r in results[0])
    assert "fused cpu mixed" in paths[0] and "mixed" not in paths[0]
    assert "mixed" in paths[1] and "fused cpu mixed" not in paths[1]
