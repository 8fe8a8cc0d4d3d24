"""16-bit linear layers on the CPU: the blocked fp32 path, the measured crossover, and cast()'s per-call choice."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import llmspeed
from llmspeed.precision import cpu_matmul

IDS = torch.arange(1, 17)[None]  # [1, 16]
HALF = [torch.bfloat16, torch.float16]
TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 5e-3}  # max |logit difference| of one 16-bit rounding more


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 130),
    k=st.integers(1, 96),
    n=st.integers(1, 200),
    lead=st.sampled_from([(), (2,), (1, 3)]),
    with_bias=st.booleans(),
    dtype=st.sampled_from(HALF),
    block_bytes=st.sampled_from([4, 256, 4096, 1 << 20]),
    seed=st.integers(0, 2**16),
    fp32_input=st.booleans(),
)
def test_upcast_linear_is_the_fp32_product_rounded_once(m, k, n, lead, with_bias, dtype, block_bytes, seed, fp32_input):
    """Also with fp32 activations (inference on CPUs with a crossover), whose output was left with the strides of
    the [N, M] product at up to 64 rows (not contiguous: a caller's .view of its last axis would fail)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, m, k, generator=gen).to(dtype)  # [..., M, K]
    x = x.float() if fp32_input else x
    w = torch.randn(n, k, generator=gen).to(dtype)  # [N, K]
    b = torch.randn(n, generator=gen).to(dtype) if with_bias else None  # [N]
    x0, w0 = x.clone(), w.clone()
    out = cpu_matmul.upcast_linear(x, w, b, block_bytes=block_bytes)
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())  # [..., M, N]
    assert out.shape == (*lead, m, n) and out.dtype == x.dtype and out.is_contiguous()
    # one rounding to 16 bits (half an ulp) plus fp32 summation error
    ulp = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)
    bound = ulp * exact.abs() + 1e-5 * k * (x.double().abs() @ w.double().abs().T).max()
    assert ((out.double() - exact).abs() <= bound + 1e-6).all()
    assert torch.equal(x, x0) and torch.equal(w, w0)  # inputs untouched


def test_crossover_is_the_smallest_m_from_which_upcast_always_wins(monkeypatch):
    def fake(times):
        return lambda dtype: times

    cases = [
        ({2: (1, 2), 4: (2, 1), 8: (4, 1), 16: (8, 2), 64: (32, 4)}, 4),
        ({2: (1, 0.5), 4: (2, 1), 8: (4, 1), 16: (8, 2), 64: (32, 4)}, 2),
        ({2: (1, 2), 4: (2, 1), 8: (4, 5), 16: (8, 2), 64: (32, 4)}, 16),  # a loss at 8 moves it up
        ({2: (1, 2), 4: (2, 3), 8: (4, 5), 16: (8, 9), 64: (32, 40)}, None),  # native bf16 CPU
    ]
    for times, expected in cases:
        monkeypatch.setattr(cpu_matmul, "_CROSSOVER", {})
        monkeypatch.setattr(cpu_matmul, "measure", fake(times))
        assert cpu_matmul.crossover(torch.bfloat16) == expected


def test_crossover_is_measured_once_and_rejects_other_dtypes(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_matmul, "_CROSSOVER", {})
    monkeypatch.setattr(cpu_matmul, "measure", lambda dtype: calls.append(dtype) or {2: (1.0, 0.5)})
    assert cpu_matmul.crossover(torch.float16) == cpu_matmul.crossover(torch.float16) == 2
    assert calls == [torch.float16]
    with pytest.raises(ValueError, match="dtype must be torch.bfloat16 or torch.float16; got torch.float32"):
        cpu_matmul.crossover(torch.float32)


def test_measure_times_both_paths_at_each_m():
    times = cpu_matmul.measure(torch.bfloat16, rows=(1, 8), size=64)
    assert set(times) == {1, 8}
    assert all(native > 0 and upcast > 0 for native, upcast in times.values())


def _spy(monkeypatch):
    calls = []
    real = cpu_matmul.upcast_linear

    def spy(x, weight, bias=None, block_bytes=cpu_matmul.BLOCK_BYTES):
        calls.append(x.numel() // x.shape[-1])
        return real(x, weight, bias, block_bytes)

    monkeypatch.setattr(cpu_matmul, "upcast_linear", spy)
    return calls


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cast_layers_take_the_upcast_path_from_the_crossover_on(llama, monkeypatch, dtype):
    target = llmspeed.precision.resolve_dtype(dtype)
    monkeypatch.setattr(cpu_matmul, "_CROSSOVER", {target: 4})
    calls = _spy(monkeypatch)
    llmspeed.cast(llama, dtype)
    linears = [m for m in llama.hf.modules() if type(m) is nn.Linear]
    assert cpu_matmul.installed(llama.hf) == len(linears) > 0
    with torch.no_grad():
        llama.hf(IDS[:, :3])  # M = 3: native everywhere
        assert calls == []
        auto = llama.hf(IDS).logits  # M = 16: every linear upcasts
        assert calls == [16] * len(linears)
    llmspeed.cast(llama, dtype, cpu_matmul="native")
    assert cpu_matmul.installed(llama.hf) == 0
    with torch.no_grad():
        native = llama.hf(IDS).logits
    assert len(calls) == len(linears)
    # both accumulate in fp32 and round once per layer: same logits up to 16-bit rounding
    assert (auto.float() - native.float()).abs().max().item() < 5e-2


def test_cast_back_to_fp32_and_quantize_drop_the_choice(llama):
    state = {k: v.clone() for k, v in llmspeed.cast(llama, "bf16").hf.state_dict().items()}
    assert cpu_matmul.installed(llama.hf) > 0
    assert llama.hf.state_dict().keys() == state.keys()  # weights and state dict unchanged
    twin = copy.deepcopy(llama)
    assert cpu_matmul.installed(twin.hf) == cpu_matmul.installed(llama.hf)
    with torch.no_grad():
        assert torch.equal(twin.hf(IDS).logits, llama.hf(IDS).logits)
    float_head = copy.deepcopy(twin)
    llmspeed.quantize(twin, "int8")
    assert cpu_matmul.installed(twin.hf) == 0  # every linear quantized, the output head too (at int8)
    llmspeed.quantize(float_head, "int8", lm_head=None)
    assert cpu_matmul.installed(float_head.hf) == 1  # the float head keeps its choice
    llmspeed.cast(llama, "fp32")
    assert cpu_matmul.installed(llama.hf) == 0


def test_gradients_take_the_native_path(llama, monkeypatch):
    monkeypatch.setattr(cpu_matmul, "_CROSSOVER", {torch.bfloat16: 1})
    calls = _spy(monkeypatch)
    llmspeed.cast(llama, "bf16")
    layer = llama.hf.model.layers[0].mlp.up_proj
    x = torch.randn(8, layer.in_features, dtype=torch.bfloat16, requires_grad=True)  # [8, in]
    layer(x).sum().backward()
    assert x.grad is not None and calls == []
    with torch.no_grad():
        layer(x)
    assert calls == [8]


def test_bad_cpu_matmul_is_a_clear_error_and_changes_nothing(llama):
    with pytest.raises(ValueError, match=r"cpu_matmul must be one of \['auto', 'native'\]; got 'fast'"):
        llmspeed.cast(llama, "bf16", cpu_matmul="fast")
    assert all(p.dtype == torch.float32 for p in llama.hf.parameters())
    assert cpu_matmul.installed(llama.hf) == 0


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_inference_computes_in_fp32_over_16_bit_weights(llama, monkeypatch, dtype):
    """fp32 activations end to end, nearer the fp32 model; the crossover picks each matmul's kernel only."""
    target = llmspeed.precision.resolve_dtype(dtype)
    monkeypatch.setattr(cpu_matmul, "_CROSSOVER", {target: 4})
    with torch.no_grad():
        ref = llama.hf(IDS).logits  # the fp32 model
    calls = _spy(monkeypatch)
    llmspeed.cast(llama, dtype)
    assert cpu_matmul.embedding_installed(llama.hf)
    seen: list[torch.dtype] = []  # every norm's output dtype
    handles = [m.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
               for m in llama.hf.modules() if type(m).__name__.endswith("RMSNorm")]  # fmt: skip
    linears = [m for m in llama.hf.modules() if type(m) is nn.Linear]
    with torch.no_grad():
        prompt = llama.hf(IDS).logits  # M = 16
        assert prompt.dtype == torch.float32 and set(seen) == {torch.float32}
        assert calls == [16] * len(linears)  # every linear takes the fp32 input through the upcast product
        short = llama.hf(IDS[:, :3]).logits  # M = 3: native kernels over rounded inputs, fp32 around them
        assert short.dtype == torch.float32 and set(seen) == {torch.float32} and len(calls) == len(linears)
        last_row = llama.hf(IDS, logits_to_keep=1).logits  # the head sees one fp32 row: rounded, native
    assert last_row.dtype == torch.float32
    torch.testing.assert_close(last_row[0, -1], prompt[0, -1], rtol=0, atol=TOLERANCE[target])
    for h in handles:
        h.remove()
    cpu_matmul.keep_16_bit_activations(llama.hf)  # the linears still choose; activations 16-bit again
    assert not cpu_matmul.embedding_installed(llama.hf) and cpu_matmul.installed(llama.hf) == len(linears)
    with torch.no_grad():
        assert llama.hf(IDS).logits.dtype == target
    llmspeed.cast(llama, dtype, cpu_matmul="native")
    assert not cpu_matmul.embedding_installed(llama.hf)
    with torch.no_grad():
        native = llama.hf(IDS).logits
    assert native.dtype == target
    # one rounding per layer output fewer: the fp32-activation logits are nearer the fp32 model's
    assert (prompt - ref).abs().max() < (native.float() - ref).abs().max()


def test_a_transformers_cache_filled_by_a_prompt_serves_the_next_steps(llama, monkeypatch):
    """The prompt and the one-token steps after it run the same activation dtype: generate works."""
    monkeypatch.setattr(cpu_matmul, "_CROSSOVER", {torch.bfloat16: 4})
    with torch.no_grad():
        want = llama.hf.generate(IDS, max_new_tokens=6, do_sample=False)  # fp32
    llmspeed.cast(llama, "bf16")
    with torch.no_grad():
        got = llama.hf.generate(IDS, max_new_tokens=6, do_sample=False)
    assert got.shape == want.shape and torch.equal(got[:, : IDS.shape[1]], IDS)


def test_gradients_and_cpus_with_fast_16_bit_gemm_keep_16_bit_activations(llama, monkeypatch):
    monkeypatch.setattr(cpu_matmul, "_CROSSOVER", {torch.bfloat16: 1})
    llmspeed.cast(llama, "bf16")
    assert llama.hf(IDS).logits.dtype == torch.bfloat16  # grad mode: nothing upcasts
    monkeypatch.setattr(cpu_matmul, "_CROSSOVER", {torch.bfloat16: None})  # the native kernel wins everywhere
    with torch.no_grad():
        assert llama.hf(IDS).logits.dtype == torch.bfloat16


def test_cpu_matmul_leaves_the_dtype_to_autocast(llama, monkeypatch):
    """Regression: on a CPU without fast 16-bit GEMM the cast's linear layers ran their own fp32 product under
    ``torch.autocast`` too and returned the weights' dtype, not autocast's: a bf16 model with LoRA adapters trained
    with precision="fp16" mixed bf16 and fp16 and crashed ("Unexpected floating ScalarType")."""
    from llmspeed import lora

    monkeypatch.setattr(cpu_matmul, "_CROSSOVER", {torch.bfloat16: 4, torch.float16: 4})  # as on AVX2 CPUs
    llmspeed.cast(llama, "bf16")
    layer = llama.hf.model.layers[0].mlp.up_proj
    x = torch.randn(16, layer.in_features).to(torch.bfloat16)  # [16, K]: rows past the crossover
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        assert layer(x).dtype == torch.float16
    lora.add_adapter(llama, "a", r=4, alpha=8)
    tokens = torch.arange(100) % 7
    result = lora.finetune(llama, tokens, precision="fp16", steps=1, seq_len=16, batch_size=2, progress=False)
    assert all(loss == loss for loss in result.losses)


def test_fp16_overflow_below_the_crossover_still_raises_with_fp32_activations(llama, monkeypatch):
    """The docs said fp16 activations cannot overflow once inference runs in fp32 over the 16-bit weights; calls
    below the crossover (decode steps) round each layer's input to fp16 for the native kernel, and do overflow."""
    monkeypatch.setattr(cpu_matmul, "_CROSSOVER", {torch.float16: 4})  # as on AVX2 CPUs
    llmspeed.cast(llama, "fp16")
    with torch.no_grad():
        for name in ("up_proj", "down_proj"):
            getattr(llama.hf.model.layers[0].mlp, name).weight.mul_(3000)  # MLP outputs near 1e5
        assert torch.isfinite(llama.hf(IDS).logits).all()  # 16 rows: fp32 products, no overflow
        with pytest.raises(llmspeed.precision.Fp16OverflowError, match="bf16"):
            llama.hf(IDS[:, :2])  # 2 rows: the native fp16 kernel
