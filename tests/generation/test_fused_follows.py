"""The fused CPU decode step follows the model: it steps aside for models it does not support, and after the model
changed under it (modules, parameters or buffers replaced, weights changed in place, a cast) its logits are those of
the model as it is now."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import llmspeed
from llmspeed import Generator, lora
from llmspeed.generation import fused_decode
from llmspeed.generation.runner import StepInput

from .test_fused_decode import LOGIT_TOLERANCE, _generic_logits, _prefilled

pytestmark = pytest.mark.skipif(fused_decode.extension() is None, reason="no C++ compiler: the generic path runs")


def test_steps_aside_for_models_it_does_not_support():
    gelu = llmspeed.models.tiny("llama", seed=0, hidden_act="gelu")
    assert fused_decode.unsupported(gelu) == "hidden_act 'gelu' is not 'silu'"
    assert Generator(gelu, progress=False).fused_decode_status == "off (hidden_act 'gelu' is not 'silu')"
    with pytest.raises(ValueError, match="fused_decode=True, but this model cannot use it: hidden_act 'gelu'"):
        Generator(gelu, fused_decode=True)
    with pytest.raises(ValueError, match="fused_decode must be None, True or False; got 'yes'"):
        Generator(gelu, fused_decode="yes")
    odd_eps = llmspeed.models.tiny("llama", seed=0)
    odd_eps.hf.model.layers[1].post_attention_layernorm.variance_epsilon = 1e-3
    assert "layers.1.post_attention_layernorm is not an RMSNorm with the final norm's epsilon" in (
        fused_decode.unsupported(odd_eps)
    )
    odd_groups = llmspeed.quantize(llmspeed.models.tiny("llama", seed=0), "int4", group_size=8)
    assert "Int4Linear (int4): not an fp32/bf16 nn.Linear" in fused_decode.unsupported(odd_groups)
    adapted = llmspeed.models.tiny("phi3", seed=0, num_attention_heads=8, num_key_value_heads=1)  # head_dim 8
    lora.add_adapter(adapted, "a", r=2, targets=["qkv_proj"])
    assert fused_decode.unsupported(adapted) == (
        "layers.0.self_attn.qkv_proj carries LoRA adapters and its k_proj rows 64:72 are not whole blocks of 16 "
        "outputs, which the fused step reads adapters in")


def test_a_model_changed_after_the_generator_was_built_is_followed():
    model = llmspeed.models.tiny("llama", seed=0)
    gen, decode = _prefilled(model, [5, 12])
    fused = fused_decode.FusedDecode(model, gen.cache)
    before = fused.run(StepInput.decode(decode, gen.blocks.block_size))
    # a new linear at one position: the cached weight list must not be reused
    old = model.hf.model.layers[1].mlp.down_proj
    new = nn.Linear(old.in_features, old.out_features, bias=False)
    with torch.no_grad():
        new.weight.copy_(old.weight * 3)
    model.replace_linear("model.layers.1.mlp.down_proj", new)
    after = fused.run(StepInput.decode(decode, gen.blocks.block_size))
    ref = _generic_logits(model, gen, decode)
    assert not torch.allclose(before, after)
    assert (after - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32]
    # a wrapper the step cannot read (a LoRA-wrapped lm_head) makes it step aside instead of ignoring it
    from llmspeed import lora

    lora.add_adapter(model, "a", r=2, targets=["lm_head"])
    assert "lm_head" in fused_decode.unsupported(model)
    assert fused.run(StepInput.decode(decode, gen.blocks.block_size)) is None


def _stepped_once():
    """A tiny llama's fused step after one decode step: model, generator, decode rows, step, its logits."""
    model = llmspeed.models.tiny("llama", seed=0)
    gen, decode = _prefilled(model, [5, 12])
    fused = fused_decode.FusedDecode(model, gen.cache)
    step = StepInput.decode(decode, gen.blocks.block_size)
    return model, gen, decode, fused, step, fused.run(step)


def test_a_replaced_decoder_layer_is_followed_and_unrelated_assignments_keep_the_snapshot():
    import copy

    model, gen, decode, fused, step, before = _stepped_once()
    snap = fused._snapshot
    # modules built anywhere else (here a throwaway one) leave the snapshot in use: its children were checked
    nn.Sequential(nn.Linear(2, 2))
    assert torch.equal(fused.run(step), before) and fused._snapshot is snap
    # a whole layer replaced in the ModuleList (its tensors are all new): regression, the step kept the old one
    config = model.hf.config  # shared, as the model's layers share it (attention runs through the paged cache)
    layer = copy.deepcopy(model.hf.model.layers[1], {id(config): config})
    with torch.no_grad():
        layer.mlp.down_proj.weight.mul_(3)
    model.hf.model.layers[1] = layer
    after = fused.run(step)
    ref = _generic_logits(model, gen, decode)
    assert not torch.allclose(before, after) and fused._snapshot is not snap
    assert (after - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32]
    # a child deleted (no registration hook runs for del) still invalidates the snapshot
    snap = fused._snapshot
    assert snap.valid()
    del model.hf.model.layers[0].mlp.down_proj
    assert not snap.valid()


def test_weights_swapped_in_place_restack_and_dropped_snapshots_release_their_hold():
    import gc

    model, gen, decode, fused, step, before = _stepped_once()
    snap = fused._snapshot
    handle = snap.handle
    assert fused.ext.held_current(handle, [])
    # the same Parameter object with new data (what nn.Module.to and llmspeed.cast do): only the pointer changes
    weight = model.hf.model.layers[0].self_attn.o_proj.weight
    weight.data = weight.data * 2
    assert not fused.ext.held_current(handle, []) and not snap.valid()
    after = fused.run(step)
    ref = _generic_logits(model, gen, decode)
    assert not torch.allclose(before, after)
    assert (after - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32]
    assert fused._snapshot is not snap and fused._snapshot.handle != handle
    del snap
    gc.collect()
    with pytest.raises(RuntimeError, match=f"no held weights with handle {handle}"):
        fused.ext.held_current(handle, [])  # the replaced snapshot's tensors were released with it



def test_parameters_and_buffers_replaced_by_new_tensors_are_followed():
    """Regression: the snapshot held the replaced tensor, whose pointer never changes, so after
    ``module.weight = nn.Parameter(...)`` or ``load_state_dict(assign=True)`` the step kept the old weights."""
    model, gen, decode, fused, step, before = _stepped_once()
    o_proj = model.hf.model.layers[0].self_attn.o_proj
    o_proj.weight = nn.Parameter(o_proj.weight.detach() * 3)
    ref = _generic_logits(model, gen, decode)
    assert not torch.allclose(before, ref)
    assert (fused.run(step) - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32]
    model.hf.load_state_dict(llmspeed.models.tiny("llama", seed=3).hf.state_dict(), assign=True)
    ref = _generic_logits(model, gen, decode)
    assert (fused.run(step) - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32]
    # a quantized linear's buffer assigned anew
    model = llmspeed.quantize(llmspeed.models.tiny("llama", seed=0), "int8")
    gen, decode = _prefilled(model, [5, 12])
    fused = fused_decode.FusedDecode(model, gen.cache)
    step = StepInput.decode(decode, gen.blocks.block_size)
    fused.run(step)
    down = model.hf.model.layers[1].mlp.down_proj
    down.scales = down.scales * 3
    ref = _generic_logits(model, gen, decode)
    assert (fused.run(step) - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32]
    # Phi-3: the step reads row ranges of the fused projections; a fused parameter replaced is followed
    for fmt in (None, "int4"):
        model = llmspeed.models.tiny("phi3", seed=0)
        if fmt:
            llmspeed.quantize(model, fmt, group_size=32)
        gen, decode = _prefilled(model, [5, 12])
        fused = fused_decode.FusedDecode(model, gen.cache)
        step = StepInput.decode(decode, gen.blocks.block_size)
        before = fused.run(step)
        fused_up = model.hf.model.layers[0].mlp.gate_up_proj
        if fmt:
            fused_up.scales = fused_up.scales * 3
        else:
            fused_up.weight = nn.Parameter(fused_up.weight.detach() * 3)
        ref = _generic_logits(model, gen, decode)
        assert not torch.allclose(before, ref)
        assert (fused.run(step) - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32]


@pytest.mark.parametrize("architecture, tensor", [("llama", "norm"), ("llama", "input_layernorm"),
                                                  ("qwen2", "q_proj.bias"), ("qwen3", "k_norm"),
                                                  ("phi3", "qkv_proj.weight")])  # fmt: skip
@pytest.mark.parametrize("through_data", [False, True], ids=["in-place", "through-data"])
def test_a_bf16_models_norms_and_biases_changed_in_place_are_followed(architecture, tensor, through_data):
    """A bf16 model's norms and biases are read as fp32 copies; an in-place change (training, ``load_state_dict``)
    keeps their pointers, so the copies' versions are checked too, and a write through ``.data`` (which keeps the
    version too) is seen by comparing the values. Regression: the step kept the old values."""
    model = llmspeed.models.tiny(architecture, seed=1, dtype=torch.bfloat16)
    gen, decode = _prefilled(model, [3, 9, 17])
    fused = fused_decode.FusedDecode(model, gen.cache)
    step = StepInput.decode(decode, gen.blocks.block_size)
    fused.run(step)
    body = model.hf.model
    attn = body.layers[1].self_attn
    weight = {"norm": body.norm.weight, "input_layernorm": body.layers[0].input_layernorm.weight,
              "q_proj.bias": getattr(getattr(attn, "q_proj", None), "bias", None),
              "k_norm": getattr(getattr(attn, "k_norm", None), "weight", None),
              "qkv_proj.weight": getattr(getattr(attn, "qkv_proj", None), "weight", None)}[tensor]  # fmt: skip
    with torch.no_grad():
        (weight.data if through_data else weight).mul_(3).add_(0.5)
    after = fused.run(step)
    ref = _generic_logits(model, gen, decode)
    assert (after - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.bfloat16]
    snap = fused._snapshot
    assert torch.equal(fused.run(step), after) and fused._snapshot is snap  # unchanged: the snapshot is kept

def test_double_quantized_scales_read_as_copies_follow_a_state_loaded_in_place():
    """Regression: the step reads NF4's double-quantized scales as an expanded copy, checked by pointer only;
    ``load_state_dict`` copies in place and keeps the pointers, so after loading another model's state the step kept
    the old scales while the generic path used the new ones."""
    model, other = (llmspeed.quantize(llmspeed.models.tiny("llama", seed=s), "nf4", group_size=32, double_quant=True)
                    for s in (1, 2))  # fmt: skip
    gen, decode = _prefilled(model, [3, 9, 17])
    fused = fused_decode.FusedDecode(model, gen.cache)
    step = StepInput.decode(decode, gen.blocks.block_size)
    before = fused.run(step)
    model.hf.load_state_dict(other.hf.state_dict())
    after = fused.run(step)
    ref = _generic_logits(model, gen, decode)
    assert not torch.allclose(before, ref)  # the loaded state matters
    assert (after - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32]


def test_a_replaced_rotary_module_and_a_replaced_lora_base_layer_are_followed():
    """Regressions a mutation found untested: the rotary table is keyed on the module (not only its frequencies), and a
    LoRA wrapper's ``base_layer`` is one of the places checked (its old weight would still pass the pointer checks)."""
    model, gen, decode, fused, step, before = _stepped_once()
    rope = {"rope_type": "default", "rope_theta": 3.0}  # frequencies far from the model's
    model.hf.model.rotary_emb = llmspeed.models.tiny("llama", seed=0, rope_parameters=rope).hf.model.rotary_emb
    after = fused.run(step)
    ref = _generic_logits(model, gen, decode)
    assert not torch.allclose(before, after)
    assert (after - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32]
    from llmspeed import lora

    lora.add_adapter(model, "a", r=2)
    fused.run(step)
    wrapper = model.hf.model.layers[0].mlp.down_proj
    new = nn.Linear(wrapper.in_features, wrapper.out_features, bias=False)
    with torch.no_grad():
        new.weight.copy_(wrapper.base_layer.weight * 3)
    wrapper.base_layer = new
    after = fused.run(step)
    ref = _generic_logits(model, gen, decode)
    assert (after - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32]
