"""Casting and autocast: dtypes per tensor kind, numerics, fp16 overflow, errors."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from torch import nn

import llmspeed
from llmspeed.precision import Fp16OverflowError, cpu_matmul, resolve_dtype
from llmspeed.protocol import base_linear

IDS = torch.arange(1, 17)[None]  # [1, 16]
# max |logit difference| allowed against fp32, per cast dtype (tiny random models, logits ~ 0.1-1)
TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 5e-3, torch.float32: 1e-6}


def _norms(model):
    return [m for m in model.hf.modules() if type(m).__name__.endswith("RMSNorm")]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cast_keeps_norms_and_rotary_in_fp32(tiny_model, dtype):
    target = resolve_dtype(dtype)
    with torch.no_grad():
        ref = tiny_model.hf(IDS).logits
    assert llmspeed.cast(tiny_model, dtype) is tiny_model
    assert tiny_model.spec.dtype == target
    assert tiny_model.hf.config.dtype == target  # what save_pretrained writes to config.json, and loaders read
    assert all(m.weight.dtype == target for _, m in tiny_model.linear_layers())
    assert _norms(tiny_model) and all(n.weight.dtype == torch.float32 for n in _norms(tiny_model))
    inv_freq = [b for n, b in tiny_model.hf.named_buffers() if n.endswith("inv_freq")]
    assert inv_freq and all(b.dtype == torch.float32 for b in inv_freq)
    embedding = tiny_model.hf.get_input_embeddings().weight
    with torch.no_grad():
        out = tiny_model.hf(IDS).logits
        # a prompt on a CPU without fast 16-bit GEMM computes in fp32 over the 16-bit weights (cpu_matmul)
        assert out.dtype == (torch.float32 if cpu_matmul.upcasts_activations(IDS, embedding) else target)
    assert (out.float() - ref).abs().max().item() < TOLERANCE[target]


def test_cast_back_to_fp32_removes_hooks(llama):
    llmspeed.cast(llama, "bf16")
    llmspeed.cast(llama, "fp32")
    assert all(p.dtype == torch.float32 for p in llama.hf.parameters())
    assert llama.hf.config.dtype == torch.float32
    assert all(not n._forward_hooks for n in _norms(llama))
    with torch.no_grad():
        assert llama.hf(IDS).logits.dtype == torch.float32


def test_fp16_overflow_raises_and_suggests_bf16(llama):
    llmspeed.cast(llama, "fp16", cpu_matmul="native")  # fp16 activations at every length
    with torch.no_grad():
        llama.hf.model.layers[0].mlp.up_proj.weight.fill_(6e4)  # activations past 65504
        llama.hf.model.layers[0].mlp.down_proj.weight.fill_(6e4)
        with pytest.raises(Fp16OverflowError, match=r"in the final hidden states \(model\) .*bf16"):
            llama.hf(IDS)


def test_fp16_overflow_in_the_output_head_alone_raises_and_names_it(llama):
    """Regression: only the decoder's final hidden states were checked, so logits that overflowed in lm_head alone
    (finite hidden states, large head weights) came back inf/NaN silently; and no message said where it happened."""
    llmspeed.cast(llama, "fp16", cpu_matmul="native")
    with torch.no_grad():
        llama.hf.lm_head.weight.mul_(3e5)  # logits past 65504, hidden states unchanged
        with pytest.raises(Fp16OverflowError, match=r"in the logits \(the output head 'lm_head'\) .*bf16"):
            llama.hf(IDS)


def test_autocast_runs_matmuls_in_bf16_and_leaves_weights(llama):
    with torch.no_grad():
        ref = llama.hf(IDS).logits
        with llmspeed.autocast(llama, "bf16") as m:
            assert m is llama
            out = llama.hf(IDS).logits
    assert out.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in llama.hf.parameters())
    assert (out.float() - ref).abs().max().item() < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("bad", ["int8", "bfloat", 16, torch.int8, None])
def test_unknown_dtype_is_a_clear_error(llama, bad):
    before = {n: p.clone() for n, p in llama.hf.named_parameters()}
    with pytest.raises(ValueError, match=r"dtype must be one of .*'bf16'.*got"):
        llmspeed.cast(llama, bad)
    assert all(torch.equal(before[n], p) for n, p in llama.hf.named_parameters())


def test_attach_and_autocast_take_a_transformers_model_as_cast_does(llama):
    hf = llama.hf  # what users hold; cast wraps it, and so must its two siblings
    llmspeed.precision.attach(hf, "bf16", cpu_matmul="native")
    assert all(n._forward_hooks for n in _norms(llama))
    llmspeed.precision.attach(hf, "fp32")
    with torch.no_grad():
        with llmspeed.autocast(hf, "bf16") as m:
            assert m.module is hf
            assert hf(IDS).logits.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="model must be an llmspeed.Model"):
        llmspeed.precision.attach(object(), "bf16")
    with pytest.raises(ValueError, match=r"cpu_matmul must be one of \['auto', 'native'\]; got 'fast'"):
        llmspeed.precision.attach(hf, "bf16", cpu_matmul="fast")
    assert all(not n._forward_hooks for n in _norms(llama))  # refused before any hook was attached


def test_autocast_rejects_fp32(llama):
    with pytest.raises(ValueError, match="16-bit"):
        with llmspeed.autocast(llama, "fp32"):
            pass


def test_autocast_checks_its_arguments_at_the_call_not_at_the_with():
    with pytest.raises(ValueError, match="16-bit.*got fp32"):
        llmspeed.autocast(object(), "fp32")  # raised before anything is entered (a generator would wait for `with`)
    with pytest.raises(TypeError, match="model must be an llmspeed.Model"):
        llmspeed.autocast(object(), "bf16")


def test_autocast_called_without_with_warns_that_it_changed_nothing(llama):
    """Regression: ``llmspeed.autocast(model, "bf16")`` as a plain call did nothing, silently."""
    with pytest.warns(RuntimeWarning, match=r"autocast\(model, 'bf16'\) was never entered"):
        llmspeed.autocast(llama, "bf16")
        gc.collect()
    with torch.no_grad():
        assert llama.hf(IDS).logits.dtype == torch.float32  # and indeed nothing changed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the block, entered and left (twice, in turn), warns about nothing
        ctx = llmspeed.autocast(llama, "fp16")
        for _ in range(2):
            with ctx, torch.no_grad():
                assert llama.hf(IDS).logits.dtype == torch.float16
        del ctx
        gc.collect()


class FakeQuantLinear(nn.Module):
    quant_format = "int4"

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantize(self):
        return torch.zeros(self.out_features, self.in_features)


def test_casting_a_quantized_model_is_refused(llama):
    name = "model.layers.0.self_attn.q_proj"
    llama.replace_linear(name, FakeQuantLinear(llama.hf.get_submodule(name)))
    with pytest.raises(TypeError, match=r"quantized to be cast; 1 layer is \(e.g.*q_proj.*cast\(model, 'bf16'\)"):
        llmspeed.cast(llama, "bf16")  # regression: said "1 layers are" and suggested 'bfloat16' for 'bf16'
    with pytest.raises(TypeError, match=r"cast\(model, torch.float16\)"):
        llmspeed.cast(llama, torch.float16)
    assert llama.spec.dtype == torch.float32


def test_casting_a_quantized_transformers_model_is_refused(llama):
    llmspeed.quantize(llama, "int8")  # through the wrapper tiny() returned
    scales = llama.hf.model.layers[0].self_attn.q_proj.scales.clone()
    with pytest.raises(TypeError, match=r"must not be quantized to be cast; \d+ layers are \(e.g.*Cast before quantizing"):
        llmspeed.cast(llama.hf, "bf16")  # a fresh wrapper, which finds no nn.Linear positions
    assert llama.hf.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(llama.hf.model.layers[0].self_attn.q_proj.scales, scales)


@pytest.mark.slow
def test_smollm2_bf16_perplexity_and_memory(smollm2):
    fp32_ppl = llmspeed.eval.perplexity(smollm2, window=256, n_windows=4)
    fp32_mem = llmspeed.memory_footprint(smollm2)["total"]
    llmspeed.cast(smollm2, "bf16")
    bf16_ppl = llmspeed.eval.perplexity(smollm2, window=256, n_windows=4)
    ratio = llmspeed.memory_footprint(smollm2)["total"] / fp32_mem
    assert abs(bf16_ppl / fp32_ppl - 1) < 0.005, (fp32_ppl, bf16_ppl)
    assert 0.49 < ratio < 0.51


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cast_leaves_lora_adapters_in_their_dtype_as_adding_them_after_the_cast_does(dtype):
    """Regression: casting a model that already had adapters turned the adapters 16-bit too, although an adapter
    keeps the dtype it was added with (fp32 by default) whatever the base: the same model cast before or after
    adding the same adapter differed in its adapters' dtype and logits."""
    from llmspeed import lora

    def adapted():
        m = llmspeed.models.tiny("llama", seed=0)
        lora.add_adapter(m, "a", r=4, init="random")
        return m

    after = llmspeed.cast(adapted(), dtype)  # adapters added, then cast
    before = llmspeed.models.tiny("llama", seed=0)
    llmspeed.cast(before, dtype)
    lora.add_adapter(before, "a", r=4, init="random")
    with torch.no_grad():  # the same adapter values (random init draws differ between the two models)
        for (_, x), (_, y) in zip(lora.lora_layers(after), lora.lora_layers(before)):
            y.weight_a("a").copy_(x.weight_a("a"))
            y.weight_b("a").copy_(x.weight_b("a"))
    dtypes = {p.dtype for _, layer in lora.lora_layers(after) for p in (layer.weight_a("a"), layer.weight_b("a"))}
    assert dtypes == {torch.float32}
    assert all(base_linear(m).weight.dtype == resolve_dtype(dtype) for _, m in after.linear_layers())
    with torch.no_grad():
        assert torch.equal(after.hf(IDS).logits, before.hf(IDS).logits)
    llmspeed.cast(after, "fp32")  # casting back keeps them too, and the base is fp32 again
    assert {layer.weight_a("a").dtype for _, layer in lora.lora_layers(after)} == {torch.float32}


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_what_stays_fp32_keeps_its_exact_values(dtype):
    """Regression: cast rounded the whole model to 16 bits and only then put the norms and LoRA adapters back in
    fp32, so they kept the fp32 dtype but held 16-bit-rounded values (up to 4e-3 off for norm weights near 1)."""
    from llmspeed import lora

    model = llmspeed.models.tiny("llama", seed=0)
    lora.add_adapter(model, "a", r=4, init="random")
    with torch.no_grad():
        for name, p in model.hf.named_parameters():
            if "norm" in name or "lora_" in name:
                p.add_(torch.randn_like(p) * 0.1)  # values off the bf16/fp16 grids
    kept = {n: p.detach().clone() for n, p in model.hf.named_parameters() if "norm" in n or "lora_" in n}
    llmspeed.cast(model, dtype)
    params = dict(model.hf.named_parameters())
    assert all(params[n].dtype == torch.float32 and torch.equal(params[n], v) for n, v in kept.items())
    llmspeed.cast(model, "bf16" if dtype == "fp16" else "fp16")  # a second 16-bit cast too
    params = dict(model.hf.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in kept.items())


def test_entering_an_active_autocast_block_again_is_refused_and_leaves_no_autocast_behind(llama):
    """Re-entering the same block would replace its torch.autocast, so leaving both would leave the outer one on."""
    ctx = llmspeed.autocast(llama, "bf16")
    with ctx:
        with pytest.raises(RuntimeError, match="already active; call llmspeed.autocast\\(\\) again to nest"):
            with ctx:
                pass
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")


def test_autocast_on_a_device_without_autocast_is_refused_at_the_call(llama):
    """Regression: the device was first checked by torch.autocast when the block was entered (a RuntimeError
    there), though bad arguments are documented to raise at the call."""
    llama.hf.to("meta")  # a device type torch has no autocast for
    with pytest.raises(ValueError, match=r"dtype='bf16' cannot autocast the model on meta: .*unsupported autocast"):
        llmspeed.autocast(llama, "bf16")
