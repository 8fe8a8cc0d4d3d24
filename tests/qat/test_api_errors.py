"""QAT's verbs refuse bad arguments and models they cannot take, naming the argument, before anything changes."""

from __future__ import annotations

import copy

import pytest
import torch

import llmspeed
from llmspeed import lora, qat
from tests.qat.conftest import GPTQ, TOKENS, _assert_same_packed, _calibration


def _snapshot(model):
    return {n: (m, m.weight if hasattr(m, "weight") else None) for n, m in model.linear_layers()}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(fmt="nf4"), "fmt must be one of"),
        (dict(fmt="int3"), "fmt must be one of"),
        (dict(fmt="int4", init="hqq"), "init must be one of"),
        (dict(fmt="int4", group_size=7), "group_size must be"),
        (dict(fmt="int4", group_size=-1), "group_size must be .* or None for one group per output row .*; got -1"),
        (dict(fmt="int4", group_size=512), "larger than in_features"),
        (dict(fmt="int8", group_size=32), "group_size must be None for int8"),
        (dict(fmt="int8", symmetric=False), "symmetric=False is not available for int8"),
        (dict(fmt="int4", symmetric="yes"), "symmetric must be a bool"),
        (dict(fmt="int4", learn_scales=1), "learn_scales must be a bool"),
        (dict(fmt="int4", calibration=TOKENS), "calibration is only used by init='gptq'"),
        (dict(fmt="int4", skip=["nope.*"]), "matches no linear layer"),
        # regression: the head was dropped without a word (prepare leaves it in float), or "leave no linear layer"
        (dict(fmt="int4", include=["lm_head", "*.q_proj"]), "include pattern 'lm_head' matches only the output head"),
        (dict(fmt="int4", include=["lm_head"]), "include pattern 'lm_head' matches only the output head 'lm_head'"),
        (dict(fmt="int8", hadamard_layers=["*.mlp.down_proj"]), "hadamard_layers rotates int4 layers"),
        (dict(fmt="int4", group_size=48, hadamard_layers=["*.mlp.down_proj"]), "power-of-two group_size"),
        (dict(fmt="int4", hadamard_layers=["*.nope"]), "hadamard_layers.*matches no"),
        (dict(fmt="int4", hadamard_layers="*.mlp.down_proj"), "lists of names or patterns, not a single string"),
    ],
)
def test_bad_prepare_arguments_raise_before_anything_changes(llama, kwargs, match):
    before = _snapshot(llama)
    with pytest.raises(ValueError, match=match):
        qat.prepare(llama, **kwargs)
    assert _snapshot(llama) == before


def test_prepare_rejects_quantized_and_prepared_models_and_convert_needs_prepare(llama):
    with pytest.raises(ValueError, match="call llmspeed.qat.prepare"):
        qat.convert(llama)
    quantized = copy.deepcopy(llama)
    llmspeed.quantize(quantized, "int4", 16)
    before = _snapshot(quantized)
    with pytest.raises(ValueError, match="already quantized"):
        qat.prepare(quantized, "int4", 16)
    assert _snapshot(quantized) == before
    qat.prepare(llama, "int4", 16)
    before = _snapshot(llama)
    with pytest.raises(ValueError, match="already prepared"):
        qat.prepare(llama, "int8")
    with pytest.raises(ValueError, match="prepared for quantization-aware training"):
        llmspeed.quantize(llama, "int4", 16)
    assert _snapshot(llama) == before


def test_prepare_refuses_a_model_with_adapters_and_says_to_prepare_first(llama):
    """Regression: the message told a qat.prepare user to 'quantize before adding adapters'."""
    lora.add_adapter(llama, "a", r=4, alpha=8)
    before = _snapshot(llama)
    with pytest.raises(ValueError, match=r"is wrapped \(LoraLinear\); quantize \(or qat.prepare\) the float model before"):
        qat.prepare(llama, "int4", 16)
    assert _snapshot(llama) == before and not qat.is_prepared(llama)


def test_a_16_bit_cast_of_a_prepared_model_is_refused_before_anything_changes(llama):
    """Regression: cast rounded the fp32 scale buffers to bf16, so convert packed other codes than the
    prepared model's (every q/k/v projection of the tiny llama) without a word."""
    qat.prepare(llama, "int4", 16)
    state = {k: v.clone() for k, v in llama.hf.state_dict().items()}
    with pytest.raises(ValueError, match=r"prepared for quantization-aware training .*Cast before llmspeed.qat.prepare"):
        llmspeed.cast(llama, "bf16")
    assert all(v.dtype == state[k].dtype and torch.equal(v, state[k]) for k, v in llama.hf.state_dict().items())
    llmspeed.cast(llama, "fp32")  # fp32 changes nothing and stays allowed (fp32 master weights of a bf16 model)
    bf16 = llmspeed.models.tiny("llama", seed=0, dtype="bf16")
    reference = copy.deepcopy(bf16)
    llmspeed.quantize(reference, "int4", 16, lm_head=None)
    qat.convert(qat.prepare(bf16, "int4", 16))  # cast first, then prepare: exactly quantize's tensors
    _assert_same_packed(bf16, reference)


def test_failed_gptq_start_restores_every_layer(llama):
    before = _snapshot(llama)
    with pytest.raises(ValueError):
        qat.prepare(llama, "int4", 16, init="gptq", calibration=[], init_options=GPTQ)
    assert _snapshot(llama) == before


def test_unknown_init_options_name_the_argument_before_any_change(llama):
    """An init option GPTQ does not take gets quantize's named-options error, not a TypeError from gptq_model."""
    before = _snapshot(llama)
    with pytest.raises(ValueError, match=r"init_options \['foo'\] are not options of method='gptq'; it takes .*seq_len"):
        qat.prepare(llama, "int4", 16, init="gptq", calibration=_calibration(), init_options=dict(GPTQ, foo=1))
    assert _snapshot(llama) == before


@pytest.mark.parametrize("options", ["seq_len=32", [("seq_len", 32)], 5])
def test_init_options_that_are_not_a_dict_name_the_argument(llama, options):
    """A string or a list of pairs was read by dict(): a ValueError from dict's internals, or accepted."""
    before = _snapshot(llama)
    with pytest.raises(ValueError, match=r"init_options must be None or a dict of method='gptq''s options; got"):
        qat.prepare(llama, "int4", 16, init="gptq", calibration=_calibration(), init_options=options)
    assert _snapshot(llama) == before
