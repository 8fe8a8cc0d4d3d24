"""merge / unmerge on float bases (exact) and quantized bases (re-quantized, restored bit for bit)."""

from __future__ import annotations

import pytest
import torch

import llmspeed
from llmspeed import lora

from .helpers import FakeInt8Linear, assert_same_tensors, base_tensors, fake_quantize, quantize_real

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model.hf(input_ids=IDS).logits


def test_float_merge_close_and_unmerge_round_trip(tiny_model):
    torch.manual_seed(0)  # init="random" draws from the global generator: not from whatever ran before
    lora.add_adapter(tiny_model, "a", r=4, init="random")
    before = base_tensors(tiny_model)
    unmerged = logits(tiny_model)
    report = lora.merge(tiny_model, "a")
    assert report.layers > 0 and report.requantized == 0
    torch.testing.assert_close(logits(tiny_model), unmerged, atol=1e-5, rtol=1e-5)
    first = f"{tiny_model.linear_names()[0]}.weight"  # q_proj, or Phi-3's qkv_proj
    assert not torch.equal(base_tensors(tiny_model)[first], before[first])
    lora.unmerge(tiny_model, "a")
    torch.testing.assert_close(logits(tiny_model), unmerged, atol=1e-5, rtol=1e-5)
    for key, value in base_tensors(tiny_model).items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0)


def test_merged_adapter_is_not_applied_twice(llama):
    lora.add_adapter(llama, "a", r=4, init="random")
    with_adapter = logits(llama)
    lora.merge(llama, "a")
    lora.set_adapter(llama, "a")  # active but merged: forward must skip the delta
    torch.testing.assert_close(logits(llama), with_adapter, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="merged"):
        with lora.disabled(llama):
            pass


def _check_quantized_merge(model):
    lora.add_adapter(model, "a", r=8, init="random")
    before = base_tensors(model)
    unmerged = logits(model)
    with lora.disabled(model):
        base_only = logits(model)
    with pytest.warns(UserWarning, match="re-quantized"):
        report = lora.merge(model, "a")
    assert report.requantized == report.layers > 0
    assert report.max_abs_error > 0 and report.error_vs_update > 0
    # the report's errors: the worst layer's |W_merged - (W + delta)|, and its norm relative to the update's norm
    abs_errors, ratios = [], []
    for _, layer in lora.lora_layers(model):
        with torch.no_grad():
            delta = layer.delta_weight("a").float()
            err = layer.base_layer.dequantize().float() - (layer.premerge["a"].dequantize().float() + delta)
        abs_errors.append(err.abs().max().item())
        ratios.append((err.norm() / delta.norm()).item())
    assert len(ratios) == report.layers
    assert report.max_abs_error == pytest.approx(max(abs_errors), rel=1e-3)
    assert report.error_vs_update == pytest.approx(max(ratios), rel=1e-3)
    merged = logits(model)
    # re-quantizing rounds the weights again: not equal to the unmerged result, but the adapter's
    # effect survives (merged is much closer to base + adapter than to the base alone)
    assert 0 < (merged - unmerged).abs().mean() < 0.5 * (base_only - unmerged).abs().mean()
    layer = model.hf.model.layers[0].mlp.down_proj
    assert type(layer.base_layer) is type(layer.premerge["a"])
    lora.unmerge(model, "a")
    assert_same_tensors(base_tensors(model), before)
    assert torch.equal(logits(model), unmerged)


def test_quantized_merge_warns_and_unmerge_is_bit_exact(llama):
    _check_quantized_merge(fake_quantize(llama))


@pytest.mark.parametrize("method", ["int8", "int4", "nf4"])
def test_real_quantized_merge(llama, method):
    _check_quantized_merge(quantize_real(llama, method))


def test_merge_into_float_copy(llama):
    fake_quantize(llama)
    lora.add_adapter(llama, "a", r=4, init="random")
    unmerged = logits(llama)
    report = lora.merge(llama, "a", requantize=False)
    layer = llama.hf.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, torch.nn.Linear) and report.max_abs_error == 0
    torch.testing.assert_close(logits(llama), unmerged, atol=1e-5, rtol=1e-5)
    lora.unmerge(llama, "a")
    assert isinstance(layer.base_layer, FakeInt8Linear)
    assert torch.equal(logits(llama), unmerged)


def test_quantized_unmerge_order_enforced(llama):
    fake_quantize(llama)
    lora.add_adapter(llama, "a", r=2, init="random")
    lora.add_adapter(llama, "b", r=2, init="random")
    before = base_tensors(llama)
    with pytest.warns(UserWarning):
        lora.merge(llama, "a")
        lora.merge(llama, "b")
    with pytest.raises(ValueError, match="unmerge 'b' first"):
        lora.unmerge(llama, "a")
    lora.unmerge(llama, "b")
    lora.unmerge(llama, "a")
    assert_same_tensors(base_tensors(llama), before)


def test_requantize_must_be_a_bool(llama):
    """requantize="no" was truthy: it re-quantized. Now refused before any layer changes."""
    quantize_real(llama, "int8")
    lora.add_adapter(llama, "a", r=4, init="random")
    before = base_tensors(llama)
    with pytest.raises(ValueError, match="requantize must be a bool; got 'no'"):
        lora.merge(llama, "a", requantize="no")
    assert_same_tensors(base_tensors(llama), before)
    lora.merge(llama, "a", requantize=False)  # still mergeable


CALIBRATION = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(5))  # [n, t]


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_merging_into_calibrated_layers_with_requantize_is_refused_before_any_change(llama, method):
    """Regression: merging an adapter into layers GPTQ or AWQ quantized raised "method 'gptq' quantizes whole
    models; call llmspeed.quantize(...) instead of from_linear", a message about another call, after merging the
    float layers before them (a partly merged model). Rounding onto their own grid was measured instead and
    dropped most of the update (merged logits 0.89 of the base's distance from the adapter's, against under 0.5
    for a fresh round-to-nearest), so the merge is refused with what to do, and ``requantize=False`` works."""
    import llmspeed

    options = {"seq_len": 32, "n_sequences": 8, "progress": False}
    llmspeed.quantize(llama, "int4", 16, method=method, calibration=CALIBRATION, method_options=options,
                      lm_head=None, skip=["model.layers.0.*"])  # fmt: skip
    lora.add_adapter(llama, "a", r=8, init="random")
    before, unmerged = base_tensors(llama), logits(llama)
    with pytest.raises(ValueError, match=rf"requantize=True: layer 'model.layers.1.self_attn.q_proj' was quantized "
                                         rf"with method='{method}'.*merge with requantize=False"):  # fmt: skip
        lora.merge(llama, "a")
    assert_same_tensors(base_tensors(llama), before)
    assert not any(layer.merged for _, layer in lora.lora_layers(llama))  # layers.0 (float) was not merged either
    report = lora.merge(llama, "a", requantize=False)
    assert report.requantized == 0
    torch.testing.assert_close(logits(llama), unmerged, atol=1e-5, rtol=1e-5)
    lora.unmerge(llama, "a")
    torch.testing.assert_close(logits(llama), unmerged, atol=1e-5, rtol=1e-5)  # layers.0 is float: add, subtract


def test_merging_into_a_tied_output_head_leaves_the_input_embedding_alone():
    """Regression: merging an adapter on an output head tied to the input embedding added the update to the
    shared weight, so the embedding changed too and the merged logits were far from the unmerged ones (17 on
    the tiny Llama). The head now merges into a float copy; unmerge restores the tie."""
    import llmspeed

    model = llmspeed.models.tiny("llama", seed=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    lora.add_adapter(model, "a", r=4, init="random", targets=["lm_head", "q_proj"])
    embedding = model.hf.get_input_embeddings().weight
    before, unmerged = embedding.detach().clone(), logits(model)
    lora.merge(model, "a")
    assert torch.equal(embedding, before)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=1e-5)
    lora.unmerge(model, "a")
    assert model.hf.lm_head.base_layer.weight is embedding and torch.equal(embedding, before)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=1e-5)
    with lora.disabled(model):
        lora.delete_adapter(model, "a")
    assert model.hf.lm_head.weight is embedding


def _cast_then_merge_into_tied_head():
    model = llmspeed.models.tiny("llama", seed=0, tie_word_embeddings=True)
    llmspeed.cast(model, "bf16")
    torch.manual_seed(1)
    lora.add_adapter(model, "a", r=4, init="random", targets=["lm_head", "q_proj"])
    before = logits(model)
    lora.merge(model, "a")
    return model, before


def _cast_quantize_then_merge_into_float():
    model = llmspeed.models.tiny("llama", seed=0)  # untied: the embedding stays nn.Embedding, handing out fp32
    llmspeed.cast(model, "bf16")
    llmspeed.quantize(model, "int8")
    torch.manual_seed(1)
    lora.add_adapter(model, "a", r=4, init="random")
    before = logits(model)
    lora.merge(model, "a", requantize=False)
    return model, before


def _merge_into_tied_head_cast_then_unmerge():
    model = llmspeed.models.tiny("llama", seed=0, tie_word_embeddings=True)
    torch.manual_seed(1)
    lora.add_adapter(model, "a", r=4, init="random", targets=["lm_head"])
    lora.merge(model, "a")
    merged = logits(model)
    llmspeed.cast(model, "bf16")
    lora.unmerge(model, "a")
    lora.set_adapter(model, "a")  # unmerged and active: the same function as merged
    return model, merged


@pytest.mark.parametrize("steps", [_cast_then_merge_into_tied_head, _cast_quantize_then_merge_into_float,
                                   _merge_into_tied_head_cast_then_unmerge])  # fmt: skip
def test_layers_a_merge_makes_or_restores_get_the_cast_models_16_bit_matmul(monkeypatch, steps):
    """Regression: on a CPU where a cast model hands out fp32 activations (a crossover exists: Zen's AVX2, the
    project's reference machine), the float layer a merge made (a tied head's copy, requantize=False) or an unmerge
    restored after a cast had a bf16 weight but not the cast's per-call matmul: the next forward raised "expected
    m1 and m2 to have the same dtype"."""
    from llmspeed.precision import cpu_matmul

    monkeypatch.setattr(cpu_matmul, "_CROSSOVER", {torch.bfloat16: 1, torch.float16: 1})
    model, before = steps()
    after = logits(model)
    assert torch.isfinite(after).all()
    torch.testing.assert_close(after.float(), before.float(), atol=0.1, rtol=0.05)  # bf16 rounding of the merge


def test_kept_bases_move_with_the_layer():
    """Regression: the quantized base a merge keeps for unmerge sat outside the module tree, so ``.to()`` left it
    behind: after ``model.hf.to("meta")`` the restored layer was still on the CPU."""
    model = llmspeed.models.tiny("llama", seed=0)
    llmspeed.quantize(model, "int8")
    lora.add_adapter(model, "a", r=4, init="random")
    lora.merge(model, "a", requantize=False)
    model.hf.to("meta")
    lora.unmerge(model, "a")
    q = model.hf.model.layers[0].self_attn.q_proj.base_layer
    assert all(t.device.type == "meta" for t in (*q.parameters(), *q.buffers()))


def test_merge_into_a_quantized_base_with_bias_keeps_the_bias():
    """The merged layer (float copy or re-quantized) carries the quantized base's bias (Qwen2's q/k/v)."""
    model = llmspeed.models.tiny("qwen2", seed=0)
    with torch.no_grad():
        for block in model.hf.model.layers:
            block.self_attn.q_proj.bias.normal_(generator=torch.Generator().manual_seed(2))
    fake_quantize(model)
    layer = model.hf.model.layers[0].self_attn.q_proj
    lora.add_adapter(model, "a", r=4, init="random", targets=["q_proj"])
    unmerged = logits(model)
    lora.merge(model, "a", requantize=False)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=1e-5)
    lora.unmerge(model, "a")
    with pytest.warns(UserWarning):
        lora.merge(model, "a")
    assert torch.equal(model.hf.model.layers[0].self_attn.q_proj.base_layer.bias, layer.bias)


def test_requantizing_merge_keeps_the_bias_dtype_of_a_16_bit_model():
    """Regression: merge(requantize=True) rebuilt the layer from the fp32 dequantized linear, bias included, so a bf16
    model's quantized q/k/v came back with fp32 biases (twice the bytes, and fp32 tensors in its exports)."""
    model = llmspeed.models.tiny("qwen2", seed=0)
    llmspeed.cast(model, "bf16")
    llmspeed.quantize(model, "int4", group_size=32)
    bias = model.hf.model.layers[0].self_attn.q_proj.bias.detach().clone()  # [out] bf16
    lora.add_adapter(model, "a", r=4, init="random", targets=["q_proj"])
    with pytest.warns(UserWarning):
        lora.merge(model, "a")
    merged = model.hf.model.layers[0].self_attn.q_proj.base_layer.bias
    assert merged.dtype == torch.bfloat16 and torch.equal(merged, bias) and not merged.requires_grad


def test_merge_inside_disabled_is_refused(llama):
    """Regression: merging inside ``lora.disabled(model)`` folded the update into the weights, so the rest of the
    block (which runs the base alone) ran the adapter; ``disabled`` itself refuses merged adapters."""
    lora.add_adapter(llama, "a", r=2, init="random")
    before = base_tensors(llama)
    with lora.disabled(llama):
        base_only = logits(llama)
        with pytest.raises(ValueError, match="cannot merge adapter 'a' inside lora.disabled"):
            lora.merge(llama, "a")
        assert torch.equal(logits(llama), base_only)
    assert_same_tensors(base_tensors(llama), before)
    lora.merge(llama, "a")
