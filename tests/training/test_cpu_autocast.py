"""16-bit autocast on CPUs without fast 16-bit GEMM: the fp32-product linear layers compute what autocast's do.

The crossover (does this CPU lack fast 16-bit GEMM?) is forced here, so every test runs on every host:
on a CPU with native bf16 the mode is off by default and these tests still check what it computes.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import llmspeed
from llmspeed import lora
from llmspeed.precision import cpu_matmul
from llmspeed.training import amp, cpu_autocast, loop, set_checkpointing

DTYPES = [torch.bfloat16, torch.float16]
TOKENS = torch.randint(0, 256, (5,), generator=torch.Generator().manual_seed(0)).repeat(200)
RUN = dict(steps=6, lr=1e-2, seq_len=16, batch_size=4, progress=False)


@pytest.fixture
def slow_16_bit(monkeypatch):
    """Pretend this CPU has no fast 16-bit GEMM (as AVX2-only CPUs measure)."""
    monkeypatch.setattr(cpu_matmul, "crossover", lambda dtype: 4)


@pytest.fixture
def fast_16_bit(monkeypatch):
    """Pretend this CPU has native 16-bit GEMM (as CPUs with AMX measure)."""
    monkeypatch.setattr(cpu_matmul, "crossover", lambda dtype: None)


def _linear_and_grads(x, w, b, dtype, fast: bool):
    x, w, b = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    with torch.autocast("cpu", dtype=dtype):
        if fast:
            with cpu_autocast.FastLinears():
                y = F.linear(x, w, b)
        else:
            y = F.linear(x, w, b)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    y.backward(grad)
    return y, x.grad, w.grad, b.grad


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear16_gives_autocasts_output_and_gradients(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=gen)  # [B, T, in]
    w = torch.randn(48, 64, generator=gen) / 8  # [out, in]
    b = torch.randn(48, generator=gen)
    native = _linear_and_grads(x, w, b, dtype, fast=False)
    fast = _linear_and_grads(x, w, b, dtype, fast=True)
    for name, n, f in zip(("output", "x.grad", "weight.grad", "bias.grad"), native, fast):
        assert f.dtype == n.dtype and f.shape == n.shape, name
        # both round fp32 sums of the same 16-bit products to 16 bits: they differ by the order of the additions
        scale = n.float().abs().amax()
        assert (f.float() - n.float()).abs().amax() <= 2 ** -7 * scale, name
    assert native[0].dtype == dtype and native[2].dtype == torch.float32


def test_the_mode_leaves_calls_outside_16_bit_cpu_autocast_as_they_were(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_autocast.Linear16, "apply", lambda *a: calls.append(a))
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with cpu_autocast.FastLinears():
        plain = F.linear(x, w)  # no autocast
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
            off = F.linear(x, w)
        double = F.linear(x.double(), w.double())
    assert calls == []
    assert torch.equal(plain, x @ w.T) and torch.equal(off, plain) and double.dtype == torch.float64


def test_mixed_precision_uses_it_only_where_the_cpu_lacks_fast_16_bit_gemm(monkeypatch):
    monkeypatch.setattr(cpu_matmul, "crossover", lambda dtype: 4)
    assert amp.MixedPrecision("bf16", "cpu").fast_linears and amp.MixedPrecision("fp16", "cpu").fast_linears
    assert not amp.MixedPrecision("fp32", "cpu").fast_linears
    assert not amp.MixedPrecision("bf16", "cpu", cpu_matmul="native").fast_linears
    monkeypatch.setattr(cpu_matmul, "crossover", lambda dtype: None)
    assert not amp.MixedPrecision("bf16", "cpu").fast_linears
    with pytest.raises(ValueError, match=r"cpu_matmul must be 'auto' or 'native'; got 'fast'"):
        amp.MixedPrecision("bf16", "cpu", cpu_matmul="fast")


def _count_linear16(monkeypatch) -> list:
    calls: list = []
    apply = cpu_autocast.Linear16.apply

    def counting(*args):
        calls.append(tuple(args[1].shape))
        return apply(*args)

    monkeypatch.setattr(cpu_autocast.Linear16, "apply", counting)
    return calls


@pytest.mark.parametrize("checkpointing", [False, True])
def test_every_linear_and_the_tied_head_run_through_it_also_when_recomputed(slow_16_bit, monkeypatch, checkpointing):
    """Regression: the output head, whose weight is an ``nn.Parameter``, kept autocast's kernel, whose backward
    product (``grad @ W`` for a 49152 x 576 head) took most of a bf16 SmolLM2 step on an AVX2 CPU."""
    model = llmspeed.models.tiny("llama", seed=0)
    calls = _count_linear16(monkeypatch)
    llmspeed.finetune(model, TOKENS, precision="bf16", gradient_checkpointing=checkpointing, **{**RUN, "steps": 1})
    n_linear = sum(1 for _, m in model.hf.named_modules() if isinstance(m, torch.nn.Linear))
    head = tuple(model.hf.get_output_embeddings().weight.shape)
    layers = model.spec.num_layers
    # checkpointing recomputes each decoder layer's forward in the backward pass, through the mode again
    per_step = n_linear + (n_linear - 1 if checkpointing else 0)
    assert len(calls) == per_step and calls.count(head) == 1, (len(calls), n_linear, layers)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_a_bf16_run_trains_as_autocasts_kernels_train(slow_16_bit, monkeypatch, kind):
    losses = {}
    for cpu_mm in ("native", "auto"):
        model = llmspeed.models.tiny("llama", seed=0)
        if kind == "lora":
            torch.manual_seed(0)  # the adapter's random A: the same in both runs
            lora.add_adapter(model, "a", r=8, alpha=16)
        monkeypatch.setattr(loop, "MixedPrecision", functools.partial(amp.MixedPrecision, cpu_matmul=cpu_mm))
        calls = _count_linear16(monkeypatch)
        losses[cpu_mm] = llmspeed.finetune(model, TOKENS, precision="bf16", **RUN).losses
        assert bool(calls) == (cpu_mm == "auto")
    assert losses["auto"][0] == pytest.approx(losses["native"][0], rel=1e-2)
    assert sum(losses["auto"][-2:]) == pytest.approx(sum(losses["native"][-2:]), rel=2e-2), losses
    assert sum(losses["auto"][-2:]) < 0.9 * sum(losses["auto"][:2]), losses


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_quantized_base_backward_gives_the_16_bit_products_gradient(llama, monkeypatch, dtype):
    """QLoRA's input gradient through a 4-bit layer: fp32 products of the 16-bit operands where the CPU lacks fast
    16-bit GEMM, the native 16-bit product elsewhere; the same numbers up to the order of additions."""
    llmspeed.quantize(llama, "int4", group_size=16)
    layer = dict(llama.linear_layers())["model.layers.0.mlp.down_proj"]
    x = torch.randn(2, 7, layer.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    grads = {}
    for name, crossover in (("slow", 4), ("fast", None)):
        monkeypatch.setattr(cpu_matmul, "crossover", lambda d, c=crossover: c)
        xg = x.clone().requires_grad_(True)
        layer(xg).float().square().sum().backward()
        grads[name] = xg.grad
    assert grads["slow"].dtype == grads["fast"].dtype == dtype
    scale = grads["fast"].float().abs().amax()
    assert (grads["slow"].float() - grads["fast"].float()).abs().amax() <= 2 ** -6 * scale


def test_a_model_with_its_own_checkpointing_keeps_autocasts_kernels(slow_16_bit, monkeypatch):
    """A caller's checkpointing (switched on before the run) recomputes without the mode: the forward pass must
    not use it either, or the recomputed tensors differ from the saved ones (torch's CheckpointError)."""
    model = llmspeed.models.tiny("llama", seed=0)
    set_checkpointing(model.hf, True)
    calls = _count_linear16(monkeypatch)
    result = llmspeed.finetune(model, TOKENS, precision="bf16", **RUN)
    assert calls == [] and len(result.losses) == RUN["steps"]
    assert sum(result.losses[-2:]) < 0.9 * sum(result.losses[:2]), result.losses
