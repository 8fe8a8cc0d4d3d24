"""QAT's verbs: prepare then convert gives exactly what quantize gives (any init, rotation, dtype); the converted
model saves, loads, generates and takes adapters.

Arguments refused before anything changes are in test_api_errors.py, training a prepared model in
test_api_training.py; the shared helpers (``IDS``, ``TOKENS``, ``_packed``, ...) in conftest.py, importable from here.
"""

from __future__ import annotations

import copy

import pytest
import torch

import llmspeed
from llmspeed import lora, qat
from llmspeed.precision import cpu_matmul
from llmspeed.protocol import is_quantized
from llmspeed.qat import FakeQuantLinear
from llmspeed.quant import Int4Linear, Int8Linear
from tests.qat.conftest import GPTQ, IDS, TOKENS, _assert_same_packed, _calibration, _packed  # noqa: F401  (importable from here as before)


@pytest.mark.parametrize("fmt, group", [("int4", 16), ("int4", 48), ("int8", None)])
@pytest.mark.parametrize("architecture", ["llama", "qwen2"])  # qwen2: biased q/k/v projections, packed too
def test_convert_right_after_prepare_is_bit_identical_to_quantize(architecture, fmt, group):
    llama = llmspeed.models.tiny(architecture, seed=0)
    reference = copy.deepcopy(llama)
    llmspeed.quantize(reference, fmt, group_size=group, lm_head=None)  # QAT leaves the head in float
    qat.prepare(llama, fmt, group_size=group)
    assert all(isinstance(m, FakeQuantLinear) for n, m in llama.linear_layers() if "lm_head" not in n)
    qat.convert(llama)
    _assert_same_packed(llama, reference)
    cls = Int4Linear if fmt == "int4" else Int8Linear
    assert {type(m) for n, m in llama.linear_layers() if "lm_head" not in n} == {cls}


def test_init_names_are_read_in_any_case_as_the_format_and_quantize_method_are(llama):
    """Regression: ``init="RTN"`` was refused while ``fmt="INT4"`` was accepted; both now read in any case, as
    ``quantize``'s ``method`` does, and the converted modules record the lower-case name (exports compare it)."""
    reference = copy.deepcopy(llama)
    llmspeed.quantize(reference, "int4", group_size=16, method="RTN", lm_head=None)
    qat.prepare(llama, "INT4", group_size=16, init="RTN")
    qat.convert(llama)
    _assert_same_packed(llama, reference)
    assert {m.config.method for n, m in llama.linear_layers() if "lm_head" not in n} == {"rtn"}


@pytest.mark.parametrize("group", [16, None])
def test_symmetric_prepare_converts_to_exactly_quantize_symmetric(llama, group):
    """Regression: the symmetric int4 start used ``scale = absmax / 7`` where ``quantize(symmetric=True)``
    uses ``absmax / 7.5``, so converting right after prepare packed other codes and scales than quantize."""
    reference = copy.deepcopy(llama)
    llmspeed.quantize(reference, "int4", group_size=group, symmetric=True, lm_head=None)
    qat.prepare(llama, "int4", group_size=group, symmetric=True)
    qat.convert(llama)
    _assert_same_packed(llama, reference)


def test_gptq_start_converts_to_exactly_quantize_gptq(llama):
    reference = copy.deepcopy(llama)
    llmspeed.quantize(reference, "int4", 16, method="gptq", calibration=_calibration(), method_options=GPTQ, lm_head=None)
    original = {n: m.weight.detach().clone() for n, m in llama.linear_layers()}
    qat.prepare(llama, "int4", 16, init="gptq", calibration=_calibration(), init_options=GPTQ)
    layer = dict(llama.linear_layers())["model.layers.0.mlp.up_proj"]
    assert not torch.equal(layer.weight, original["model.layers.0.mlp.up_proj"])  # starts on GPTQ's grid
    qat.convert(llama)
    _assert_same_packed(llama, reference)


def test_a_symmetric_gptq_start_converts_to_exactly_quantize_gptq_symmetric(llama):
    """``init="gptq"`` with ``symmetric=True`` was refused ("fits asymmetric int4 grids") after GPTQ itself had
    learned the symmetric grid; it now starts on it, and converting right away gives quantize's tensors."""
    reference = copy.deepcopy(llama)
    llmspeed.quantize(reference, "int4", 16, method="gptq", symmetric=True, calibration=_calibration(),
                      method_options=GPTQ, lm_head=None)  # fmt: skip
    qat.prepare(llama, "int4", 16, init="gptq", symmetric=True, calibration=_calibration(), init_options=GPTQ)
    qat.convert(llama)
    _assert_same_packed(llama, reference)
    assert all(m.config.symmetric for _, m in llama.linear_layers() if hasattr(m, "config"))


@pytest.mark.parametrize("init", ["rtn", "gptq"])
def test_rotated_layers_convert_to_exactly_quantize_with_hadamard_layers(llama, init):
    """``hadamard_layers``: the latent weight is in the rotated basis, forward rotates the input, and convert right
    after prepare packs exactly what ``quantize(..., hadamard_layers=...)`` does (RTN, and GPTQ fitted rotated)."""
    rotated = ["*.mlp.down_proj"]
    options = dict(method="gptq", calibration=_calibration(), method_options=GPTQ) if init == "gptq" else {}
    reference = copy.deepcopy(llama)
    llmspeed.quantize(reference, "int4", 16, lm_head=None, hadamard_layers=rotated, **options)
    with torch.no_grad():
        float_logits = llama.hf(IDS).logits
    start = dict(calibration=_calibration(), init_options=GPTQ) if init == "gptq" else {}
    qat.prepare(llama, "int4", 16, init=init, hadamard_layers=rotated, **start)
    layers = dict(qat.fake_quant_layers(llama))
    down, up = layers["model.layers.0.mlp.down_proj"], layers["model.layers.0.mlp.up_proj"]
    assert down.config.hadamard and not up.config.hadamard and "hadamard=True" in repr(down)
    with torch.no_grad():
        fake_logits = llama.hf(IDS).logits
        ref_logits = reference.hf(IDS).logits
    torch.testing.assert_close(fake_logits, ref_logits, rtol=1e-4, atol=1e-4)  # the fake model is the packed one
    assert (fake_logits - float_logits).abs().max() > 1e-3  # and it is quantized
    qat.convert(llama)
    _assert_same_packed(llama, reference)
    converted = dict(llama.linear_layers())["model.layers.0.mlp.down_proj"]
    assert isinstance(converted, Int4Linear) and converted.config.hadamard


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_rotated_layers_of_a_16_bit_model_convert_to_exactly_quantize(dtype):
    """Regression: prepare rotated the weight in fp32, chose the grid from those values, then stored the latent
    weight rounded to the model's dtype, while quantize rotates in the model's dtype: converting at once packed
    other scales and 0.6% (bf16) to 0.8% (fp16) other codes in every rotated layer."""
    model = llmspeed.models.tiny("llama", seed=0, dtype=dtype)
    reference = copy.deepcopy(model)
    llmspeed.quantize(reference, "int4", 16, lm_head=None, hadamard_layers=["*.mlp.down_proj"])
    qat.convert(qat.prepare(model, "int4", 16, hadamard_layers=["*.mlp.down_proj"]))
    _assert_same_packed(model, reference)


def test_rotated_layers_train_and_the_fake_forward_equals_the_converted_model(llama):
    qat.prepare(llama, "int4", 16, learn_scales=True, hadamard_layers=["*.mlp.down_proj"])
    result = llmspeed.finetune(llama, TOKENS, steps=5, lr=1e-2, seq_len=16, batch_size=4, progress=False)
    assert result.losses[-1] < result.losses[0]
    with torch.no_grad():
        before = llama.hf(IDS).logits
    qat.convert(llama)
    with torch.no_grad():
        torch.testing.assert_close(llama.hf(IDS).logits, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("learn_scales", [False, True])
def test_a_gptq_start_learns_only_through_its_scales_at_a_small_lr(llama, learn_scales):
    # regression (docs/qat.md): on GPTQ's on-grid start a small lr flips no code, so with a fixed grid
    # the quantized model does not change at all; learned scales and zeros move it from the first step
    qat.prepare(llama, "int4", 16, init="gptq", calibration=_calibration(), init_options=GPTQ, learn_scales=learn_scales)
    before = {n: layer.quantized_weight().detach().clone() for n, layer in qat.fake_quant_layers(llama)}
    result = llmspeed.finetune(llama, TOKENS, steps=6, lr=1e-4, seq_len=16, batch_size=4, progress=False)
    after = {n: layer.quantized_weight().detach() for n, layer in qat.fake_quant_layers(llama)}
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    if learn_scales:
        assert len(changed) == len(before) and result.losses[-1] < result.losses[0]
    else:
        assert changed == []


def test_trained_fake_quant_forward_equals_the_converted_model(llama):
    qat.prepare(llama, "int4", 16, learn_scales=True)
    scales_before = dict(llama.linear_layers())["model.layers.0.self_attn.q_proj"].effective_scales().detach().clone()
    llmspeed.finetune(llama, TOKENS, steps=5, lr=1e-2, seq_len=16, batch_size=4, progress=False)
    layers = dict(qat.fake_quant_layers(llama))
    assert not torch.equal(layers["model.layers.0.self_attn.q_proj"].effective_scales(), scales_before)  # learned
    fake = {n: layer.quantized_weight().detach() for n, layer in layers.items()}
    with torch.no_grad():
        before = llama.hf(IDS).logits
    qat.convert(llama)
    for name, module in llama.linear_layers():
        if name in fake:
            assert torch.equal(module.dequantize(), fake[name]), name
    with torch.no_grad():
        torch.testing.assert_close(llama.hf(IDS).logits, before, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # the first generate_batched may build the fused C++ decode step (minutes, cached)
def test_converted_model_saves_loads_generates_and_takes_adapters(llama, tmp_path):
    qat.prepare(llama, "int4", 16)
    llmspeed.finetune(llama, TOKENS, steps=3, lr=1e-2, seq_len=16, batch_size=4, progress=False)
    qat.convert(llama)
    llmspeed.save(llama, tmp_path)
    loaded = llmspeed.load(tmp_path)
    _assert_same_packed(llama, loaded)
    params = llmspeed.SamplingParams(max_new_tokens=5, ignore_eos=True)
    a = llama.generate_batched([[1, 2, 3]], params, progress=False)[0].token_ids
    b = loaded.generate_batched([[1, 2, 3]], params, progress=False)[0].token_ids
    assert a == b and len(a) == 5
    lora.add_adapter(loaded, "a", r=4, alpha=8)
    result = llmspeed.finetune(loaded, TOKENS, steps=3, lr=1e-2, seq_len=16, batch_size=4, progress=False)
    assert result.trained == "adapter" and result.adapter == "a"


@pytest.mark.parametrize("fmt", ["llmspeed", "compressed-tensors"])
def test_symmetric_int4_converts_to_modules_labelled_symmetric_that_save_and_load(llama, tmp_path, fmt):
    """Regression: ``prepare(symmetric=True)`` then ``convert`` gave Int4Linear modules whose config said
    ``symmetric=False`` though every zero point is 8, so files and exports described them as asymmetric."""
    qat.prepare(llama, "int4", 16, symmetric=True)
    llmspeed.finetune(llama, TOKENS, steps=2, lr=1e-2, seq_len=16, batch_size=4, progress=False)
    qat.convert(llama)
    layers = [m for _, m in llama.linear_layers() if is_quantized(m)]
    assert layers and all(m.config.symmetric and bool((m.zeros == 8).all()) for m in layers)
    with torch.no_grad():
        before = llama.hf(IDS).logits
    llmspeed.save(llama, tmp_path, format=fmt)
    loaded = llmspeed.load(tmp_path)
    assert all(m.config.symmetric for _, m in loaded.linear_layers() if is_quantized(m))
    with torch.no_grad():
        torch.testing.assert_close(loaded.hf(IDS).logits, before, rtol=1e-5, atol=1e-5)


def test_adapter_added_after_prepare_keeps_wrapping_the_converted_base(llama):
    qat.prepare(llama, "int4", 16)
    lora.add_adapter(llama, "a", r=4, alpha=8)
    qat.convert(llama)
    wrapped = dict(llama.linear_layers())["model.layers.0.self_attn.q_proj"]
    assert isinstance(wrapped, lora.LoraLinear) and isinstance(wrapped.base_layer, Int4Linear)
    assert not qat.is_prepared(llama)


def test_the_whole_recipe_takes_a_transformers_model(llama):
    """Regression: prepare wrapped a transformers model, but finetune, lora.finetune, is_prepared and
    convert raised AttributeError ('LlamaForCausalLM' object has no attribute 'linear_layers')."""
    hf = llama.hf
    qat.prepare(hf, "int4", 16)
    assert qat.is_prepared(hf)
    result = llmspeed.finetune(hf, TOKENS, steps=2, lr=1e-2, seq_len=16, batch_size=2, progress=False)
    assert result.trained == "full" and len(result.losses) == 2
    qat.convert(hf)
    assert isinstance(hf.model.layers[0].self_attn.q_proj, Int4Linear) and not qat.is_prepared(hf)
    lora.add_adapter(hf, "a", r=4, alpha=8)
    assert lora.finetune(hf, TOKENS, steps=2, seq_len=16, batch_size=2, progress=False).adapter == "a"


def test_merging_an_adapter_into_a_prepared_layer_is_refused_until_convert(llama):
    """Regression: merge added the update to the latent weight, changing the fake-quantized output while
    reporting 0 error, and after convert unmerge raised TypeError on the packed base."""
    qat.prepare(llama, "int4", 16)
    lora.add_adapter(llama, "a", r=4, alpha=8)
    llmspeed.finetune(llama, TOKENS, steps=2, lr=1e-2, seq_len=16, batch_size=2, progress=False)
    state = {k: v.clone() for k, v in llama.hf.state_dict().items()}
    with pytest.raises(ValueError, match=r"adapter 'a' wraps 14 layers prepared for .*; call llmspeed.qat.convert"):
        lora.merge(llama, "a")
    assert all(torch.equal(v, state[k]) for k, v in llama.hf.state_dict().items())
    assert all(layer.merged == () for _, layer in lora.lora_layers(llama))
    qat.convert(llama)
    with pytest.warns(UserWarning, match="re-quantized 14 layers"):
        lora.merge(llama, "a")
    lora.unmerge(llama, "a")


@pytest.mark.parametrize("fmt, group", [("int4", 16), ("int8", None)])
def test_a_16_bit_prepared_model_runs_the_fp32_activations_of_cpu_inference(monkeypatch, fmt, group):
    """Regression: on a CPU without fast 16-bit GEMM (a crossover), a cast model computes inference in fp32 over its
    16-bit weights; prepared after the cast (the documented order), every no-grad forward (eval_windows, perplexity,
    generation) raised "expected m1 and m2 to have the same dtype" in FakeQuantLinear."""
    monkeypatch.setattr(cpu_matmul, "_CROSSOVER", {torch.bfloat16: 4})  # as on the AVX2 CPUs of docs/precision.md
    model = llmspeed.cast(llmspeed.models.tiny("qwen2", seed=0), "bf16")  # qwen2: biased q/k/v projections
    qat.prepare(model, fmt, group_size=group)
    with torch.no_grad():
        fake = model.hf(IDS).logits
    qat.convert(model)
    with torch.no_grad():
        converted = model.hf(IDS).logits
    assert fake.dtype == converted.dtype == torch.float32
    torch.testing.assert_close(fake, converted, rtol=2e-2, atol=2e-2)


def test_learned_zero_points_refused_by_compressed_tensors_say_how_to_prepare(llama, tmp_path):
    """Regression: the refusal said the layer had fractional zero points of "method 'rtn', e.g. HQQ" and advised to
    "quantize with method='rtn'", the very method the converted layers name: QAT's learned zero points were the cause."""
    qat.prepare(llama, "int4", 16, learn_scales=True)
    llmspeed.finetune(llama, TOKENS, steps=3, lr=3e-2, seq_len=16, batch_size=2, progress=False)
    qat.convert(llama)
    with pytest.raises(ValueError, match=r"fractional zero points \(learned by llmspeed.qat.prepare\(\.\.\., "
                                         r"learn_scales=True\) from a 'rtn' start, or read from a GGUF file's Q4_1 or Q4_K "
                                         r"blocks\).*learn_scales=False or symmetric=True"):
        llmspeed.save(llama, tmp_path, format="compressed-tensors")
    assert not any(tmp_path.iterdir())
