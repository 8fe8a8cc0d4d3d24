"""``llmspeed.quantize`` on tiny models: what changes, what is skipped, bad input leaves the model untouched."""

from __future__ import annotations

import inspect
import re

import pytest
import torch
import transformers
from torch import nn

import llmspeed
from llmspeed.protocol import is_quantized
from llmspeed.quant import Int4Linear, Int8Linear, NF4Linear, plan_layers
from llmspeed.quant.api import int8_config
from llmspeed.quant.methods import METHODS, register_method
from llmspeed.quant.methods.registry import symmetric_methods
from llmspeed.quant.methods.rtn import rtn_weight


def _snapshot(model):
    return {name: module for name, module in model.linear_layers()}


def _assert_untouched(model, before):
    assert _snapshot(model) == before
    assert not any(is_quantized(m) for _, m in model.linear_layers())


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_quantize_every_arch_keeps_logits_close(tiny_model, fmt):
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_model.hf(ids).logits
        out = llmspeed.quantize(tiny_model, fmt, group_size=None if fmt == "int8" else 32)
        assert out is tiny_model
        got = tiny_model.hf(ids).logits
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < {"int8": 0.02, "int4": 0.25, "nf4": 0.25}[fmt]
    names = [n for n, m in tiny_model.linear_layers() if is_quantized(m)]
    assert names == tiny_model.linear_names()  # the output head too, at int8 per output channel (lm_head=)
    head = tiny_model.hf.get_output_embeddings()
    assert isinstance(head, Int8Linear) and head.config.group_size is None


@pytest.mark.parametrize("fmt", ["int4", "nf4", "int8"])
def test_the_output_head_is_int8_by_default_or_as_lm_head_says(fmt):
    from llmspeed.quant.embedding import QuantizedEmbedding

    def build():
        config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        torch.manual_seed(0)
        return llmspeed.wrap(transformers.AutoModelForCausalLM.from_config(config).eval())

    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    default = llmspeed.quantize(build(), fmt, group_size=None if fmt == "int8" else 32)
    head = default.hf.get_output_embeddings()
    ref = rtn_weight(build().hf.lm_head.weight.detach(), int8_config(head.config))
    assert isinstance(head, Int8Linear) and torch.equal(head.qweight, ref.codes)  # rounded per output channel
    assert isinstance(default.hf.get_input_embeddings(), QuantizedEmbedding)  # the tied embedding reads its rows
    float_head = llmspeed.quantize(build(), fmt, group_size=None if fmt == "int8" else 32, lm_head=None)
    assert isinstance(float_head.hf.get_output_embeddings(), nn.Linear)
    assert not isinstance(float_head.hf.get_input_embeddings(), QuantizedEmbedding)
    same = llmspeed.quantize(build(), fmt, group_size=None if fmt == "int8" else 32, lm_head=fmt)
    assert type(same.hf.get_output_embeddings()) is type(same.hf.model.layers[0].mlp.up_proj)
    with torch.no_grad():  # the three heads agree with each other to int8 / 4-bit rounding of the head
        a, b = default.hf(ids).logits, float_head.hf(ids).logits
    assert ((a - b).norm() / b.norm()).item() < 0.02


def test_a_bad_lm_head_is_refused_before_any_change(llama):
    before = _snapshot(llama)
    with pytest.raises(ValueError, match=r"lm_head must be None \(float\), 'int8' or the model's format 'int4'; got 'nf4'"):
        llmspeed.quantize(llama, "int4", lm_head="nf4")
    _assert_untouched(llama, before)


def test_hqq_rounds_an_int8_head(llama):
    llmspeed.quantize(llama, "int4", method="hqq")  # HQQ is int4 only: the head is rounded to nearest
    assert isinstance(llama.hf.lm_head, Int8Linear)


def test_skip_include_and_lm_head(llama):
    llmspeed.quantize(llama, "nf4", include=["lm_head", "*.mlp.*"], double_quant=True, lm_head="nf4")
    q = {n for n, m in llama.linear_layers() if is_quantized(m)}
    assert "lm_head" in q and all(".mlp." in n or n == "lm_head" for n in q)
    assert isinstance(llama.hf.lm_head, NF4Linear) and llama.hf.lm_head.config.double_quant


def test_memory_shrinks(llama):
    before = llmspeed.memory_footprint(llama)["linear"]
    head = llama.hf.lm_head.weight.numel() * 4
    llmspeed.quantize(llama, "int4", group_size=64, lm_head=None)
    after = llmspeed.memory_footprint(llama)["linear"]
    assert (after - head) / (before - head) < 0.16
    with_head = llmspeed.memory_footprint(llmspeed.quantize(llmspeed.models.tiny("llama", seed=0), "int4"))["linear"]
    assert head * 0.25 < with_head - (after - head) < head * 0.3  # the int8 head: a byte a weight, an fp32 scale a row


def test_generate_with_transformers_after_quantize(llama):
    llmspeed.quantize(llama, "int4", group_size=32)
    out = llama.hf.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)


def test_bf16_model_quantizes_and_runs():
    model = llmspeed.models.tiny("llama", dtype=torch.bfloat16)
    llmspeed.quantize(model, "int8")
    with torch.no_grad():
        logits = model.hf(torch.tensor([[1, 2, 3]])).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [({"fmt": "int5"}, "format must be one of"), ({"fmt": "int4", "group_size": 0}, "group_size must be"),
     ({"fmt": "int4", "group_size": -1}, "or None for one group per output row .*; got -1"),
     ({"fmt": "int4", "group_size": 256}, "larger than in_features"), ({"fmt": "int8", "group_size": 24}, "multiple of 16.*got 24"),
     ({"fmt": "int8", "group_size": 32, "method": "hqq"}, r"group-wise int8 \(group_size=32\) is quantized by method in \['rtn'\]; got method='hqq'"),
     ({"fmt": "int4", "skip": ["model.norm"]}, "not a linear layer"), ({"fmt": "int4", "include": ["model.embed_tokens"]}, "not a linear layer"),
     ({"fmt": "int4", "skip": ["nothing.here"]}, "matches no linear layer"), ({"fmt": "int4", "kernel": "tinygemm"}, "tinygemm"),
     ({"fmt": "int4", "kernel": "nope"}, "kernel for int4 must be one of"), ({"fmt": "int4", "method": "nope"}, "method must be one of"),
     ({"fmt": "int4", "skip": "lm_head"}, "lists of names"),
     # regression: a non-list (an int, a bool) failed inside the check with "'int' object is not iterable"
     ({"fmt": "int4", "skip": 5}, "skip must be None or a list .*; got 5"),
     ({"fmt": "int4", "include": True}, "include must be None or a list .*; got True"),
     ({"fmt": "int4", "int8_layers": 1}, "int8_layers must be None or a list .*; got 1"),
     ({"fmt": "int4", "hadamard_layers": 0.5}, "hadamard_layers must be None or a list .*; got 0.5"),
     # regression: calibration given to a per-weight method was ignored without a word (qat.prepare refuses it)
     ({"fmt": "int4", "calibration": "some text"}, r"calibration is only used by .*\['awq', 'awq\+gptq', 'gptq'\]; method='rtn'"),
     ({"fmt": "int4", "method": "hqq", "calibration": ["text"]}, "calibration is only used by .*; method='hqq'"),
     # regression: a list as the format failed with "unhashable type: 'list'"; 1 was read as share_embedding=True
     ({"fmt": ["int4"]}, r"format must be one of .*; got \['int4'\]"),
     ({"fmt": "int4", "share_embedding": 1}, "share_embedding must be None, True or False; got 1")],
)  # fmt: skip
def test_bad_input_raises_and_leaves_model_untouched(llama, kwargs, match):
    before = _snapshot(llama)
    with pytest.raises(ValueError, match=match):
        llmspeed.quantize(llama, **kwargs)
    _assert_untouched(llama, before)


@pytest.mark.parametrize(
    "kwargs, arg",
    [({"skip": ["*.down_proj"], "int8_layers": ["*.down_proj"]}, "int8_layers"),
     ({"include": ["*.q_proj"], "int8_layers": ["*.q_proj", "*.down_proj"]}, "int8_layers"),
     ({"skip": ["*.down_proj"], "hadamard_layers": ["*.down_proj"]}, "hadamard_layers"),
     ({"lm_head": None, "hadamard_layers": ["lm_head"]}, "hadamard_layers")],
)  # fmt: skip
def test_int8_and_hadamard_patterns_reaching_only_float_layers_are_refused(llama, kwargs, arg):
    """Regression: a pattern matching only layers skip/include/lm_head left in float was accepted and did nothing
    (no layer at int8, none rotated), as did qat.prepare's hadamard_layers=['lm_head'] (the head stays float)."""
    before = _snapshot(llama)
    with pytest.raises(ValueError, match=f"{arg} pattern .* matches only layers left in float"):
        llmspeed.quantize(llama, "int4", group_size=32, **kwargs)
    _assert_untouched(llama, before)
    with pytest.raises(ValueError, match="hadamard_layers pattern 'lm_head' matches only layers left in float"):
        llmspeed.qat.prepare(llama, "int4", group_size=32, hadamard_layers=["lm_head"])
    _assert_untouched(llama, before)


@pytest.mark.parametrize("verb", ["int4", "int8", "qat"])
def test_a_model_on_the_meta_device_is_refused_before_any_change(verb):
    """Regression: quantize(meta_model, "int4") failed deep in pack_nibbles with a RuntimeError ("Tensor.item()
    cannot be called on meta tensors"), while "int8" and qat.prepare built quantized modules of meta tensors."""
    with torch.device("meta"):
        model = llmspeed.models.tiny("llama", seed=0)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="planned layers .* on the meta device"):
        if verb == "qat":
            llmspeed.qat.prepare(model, "int4", group_size=32)
        else:
            llmspeed.quantize(model, verb)
    _assert_untouched(model, before)
    assert all(type(m) is nn.Linear for m in before.values())


@pytest.mark.parametrize("verb", ["int4", "int8", "qat"])
def test_a_model_with_conv1d_projections_is_refused_instead_of_quantizing_only_its_head(verb):
    """Regression: GPT-2 keeps its projections in transformers' Conv1D layers, not nn.Linear ones, so
    quantize(gpt2, "int4") quantized its output head alone to int8 and returned as if the model were int4 (and
    qat.prepare said skip/include, which it was not given, left no layer)."""
    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0,
                                     eos_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = llmspeed.wrap(transformers.GPT2LMHeadModel(config).eval())
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"keeps 4 projections in transformers Conv1D layers \(e.g. "
                                         r"'transformer.h.0.attn.c_attn'\), which llmspeed does not quantize"):
        if verb == "qat":
            llmspeed.qat.prepare(model, "int4", group_size=32)
        else:
            llmspeed.quantize(model, verb)
    _assert_untouched(model, before)
    llmspeed.quantize(model, "int8", include=["lm_head"])  # asked for by name: quantized as asked
    assert is_quantized(model.hf.lm_head)


def test_named_kernel_that_cannot_handle_a_layer_rolls_back(llama):
    before = _snapshot(llama)
    with pytest.raises(ValueError, match="group_size in"):
        llmspeed.quantize(llama, "int4", group_size=16, kernel="aten_int4_cpu")
    _assert_untouched(llama, before)


def test_quantizing_twice_raises(llama):
    llmspeed.quantize(llama, "int8")
    before = _snapshot(llama)
    with pytest.raises(ValueError, match="already quantized"):
        llmspeed.quantize(llama, "int4")
    assert _snapshot(llama) == before


def test_layers_still_in_float_can_be_quantized_on_their_own(llama):
    """A loaded GGUF or GPTQ model keeps some layers in float (its head, say): include= reaches those alone."""
    llmspeed.quantize(llama, "int4", group_size=16, lm_head=None)
    before = _snapshot(llama)
    with pytest.raises(ValueError, match=r"e\.g\. 'model.layers.0.self_attn.q_proj'\); quantizing a layer twice .* "
                                         r"include=\[\.\.\.\] \(e\.g\. \['lm_head'\]\)"):
        llmspeed.quantize(llama, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        llmspeed.quantize(llama, "int8", include=["lm_head", "*.mlp.up_proj"])
    assert _snapshot(llama) == before
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        float_head = llama.module(ids).logits
    llmspeed.quantize(llama, "int8", include=["lm_head"])
    assert type(llama.module.lm_head).__name__ == "Int8Linear"
    assert type(llama.module.model.layers[0].mlp.up_proj).__name__ == "Int4Linear"  # untouched
    with torch.no_grad():
        assert torch.allclose(llama.module(ids).logits, float_head, atol=0.05 * float_head.abs().max())


def test_failure_midway_restores_every_layer(llama):
    calls = []

    def flaky(weight, config):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return METHODS["rtn"].weight(weight, config)

    register_method("flaky_test", weight=flaky)
    try:
        before = _snapshot(llama)
        with pytest.raises(RuntimeError, match="boom"):
            llmspeed.quantize(llama, "int4", method="flaky_test")
        _assert_untouched(llama, before)
    finally:
        METHODS.pop("flaky_test")


def test_model_level_method_takes_over_the_loop(llama):
    seen = {}

    def whole_model(model, plan, calibration, scale=1.0):
        seen.update(calibration=calibration, scale=scale, names=list(plan))
        out = {}
        for name, config in plan.items():
            lin = model.module.get_submodule(name)
            qw = METHODS["rtn"].weight(lin.weight * scale, config)
            out[name] = Int4Linear.from_codes(
                qw.codes, qw.scales, qw.zeros, config=config, in_features=lin.in_features
            )
            model.replace_linear(name, out[name])  # allowed: quantize re-installs / restores
        return out

    register_method("whole_test", model=whole_model, needs_calibration=True)
    try:
        with pytest.raises(ValueError, match="needs calibration"):
            llmspeed.quantize(llama, "int4", method="whole_test")
        llmspeed.quantize(
            llama, "int4", method="whole_test", calibration="text", method_options={"scale": 1.0}, lm_head=None
        )
        assert seen["calibration"] == "text" and "lm_head" not in seen["names"]
        assert isinstance(llama.hf.model.layers[0].mlp.up_proj, Int4Linear)
        assert llama.hf.model.layers[0].mlp.up_proj.config.method == "whole_test"
    finally:
        METHODS.pop("whole_test")


def test_method_names_are_read_in_any_case_as_the_format_is(llama):
    """Regression: ``method="HQQ"`` was refused while ``"INT4"`` was accepted; the layers record ``"hqq"``."""
    llmspeed.quantize(llama, "INT4", group_size=16, method="HQQ")
    assert {m.config.method for _, m in llama.linear_layers()} == {"hqq"}


def test_plan_lists_layers_without_changing_anything(llama):
    from llmspeed.quant import QuantConfig

    before = _snapshot(llama)
    plan = plan_layers(llama, QuantConfig("int4"))
    assert set(plan) == set(llama.linear_names()) and plan["lm_head"].format == "int8"
    assert set(plan_layers(llama, QuantConfig("int4"), lm_head=None)) == set(llama.linear_names()) - {"lm_head"}
    assert _snapshot(llama) == before


def test_top_level_names_resolve():
    assert llmspeed.quantize is llmspeed.quant.quantize
    assert llmspeed.save is llmspeed.quant.save and llmspeed.load is llmspeed.quant.load
    assert llmspeed.kernels is llmspeed.quant.report.kernels
    assert inspect.ismodule(llmspeed.quant.kernels)  # the report no longer shadows the kernels package


def test_quantized_model_runs_under_bf16_autocast(llama):
    llmspeed.quantize(llama, "int4", group_size=32)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        ref = llama.hf(ids).logits
        with llmspeed.autocast(llama, "bf16"):
            out = llama.hf(ids).logits
    assert torch.isfinite(out).all() and ((out.float() - ref).norm() / ref.norm()) < 0.05


# --- symmetric int4 (rtn and gptq) ------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [32, 64])
def test_symmetric_int4_zero_is_8_and_grid_is_signed(llama, group_size):
    ref = llmspeed.models.tiny("llama", seed=0)
    llmspeed.quantize(llama, "int4", group_size=group_size, symmetric=True)
    q = llama.hf.model.layers[0].mlp.down_proj
    assert q.config.symmetric and "symmetric=True" in repr(q)
    assert torch.equal(q.zeros, torch.full_like(q.zeros, 8.0))
    w = ref.hf.model.layers[0].mlp.down_proj.weight.detach()  # [out, in]
    g = w.reshape(w.shape[0], -1, group_size)  # [out, groups, group]
    exact = torch.maximum(-g.amin(-1) / 8, g.amax(-1) / 7)  # the finest step whose [-8, 7] grid holds the group
    s = q.scales.float()  # stored in fp16: rounded up to the next fp16 value
    assert bool((s >= exact).all()) and torch.allclose(s, exact, rtol=2.0**-10, atol=0)
    err = (q.dequantize() - w).abs().reshape(w.shape[0], -1, group_size)  # within half a step: nothing clamps
    assert bool((err <= s[..., None] * 0.5 + 1e-6).all())
    # the weight that sets the step (the largest, or the most negative when it needs 8 steps) lands on a code
    top = torch.where(g.amax(-1) / 7 >= -g.amin(-1) / 8, g.argmax(-1), g.argmin(-1))  # [out, groups]
    assert bool((err.gather(-1, top[..., None])[..., 0] <= s * 8 * 2.0**-10).all())  # up to 8 codes of fp16 rounding


def test_symmetric_option_is_validated(llama):
    with pytest.raises(ValueError, match="symmetric=False is not available for int8"):
        llmspeed.quantize(llama, "int8", symmetric=False)
    listed = re.escape(str(symmetric_methods()))  # from the registry: ['awq', 'awq+gptq', 'gptq', 'rtn']
    with pytest.raises(ValueError, match=rf"symmetric=True is available with method in {listed}; got method='hqq'"):
        llmspeed.quantize(llama, "int4", method="hqq", symmetric=True)
    with pytest.raises(ValueError, match="symmetric must be a bool"):
        llmspeed.quantize(llama, "int4", symmetric="yes")
    assert not any(is_quantized(m) for _, m in llama.linear_layers())


def test_symmetric_gptq_keeps_zero_at_8_and_beats_symmetric_rtn():
    tokens = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(1))
    ref = llmspeed.models.tiny("llama", seed=1)
    with torch.no_grad():
        want = ref.hf(input_ids=tokens).logits
    errors = {}
    for method in ("rtn", "gptq"):
        model = llmspeed.models.tiny("llama", seed=1)
        opts = {"n_sequences": 16, "seq_len": 32, "progress": False} if method == "gptq" else None
        llmspeed.quantize(model, "int4", 32, method=method, calibration=tokens if opts else None,
                          method_options=opts, symmetric=True)  # fmt: skip
        q = model.hf.model.layers[1].mlp.down_proj
        assert q.config.symmetric and torch.equal(q.zeros, torch.full_like(q.zeros, 8.0))
        with torch.no_grad():
            errors[method] = (model.hf(input_ids=tokens).logits - want).norm().item()
    assert errors["gptq"] < errors["rtn"], errors


def test_old_native_configs_without_the_new_keys_still_read():
    from llmspeed.quant import QuantConfig

    old = {"format": "int4", "group_size": 64, "double_quant": False, "method": "rtn", "kernel": "auto"}
    cfg = QuantConfig.from_dict(old)
    assert cfg.symmetric is False and cfg.act_order is False
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert QuantConfig("int8").symmetric is True


@pytest.mark.parametrize("method", ["hqq", "gptq"])
def test_method_options_with_keys_of_mixed_types_are_named(llama, method):
    """Unknown keys were sorted for the message: 1 and 'a' do not compare, so a TypeError from sorted() came out."""
    calibration = torch.zeros(2, 8, dtype=torch.long) if method == "gptq" else None
    with pytest.raises(ValueError, match=r"method_options \['a', 1\] are not options of method="):
        llmspeed.quantize(llama, "int4", 32, method=method, calibration=calibration,
                          method_options={1: 2, "a": 3})  # fmt: skip
    assert not is_quantized(llama.hf.model.layers[0].mlp.down_proj)


@pytest.mark.parametrize("options", ["damp=0.1", [("damp", 0.1)], 0.1])
def test_method_options_that_are_not_a_dict_name_the_argument(llama, options):
    """A string or a list of pairs was read by dict(): a ValueError from dict's internals, or silently accepted."""
    before = {n: t.clone() for n, t in llama.hf.state_dict().items()}
    with pytest.raises(ValueError, match=r"method_options must be None or a dict of method='gptq''s options; got"):
        llmspeed.quantize(llama, "int4", 32, method="gptq", calibration=torch.zeros(2, 8, dtype=torch.long),
                          method_options=options)  # fmt: skip
    after = llama.hf.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], t) for n, t in before.items())
    assert not is_quantized(llama.hf.model.layers[0].mlp.down_proj)
