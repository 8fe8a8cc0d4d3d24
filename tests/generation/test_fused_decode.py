"""The fused CPU decode step: its GEMV, its logits against the generic path (following the model: test_fused_follows.py;
steps with prompt chunks: test_fused_mixed.py; the paged attention kernel: test_paged_decode_kernel.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import llmspeed
from llmspeed import Generator, SamplingParams
from llmspeed.generation import fused_build, fused_decode, fused_snapshot
from llmspeed.generation.kv_cache import PagedAttention, PagedKVCache
from llmspeed.generation.runner import StepInput

# max |difference| / max |reference logit| allowed between the fused step and the generic path
LOGIT_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
ACT8_LOGIT_TOLERANCE = 1e-2

pytestmark = pytest.mark.skipif(fused_decode.extension() is None, reason="no C++ compiler: the generic path runs")


def _atol(x, w, ref):
    """Absolute tolerance of a GEMV against ``x @ w.T``: kernels sum in another order than torch, and the rounding
    of fp32 sums scales with the terms' magnitudes (``|x| @ |w|^T``), not with the result, which cancellation can
    make small (hypothesis found k=88 codes summing to 0.003 from terms of about 70: 6e-5 of rounding)."""
    terms = (x.abs() @ w.abs().T).max().item()
    return 1e-4 * x.shape[-1] ** 0.5 * (ref.abs().max().item() + 1e-3) + 1e-6 * x.shape[-1] ** 0.5 * terms


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 9),
    n=st.integers(1, 70),
    k=st.integers(1, 80),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int8]),
    seed=st.integers(0, 2**16),
    amx_rows=st.sampled_from([0, 1]),
)
def test_gemv_matches_f_linear(m, n, k, dtype, seed, amx_rows):
    """Both GEMV paths: the row loop (amx_rows=0) and AMX tiles (amx_rows=1; the row loop without AMX)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if dtype == torch.int8:
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        scale = torch.rand(n, generator=g) / 64
        ref = torch.nn.functional.linear(x, w.float() * scale[:, None])
    else:
        w, scale = torch.randn(n, k, generator=g).to(dtype), torch.empty(0)
        ref = torch.nn.functional.linear(x, w.float())
    y = fused_decode.extension().gemv(x, w, scale, torch.empty(0), amx_rows, False)
    dense = w.float() * scale[:, None] if dtype == torch.int8 else w.float()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=_atol(x, dense, ref))


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 9),
    n=st.integers(1, 40),
    k=st.integers(1, 100),
    fmt=st.sampled_from(["int4", "nf4"]),
    group=st.sampled_from([16, 32, 64]),
    seed=st.integers(0, 2**16),
    amx_rows=st.sampled_from([0, 1]),
)
@example(m=1, n=1, k=88, fmt="int4", group=32, seed=16, amx_rows=1)  # terms of ~70 summing to 0.003 (see _atol)
def test_4bit_gemv_matches_the_dequantized_weight(m, n, k, fmt, group, seed, amx_rows):
    """Group 16 keeps the row loop even with amx_rows=1 (a tile step is 32 codes)."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g))
    module = llmspeed.quant.modules.MODULES[fmt].from_linear(linear, llmspeed.quant.QuantConfig(fmt, group_size=group))
    w, scale, zero = fused_snapshot._parts(module)
    x = torch.randn(m, k, generator=g)
    y = fused_decode.extension().gemv(x, w, scale, torch.empty(0) if zero is None else zero, amx_rows, False)
    ref = x @ module.dequantize().T
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=_atol(x, module.dequantize(), ref))


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 9),
    n=st.integers(1, 40),
    groups=st.integers(1, 6),
    group=st.sampled_from([16, 32, 48, 64]),
    seed=st.integers(0, 2**16),
    amx_rows=st.sampled_from([0, 1]),
)
def test_group_wise_int8_gemv_matches_the_dequantized_weight(m, n, groups, group, seed, amx_rows):
    """Group-wise int8 (GGUF's Q8_0 at group 32): the row loop's per-group dot products, the tiles decline it."""
    k = groups * group
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g) * torch.rand(k, generator=g) * 4)  # groups of different ranges
    module = llmspeed.quant.modules.Int8Linear.from_linear(linear, llmspeed.quant.QuantConfig("int8", group_size=group))
    w, scale, zero = fused_snapshot._parts(module)
    assert zero is None and scale.dtype == torch.float16 and scale.shape == (n, groups)
    x = torch.randn(m, k, generator=g)
    y = fused_decode.extension().gemv(x, w, scale, torch.empty(0), amx_rows, False)
    ref = x @ module.dequantize().T
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=_atol(x, module.dequantize(), ref))


def test_group_wise_int8_layers_whose_groups_do_not_split_the_row_take_the_generic_path():
    model = llmspeed.models.tiny("llama", seed=2)  # 64 inputs to every projection but down_proj's 128
    llmspeed.quantize(model, "int8", group_size=48)  # 64 = 48 + 16: a shorter last group
    reason = fused_decode.unsupported(model)
    assert reason is not None and "group-wise int8 whose groups of 48 do not split its 64 inputs evenly" in reason
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
    gen = Generator(model, progress=False, block_size=4, kv_cache_tokens=256)
    assert gen.runner.fused is None
    want = Generator(model, progress=False, block_size=4, kv_cache_tokens=256, fused_decode=False)
    assert [o.token_ids for o in gen.generate_batched([[1, 2, 3]], sp)] == [o.token_ids for o in want.generate_batched([[1, 2, 3]], sp)]


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 9),
    n=st.integers(1, 40),
    k=st.integers(1, 300),
    fmt_group=st.sampled_from([("int4", 64), ("int4", 128), ("int4", 32), ("int4", 96), ("int4", 16), ("nf4", 64),
                               ("int8", None), ("int8", 16), ("int8", 32), ("int8", 48)]),
    seed=st.integers(0, 2**16),
    amx_rows=st.sampled_from([0, 1]),
)
def test_int8_activation_gemv_matches_the_rounded_input(m, n, k, fmt_group, seed, amx_rows):
    """act8: every path (VNNI int4 x int8 codes for groups of whole 32-code blocks, group-wise int8 x int8 codes on
    AVX2, q * d in fp32 otherwise) computes quantize_activations(x) @ dequantized w."""
    fmt, group = fmt_group
    if fmt == "int8" and group is not None:  # the step takes group-wise int8 whose groups split the row
        k = -(-k // group) * group
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g))
    config = llmspeed.quant.QuantConfig(fmt, group_size=group, activations="int8")
    module = llmspeed.quant.modules.MODULES[fmt].from_linear(linear, config)
    w, scale, zero = fused_snapshot._parts(module)
    x = torch.randn(m, k, generator=g) * torch.rand(k, generator=g) * 4  # blocks of different ranges
    y = fused_decode.extension().gemv(x, w, scale, torch.empty(0) if zero is None else zero, amx_rows, True)
    xq = llmspeed.quant.primitives.quantize_activations(x)
    ref = xq @ module.dequantize().T
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=_atol(xq, module.dequantize(), ref))
    assert torch.allclose(module(x), ref, rtol=1e-4, atol=_atol(xq, module.dequantize(), ref))


def _prefilled(model, lengths, block_size=4, seed=0):
    """A generator (generic path) whose requests have finished prefill; returns it and the decode list."""
    gen = Generator(model, progress=False, block_size=block_size, kv_cache_tokens=1024, fused_decode=False)
    g = torch.Generator().manual_seed(seed)
    for n in lengths:
        gen.add_request(torch.randint(0, 256, (n,), generator=g).tolist(), SamplingParams(max_new_tokens=8, ignore_eos=True))
    gen.step()  # prefill everything (default token budget covers it) and sample each first token
    seqs = list(gen.scheduler.running)
    assert all(s.output_ids for s in seqs)
    for s in seqs:  # the scheduler's job, done by hand: room for the token each decodes next
        gen.blocks.grow(s.seq_id, s.block_table, s.num_tokens)
    return gen, [(s.block_table, s.num_tokens - 1, s.output_ids[-1]) for s in seqs]


def _generic_logits(model, gen, decode, cache=None):
    attention = PagedAttention(gen.cache if cache is None else cache, [(t, p, 1) for t, p, _ in decode])
    with torch.inference_mode():
        return model.forward_batch(
            torch.tensor([tok for _, _, tok in decode]),
            torch.tensor([p for _, p, _ in decode]),
            attention,
            torch.arange(len(decode)),
        ).float()


@pytest.mark.parametrize("amx_rows", [0, 1], ids=["row-loop", "amx-tiles"])
@pytest.mark.parametrize("architecture", fused_decode.ARCHITECTURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_match_the_generic_path(architecture, dtype, amx_rows):
    """Both GEMV paths of the fused step (AMX tiles only where the CPU has them; the row loop otherwise)."""
    model = llmspeed.models.tiny(architecture, seed=3, dtype=dtype)
    # 13 sequences (the row loop's 8-row and 4-row blocks and a tail), contexts crossing block boundaries
    gen, decode = _prefilled(model, [1, 3, 4, 5, 9, 16, 17, 30, 2, 6, 11, 7, 3])
    # no row limit: AVX-512 CPUs without AMX hand steps above 12 rows to the generic path by default
    fused_step = fused_decode.FusedDecode(model, gen.cache, max_rows=1 << 30, amx_rows=amx_rows)
    fused = fused_step.run(StepInput.decode(decode, gen.blocks.block_size))
    ref = _generic_logits(model, gen, decode)
    assert fused is not None and fused.shape == ref.shape == (13, model.spec.vocab_size)
    err = (fused - ref).abs().max() / ref.abs().max()
    assert err < LOGIT_TOLERANCE[dtype], err
    if dtype == torch.float32:
        assert torch.equal(fused.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize(
    "architecture, fmt, options",
    [
        ("llama", "int8", {}),
        ("qwen2", "int8", {}),
        ("llama", "int8", {"group_size": 32}),  # group-wise int8 (GGUF's Q8_0), the head too
        ("qwen2", "int8", {"group_size": 16}),
        ("llama", "int4", {"group_size": 32}),
        ("qwen2", "int4", {"group_size": 16}),
        ("llama", "nf4", {"group_size": 32}),
        ("llama", "nf4", {"group_size": 16, "double_quant": True}),
        ("llama", "int4", {"group_size": 64, "activations": "int8"}),  # int8 codes on VNNI where it exists
        ("qwen2", "int4", {"group_size": 32, "activations": "int8"}),
        ("qwen2", "int4", {"group_size": 16, "activations": "int8"}),  # q * d in fp32
        ("llama", "int8", {"activations": "int8"}),
        ("llama", "int8", {"group_size": 32, "activations": "int8"}),  # Q8_0 x Q8_0 as llama.cpp: integer codes
        ("qwen2", "int8", {"group_size": 16, "activations": "int8"}),  # a scale per half of a 32-code block
        ("llama", "nf4", {"group_size": 64, "activations": "int8"}),
        ("llama", "int4", {"group_size": 32, "hadamard_layers": ["*.mlp.down_proj"]}),  # rotated in place
        ("qwen2", "int4", {"group_size": 16, "activations": "int8", "hadamard_layers": ["*.mlp.down_proj"]}),
        # Phi-3's fused qkv_proj / gate_up_proj: q, k, v and gate, up read as row ranges of codes and scales
        ("phi3", "int4", {"group_size": 32}),
        ("phi3", "int8", {"activations": "int8"}),
        ("phi3", "int8", {"group_size": 32}),
        ("phi3", "int8", {"group_size": 32, "activations": "int8"}),
        ("phi3", "nf4", {"group_size": 16, "double_quant": True}),
        ("phi3", "int4", {"group_size": 16, "hadamard_layers": ["*.mlp.gate_up_proj"]}),
    ],
)
@pytest.mark.parametrize("amx_rows", [0, 1], ids=["row-loop", "amx-tiles"])
def test_quantized_models_match_the_generic_path(architecture, fmt, options, amx_rows):
    """Group 16 keeps the row loop on the tile path too (a tile step is 32 codes)."""
    model = llmspeed.quantize(llmspeed.models.tiny(architecture, seed=2), fmt, lm_head=fmt, **options)
    assert type(model.hf.lm_head).__name__ == {"int8": "Int8Linear", "int4": "Int4Linear", "nf4": "NF4Linear"}[fmt]
    assert fused_decode.unsupported(model) is None
    gen, decode = _prefilled(model, [2, 7, 13, 4, 21])
    step = StepInput.decode(decode, gen.blocks.block_size)
    fused = fused_decode.FusedDecode(model, gen.cache, amx_rows=amx_rows).run(step)
    ref = _generic_logits(model, gen, decode)
    # int8 activations: fp32 summation order upstream may move an activation code by one step
    tolerance = ACT8_LOGIT_TOLERANCE if options.get("activations") == "int8" else LOGIT_TOLERANCE[torch.float32]
    assert (fused - ref).abs().max() / ref.abs().max() < tolerance


def _regions_then_team(run):
    """``(run() with a parallel region per loop, run() on a team held for the step)``, on 2 threads."""
    ext = fused_decode.extension()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    was = ext.step_team(False)
    try:
        regions = run()
        ext.step_team(True)
        return regions, run()
    finally:
        ext.step_team(was)
        torch.set_num_threads(threads)


@pytest.mark.parametrize("fmt", ["fp32", "int4-act8"])
def test_a_step_that_holds_its_threads_is_bit_identical_and_survives_an_error(fmt, monkeypatch):
    """Steps of a few rows hand their loops to a team of threads held for the whole step (step_team.h) instead
    of an OpenMP region per loop; the static split computes every row as before. An error inside the step
    (an int32 cache, refused layer by layer) ends the team and reaches the caller; the next step runs."""
    model = llmspeed.models.tiny("llama", seed=4)
    if fmt == "int4-act8":
        llmspeed.quantize(model, "int4", group_size=32, activations="int8", lm_head="int4")
    gen, decode = _prefilled(model, [2, 7, 13, 5])
    step = StepInput.decode(decode, gen.blocks.block_size)
    fused = fused_decode.FusedDecode(model, gen.cache, amx_rows=0)
    regions, team = _regions_then_team(lambda: fused.run(step))
    assert torch.equal(team, regions)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # on the team (the extension's default), as the error is meant to end one
    try:
        key, value = gen.cache.key, gen.cache.value
        monkeypatch.setattr(gen.cache, "key", key.to(torch.int32))
        monkeypatch.setattr(gen.cache, "value", value.to(torch.int32))
        with pytest.raises(RuntimeError, match="cache must be fp32, bf16 or fp16"):
            fused.run(step)
        monkeypatch.setattr(gen.cache, "key", key)
        monkeypatch.setattr(gen.cache, "value", value)
        assert torch.equal(fused.run(step), regions)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_caches_match_the_generic_path_and_stay_near_the_fp32_cache(cache_dtype):
    """An fp32 model over a 16-bit cache (``kv_cache_dtype``): the fused step and the generic path read the same
    rounded keys and values, so they agree as closely as over an fp32 cache; the logits move from the fp32
    cache's by no more than the rounding of the cached values."""
    model = llmspeed.models.tiny("llama", seed=3)
    gen, decode = _prefilled(model, [1, 3, 17, 30, 6])
    step = StepInput.decode(decode, gen.blocks.block_size)
    half = PagedKVCache(model.spec, gen.cache.num_blocks, gen.cache.block_size, cache_dtype)
    half.key.copy_(gen.cache.key)  # the prefilled keys and values, rounded once
    half.value.copy_(gen.cache.value)
    fused_half = fused_decode.FusedDecode(model, half).run(step)
    generic_half = _generic_logits(model, gen, decode, half)
    fused_fp32 = fused_decode.FusedDecode(model, gen.cache).run(step)
    scale = fused_fp32.abs().max()
    assert (fused_half - generic_half).abs().max() / scale < LOGIT_TOLERANCE[torch.float32]
    moved = (fused_half - fused_fp32).abs().max() / scale
    assert 0 < moved < (2e-2 if cache_dtype == torch.bfloat16 else 2e-3), moved


def test_qwen2_biases_are_used():
    model = llmspeed.models.tiny("qwen2", seed=1)
    assert model.hf.model.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():
        for layer in model.hf.model.layers:
            layer.self_attn.k_proj.bias.normal_(0, 2.0)
    gen, decode = _prefilled(model, [6, 11])
    fused = fused_decode.FusedDecode(model, gen.cache).run(StepInput.decode(decode, gen.blocks.block_size))
    ref = _generic_logits(model, gen, decode)
    assert (fused - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32]


@pytest.mark.parametrize("partial", [0.5, 0.75])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_partial_rotary_embedding_matches_the_generic_path(partial, dtype):
    """Phi-4-mini turns 3/4 of each head: the step rotates the first dimensions (rotate-half over them) and passes
    the rest; 0.75 of 16 leaves 12, whose halves are not the head's."""
    rope = {"rope_theta": 1e4, "partial_rotary_factor": partial, "rope_type": "default"}
    model = llmspeed.models.tiny("phi3", seed=3, dtype=dtype, rope_parameters=rope)
    assert fused_decode.unsupported(model) is None
    gen, decode = _prefilled(model, [1, 4, 9, 17, 30])
    fused = fused_decode.FusedDecode(model, gen.cache).run(StepInput.decode(decode, gen.blocks.block_size))
    ref = _generic_logits(model, gen, decode)
    assert (fused - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[dtype]


@pytest.mark.parametrize("architecture", ["llama", "phi3", "phi3-partial"])
def test_generator_uses_it_and_gives_the_same_tokens(architecture):
    """Greedy bursts (num_scheduler_steps) too: they read the rotary rows from the table themselves."""
    partial = {"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.75, "rope_type": "default"}}
    model = llmspeed.models.tiny(architecture.removesuffix("-partial"), seed=0,
                                 **(partial if architecture.endswith("partial") else {}))  # fmt: skip
    prompts = [[1, 2, 3], list(range(40, 90)), [7] * 17]
    sp = SamplingParams(max_new_tokens=15, ignore_eos=True)
    on = Generator(model, progress=False, block_size=8)
    off = Generator(model, progress=False, block_size=8, fused_decode=False)
    burst = Generator(model, progress=False, block_size=8, num_scheduler_steps=4)
    assert on.fused_decode_status == "on" and off.fused_decode_status.startswith("off")
    want = [o.token_ids for o in off.generate_batched(prompts, sp)]
    assert [o.token_ids for o in on.generate_batched(prompts, sp)] == want
    assert [o.token_ids for o in burst.generate_batched(prompts, sp)] == want
    assert "fused cpu, greedy burst" in burst.step_paths


@pytest.mark.parametrize("activations", ["float", "int8"])
def test_a_bf16_quantized_model_matches_the_generic_path_within_the_bf16_tolerance(activations):
    """A bf16 model's fused step keeps its activations in fp32 between operations, where the generic path rounds
    them to bf16, so the two agree to bf16's tolerance, not bit for bit, and greedy tokens of a random tiny model
    can part at a near tie (with int8 activations, a value near a rounding boundary takes the neighbouring code,
    which widens the difference: 1.1e-2 of the logits' range here against 4e-3 with float activations)."""
    model = llmspeed.models.tiny("llama", seed=3, dtype=torch.bfloat16)
    llmspeed.quantize(model, "int4", group_size=32, activations=activations)
    gen, decode = _prefilled(model, [1, 3, 4, 5, 9, 16, 17, 30])
    fused = fused_decode.FusedDecode(model, gen.cache, max_rows=1 << 30, amx_rows=0)
    got = fused.run(StepInput.decode(decode, gen.blocks.block_size))
    ref = _generic_logits(model, gen, decode)
    assert (got - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.bfloat16]


def test_decode_steps_with_more_rows_than_max_rows_take_the_generic_path():
    """The fused step's GEMVs cost grows per row; above ``max_rows`` the generic GEMM path runs, same tokens."""
    model = llmspeed.models.tiny("llama", seed=0)
    prompts = [[i + 1, i + 2, i + 3] for i in range(6)]
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
    many, few = (Generator(model, progress=False, block_size=8) for _ in range(2))
    many.runner.fused.max_rows = few.runner.fused.max_rows = 4
    many_out = [o.token_ids for o in many.generate_batched(prompts, sp)]
    few_out = [o.token_ids for o in few.generate_batched(prompts[:4], sp)]
    assert "fused cpu" not in many.step_paths and many.step_paths["decode"][0] == 3
    assert few.step_paths["fused cpu"][0] == 3 and "decode" not in few.step_paths
    assert many_out[:4] == few_out
    many.runner.fused.max_rows = 6  # raised: the fused step takes them all again
    assert [o.token_ids for o in many.generate_batched(prompts, sp)] == many_out
    assert many.step_paths["fused cpu"][0] == 3


def test_the_row_limit_follows_the_measured_machines(monkeypatch):
    """32 rows on AVX-512 CPUs without AMX (where the generic GEMMs catch up above it), no limit with AMX tiles
    or on AVX2-only CPUs."""
    monkeypatch.setattr(fused_decode, "isa_flags", lambda: ("avx2", "avx512f", "fma"))
    assert fused_decode.default_max_rows(amx=False) == fused_decode.AVX512_MAX_ROWS == 32
    assert fused_decode.default_max_rows(amx=True) > 10_000
    assert fused_decode.default_max_rows() == fused_decode.default_max_rows(amx=fused_decode.amx_available())
    monkeypatch.setattr(fused_decode, "isa_flags", lambda: ("avx2", "fma"))
    assert fused_decode.default_max_rows() > 10_000


def test_without_the_kernel_generation_still_works(monkeypatch):
    fused_build._build.cache_clear()
    monkeypatch.setenv("LLMSPEED_DISABLE_CPP", "1")
    try:
        gen = Generator(llmspeed.models.tiny("llama", seed=0), progress=False)
        assert "unavailable: disabled by LLMSPEED_DISABLE_CPP" in gen.fused_decode_status
        out = gen.generate_batched([[1, 2, 3]], SamplingParams(max_new_tokens=4, ignore_eos=True))[0]
        assert len(out.token_ids) == 4
    finally:
        monkeypatch.delenv("LLMSPEED_DISABLE_CPP")
        fused_build._build.cache_clear()


def test_attention_status_names_the_fused_steps_attention_and_follows_mixed():
    model = llmspeed.models.tiny("llama", seed=0)
    off = Generator(model, progress=False, block_size=8, fused_decode=False)
    assert "fused" not in off.attention_status
    gen = Generator(model, progress=False, block_size=8)
    assert gen.runner.fused is not None, gen.fused_decode_status  # the module is skipped without the kernel
    assert gen.attention_status.startswith(off.attention_status + "; fused cpu steps: C++ paged attention for ")
    gen.runner.fused.mixed = True
    assert gen.attention_status.endswith("decode rows and prompt chunks")
    gen.runner.fused.mixed = False
    assert gen.attention_status.endswith("for decode rows")
    gen.runner.fused.mixed, gen.runner.fused.amx, gen.runner.fused.max_rows = None, False, 1 << 30
    assert gen.attention_status.endswith("decode rows and prompt chunks")  # no row limit: every prompt step
    gen.runner.fused.max_rows = 12  # as on AVX-512 CPUs without AMX
    assert gen.attention_status.endswith("prompt chunks in steps of up to 12 or from 64 rows")


@pytest.fixture
def prefetch_store(monkeypatch, tmp_path):
    """Timing on, kernel choices in a fresh store under ``tmp_path``; the prefetch choice forgotten before and after."""
    from llmspeed.quant.kernels import tuning

    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(tuning, "default_folder", lambda: tmp_path / "autotune")
    monkeypatch.setattr(fused_build, "PREFETCH_PROBE_MB", 2)
    tuning.reset()
    fused_build._prefetch_choice.cache_clear()
    yield tuning
    tuning.reset()
    fused_build._prefetch_choice.cache_clear()
    fused_decode.extension().float_prefetch(True)


def test_float_prefetch_is_measured_once_per_machine_and_width_and_read_back(prefetch_store, monkeypatch):
    tuning, calls = prefetch_store, []

    def fake(candidates, timer=None):
        calls.append(sorted(candidates))
        for run in candidates.values():
            run()  # both GEMVs run over the probe weight
        return {"prefetch": 2.0, "stream": 1.0}

    monkeypatch.setattr(tuning, "time_candidates", fake)
    assert fused_decode.float_prefetch(96) is False and fused_decode.float_prefetch(96) is False
    assert calls == [["prefetch", "stream"]]  # once per process and width
    entry = tuning.store().choices[fused_build.prefetch_key(96)]
    assert entry["kernel"] == "stream" and entry["candidates"] == ["prefetch", "stream"]
    assert "float weight prefetch|k96" in str(llmspeed.kernels())  # reported with the kernel choices
    tuning.reset()
    fused_build._prefetch_choice.cache_clear()  # a new process: read from disk, nothing timed
    assert fused_decode.float_prefetch(96) is False and len(calls) == 1
    assert fused_decode.float_prefetch(128) is False and len(calls) == 2  # another width is measured on its own


def test_float_prefetch_stays_on_with_timing_off_and_changes_no_result(prefetch_store, monkeypatch):
    tuning = prefetch_store
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "0")
    assert fused_decode.float_prefetch(64) is True and tuning.store().choices == {}
    ext, none = fused_decode.extension(), torch.empty(0)
    x, w = torch.randn(3, 600), torch.randn(70, 600)
    for weight in (w, w.bfloat16()):
        ext.float_prefetch(True)
        on = ext.gemv(x, weight, none, none, 0, False)
        ext.float_prefetch(False)
        assert torch.equal(ext.gemv(x, weight, none, none, 0, False), on)
