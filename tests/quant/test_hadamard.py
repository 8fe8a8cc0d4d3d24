"""``hadamard_layers``: int4 layers quantized in a Hadamard-rotated basis; the same function, restored on failure."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import llmspeed
from llmspeed.protocol import base_linear
from llmspeed.quant import SENSITIVE, Int4Linear, QuantConfig
from llmspeed.quant.hadamard import hadamard, rotate, rotated_inputs
from llmspeed.quant.methods.rtn import rtn_weight
from tests.quant.test_int8_layers import _logits, _tokens  # the same tiny-model tokens and logits

OPTS = dict(seq_len=32, n_sequences=16, progress=False)
DOWN = list(SENSITIVE)


def _quantized(method: str, hadamard_layers=DOWN, group: int = 32):
    model = llmspeed.models.tiny("llama", seed=0)
    calibrated = method == "gptq"
    llmspeed.quantize(
        model,
        "int4",
        group,
        method=method,
        calibration=_tokens() if calibrated else None,
        method_options=OPTS if calibrated else None,
        hadamard_layers=hadamard_layers,
    )
    return model


@pytest.mark.parametrize("n", [1, 2, 16, 64, 128])
def test_hadamard_is_symmetric_and_orthonormal(n):
    h = hadamard(n, torch.float64)
    assert torch.equal(h, h.T)
    torch.testing.assert_close(h @ h, torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(h.abs(), torch.full((n, n), n**-0.5, dtype=torch.float64))


@pytest.mark.parametrize("n", [0, 3, 48, True, 2.0])
def test_hadamard_size_must_be_a_power_of_two(n):
    with pytest.raises(ValueError, match="n must be a power of two"):
        hadamard(n)


@pytest.mark.parametrize("group", [0, -2, 3, 6, True, 2.0])
def test_rotate_refuses_a_group_that_is_not_a_power_of_two_by_name(group):
    with pytest.raises(ValueError, match=f"group must be a power of two.*group={group!r}"):
        rotate(torch.ones(2, 6), group)


@settings(max_examples=30, deadline=None)
@given(groups=st.integers(1, 6), log_group=st.integers(1, 6), out=st.integers(1, 9), rows=st.integers(1, 5),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_rotating_input_and_weight_keeps_the_product(groups, log_group, out, rows, seed):
    g = 2**log_group
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, groups * g, generator=gen, dtype=torch.float64)  # [r, in]
    w = torch.randn(out, groups * g, generator=gen, dtype=torch.float64)  # [out, in]
    torch.testing.assert_close(rotate(x, g) @ rotate(w, g).T, x @ w.T)
    torch.testing.assert_close(rotate(rotate(x, g), g), x)  # its own inverse


def test_module_packs_the_rotated_weight_and_its_forward_is_the_layers_function():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 24, bias=True)
    config = QuantConfig("int4", 32, hadamard=True)
    module = Int4Linear.from_linear(linear, config)
    # the codes are round-to-nearest of the rotated weight, bit for bit
    qw = rtn_weight(rotate(linear.weight.detach(), 32), config)
    plain = Int4Linear.from_codes(qw.codes, qw.scales, qw.zeros, config=QuantConfig("int4", 32), in_features=128)
    assert torch.equal(module.qweight, plain.qweight) and torch.equal(module.scales, plain.scales)
    assert torch.equal(module.packed_dequantize(), plain.dequantize())
    torch.testing.assert_close(module.dequantize(), rotate(plain.dequantize(), 32))
    x = torch.randn(5, 128)
    torch.testing.assert_close(module(x), F.linear(x, module.dequantize(), linear.bias), rtol=1e-4, atol=1e-4)
    # and the rotation is what made the function right: the stored weight read unrotated is another function
    assert not torch.allclose(module(x), F.linear(x, module.packed_dequantize(), linear.bias), atol=1e-2)


@pytest.mark.parametrize("method", ["rtn", "hqq", "gptq"])
def test_quantize_rotates_only_the_named_layers_and_keeps_the_function(method, tmp_path):
    x = _tokens(2, 32, seed=5)  # held out
    ref = _logits(llmspeed.models.tiny("llama", seed=0), x)
    model, plain = _quantized(method), _quantized(method, None)
    for name, module in model.linear_layers():
        if name != "lm_head":
            assert module.config.hadamard == name.endswith("down_proj"), name
    err = {k: float((_logits(m, x) - ref).norm() / ref.norm()) for k, m in (("rotated", model), ("plain", plain))}
    # the same function up to 4-bit rounding: a layer read in the wrong basis would be an error of order 1
    assert err["rotated"] < 0.15 and err["rotated"] < 2 * err["plain"], err
    llmspeed.save(model, tmp_path / "q")
    loaded = llmspeed.load(tmp_path / "q")
    assert dict(loaded.linear_layers())["model.layers.0.mlp.down_proj"].config.hadamard
    assert not dict(loaded.linear_layers())["model.layers.0.mlp.up_proj"].config.hadamard
    torch.testing.assert_close(_logits(loaded, x), _logits(model, x))


def test_the_config_file_carries_hadamard_only_when_set():
    assert "hadamard" not in QuantConfig("int4", 64).to_dict()
    config = QuantConfig("int4", 64, hadamard=True)
    assert QuantConfig.from_dict(config.to_dict()) == config


def _greedy(model, prompt, steps):
    ids = torch.tensor([prompt])
    for _ in range(steps):  # greedy with the model's own forward
        ids = torch.cat([ids, _logits(model, ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize(
    "layers,fused",
    [
        (DOWN, "on"),
        (["*.q_proj", "*.k_proj", "*.v_proj"], "on"),
        (["*_proj"], "on"),  # every projection: q/k/v, o, gate/up and down rotate their inputs in the step
        (["*.q_proj"], "q_proj/k_proj/v_proj read one input but rotate it differently (q_proj by 32, k_proj unrotated"),
        (["*.up_proj"], "gate_proj/up_proj read one input but rotate it differently"),
    ],
)
def test_the_generator_gives_the_models_tokens_fused_where_a_layers_inputs_rotate_alike(layers, fused):
    """Each rotated projection's input buffer is rotated in place by the fused step (q/k/v and gate/up share one,
    so they must rotate alike, else the generic path runs and the status says why); the tokens are the model's."""
    model = _quantized("rtn", layers)
    gen = llmspeed.Generator(model, progress=False)
    if llmspeed.generation.fused_decode.extension() is not None:  # else the generic path, and the status says why
        assert fused in gen.fused_decode_status, gen.fused_decode_status
    prompts = [[5, 17, 42, 7], [3, 9]]
    outs = gen.generate_batched(prompts, llmspeed.SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert [list(o.token_ids) for o in outs] == [_greedy(model, p, 6) for p in prompts]


@pytest.mark.parametrize("group", [16, 32, 64])
def test_the_fused_steps_rotation_gives_the_generic_paths_logits(group):
    """The fused step's butterflies (in registers for the distances below 8 where the CPU has AVX2, then across
    registers) against the generic path's matmul by ``hadamard(group)``, every projection rotated: the same logits
    to fp32 rounding, at every group size the 4-bit fused step takes (the tiny model's inputs are 64 and 128 wide)."""
    from llmspeed.generation import fused_decode
    from llmspeed.generation.runner import StepInput
    from tests.generation.test_fused_decode import LOGIT_TOLERANCE, _generic_logits, _prefilled

    if fused_decode.extension() is None:
        pytest.skip(f"the fused decode step is unavailable here: {fused_decode.unavailable()}")
    model = _quantized("rtn", ["*_proj"], group)
    gen, decode = _prefilled(model, [1, 5, 9, 17, 3])
    got = fused_decode.FusedDecode(model, gen.cache, max_rows=1 << 30).run(StepInput.decode(decode, gen.blocks.block_size))
    ref = _generic_logits(model, gen, decode)
    assert got is not None
    assert (got - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32]


@pytest.mark.parametrize("lora_dtype, rotated", [("float32", DOWN), ("float16", DOWN), ("float16", ["*_proj"])])
def test_adapters_over_rotated_projections_run_fused_with_the_models_tokens(lora_dtype, rotated):
    model = _quantized("rtn", rotated)
    torch.manual_seed(0)
    targets = ["down_proj", "up_proj"] if rotated == DOWN else ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
    llmspeed.lora.add_adapter(model, "a", r=4, targets=targets, init="random")
    for _, layer in llmspeed.lora.lora_layers(model):  # an adapter large enough to change the tokens
        torch.nn.init.normal_(layer.weight_b("a"), std=0.3)
    gen = llmspeed.Generator(model, progress=False, lora_dtype=lora_dtype)
    if llmspeed.generation.fused_decode.extension() is not None:
        assert gen.fused_decode_status == "on", gen.fused_decode_status
    prompt = [9, 3, 77]
    out = gen.generate_batched([prompt], llmspeed.SamplingParams(max_new_tokens=5, ignore_eos=True, adapter="a"))[0]
    assert list(out.token_ids) == _greedy(model, prompt, 5)
    with llmspeed.lora.disabled(model):
        assert _greedy(model, prompt, 5) != list(out.token_ids)  # the adapter mattered


@pytest.mark.filterwarnings("ignore:merging adapter")
def test_a_merged_adapter_stays_in_the_rotated_basis():
    x = _tokens(2, 16, seed=3)
    err = {}
    for kind, layers in (("rotated", DOWN), ("plain", None)):
        model = _quantized("rtn", layers)
        torch.manual_seed(0)
        llmspeed.lora.add_adapter(model, "a", r=4, targets=["down_proj"], init="random")
        before = _logits(model, x)
        llmspeed.lora.merge(model, "a")
        down = base_linear(dict(model.linear_layers())["model.layers.0.mlp.down_proj"])
        assert isinstance(down, Int4Linear) and down.config.hadamard == (layers is not None)
        err[kind] = float((_logits(model, x) - before).norm() / before.norm())
    # re-quantizing costs about what it costs without the rotation; in the wrong basis it would be of order 1
    assert err["rotated"] < 0.15 and err["rotated"] < 2 * err["plain"], err


def test_the_float_layers_are_restored_when_the_rotated_pass_fails():
    linears = [torch.nn.Linear(64, 8), torch.nn.Linear(64, 8)]
    weights = [lin.weight.detach().clone() for lin in linears]
    x = torch.randn(3, 64)
    expected = [lin(x) for lin in linears]
    with pytest.raises(RuntimeError, match="midway"):
        with rotated_inputs(linears, 32):
            torch.testing.assert_close(linears[0](x), expected[0], rtol=1e-5, atol=1e-5)  # same function inside
            raise RuntimeError("midway")
    for lin, w, y in zip(linears, weights, expected):
        assert torch.equal(lin.weight, w) and not lin._forward_pre_hooks
        assert torch.equal(lin(x), y)


def test_gptq_failing_midway_leaves_the_float_model_as_it_was(monkeypatch):
    import llmspeed.quant.methods.gptq as gptq

    model = llmspeed.models.tiny("llama", seed=0)
    layers = dict(model.linear_layers())
    weights = {n: m.weight.detach().clone() for n, m in layers.items()}
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    real = gptq.gptq_quantize
    monkeypatch.setattr(gptq, "gptq_quantize", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        llmspeed.quantize(model, "int4", 32, method="gptq", calibration=_tokens(), method_options=OPTS,
                          hadamard_layers=DOWN)  # fmt: skip
    for name, module in model.linear_layers():
        assert module is layers[name], name
        assert torch.equal(module.weight, weights[name]) and not module._forward_pre_hooks, name


@pytest.mark.parametrize(
    "fmt,group,method,kwargs,match",
    [
        ("nf4", 32, "rtn", {}, "hadamard_layers rotates int4 layers"),
        ("int4", 32, "rtn", {"int8_layers": DOWN}, "would be int8"),
        ("int4", 32, "awq", {}, "hadamard_layers needs a method that quantizes rotated layers"),
        ("int4", 32, "awq+gptq", {}, r"\['gptq', 'hqq', 'rtn'\]"),
        ("int4", 48, "rtn", {}, "power-of-two group_size that divides in_features"),
        ("int4", 256, "rtn", {}, "group_size=256 is larger than in_features"),
    ],
)
def test_bad_hadamard_layers_raise_before_anything_changes(fmt, group, method, kwargs, match):
    model = llmspeed.models.tiny("llama", seed=0)
    layers = dict(model.linear_layers())
    weights = {n: m.weight.detach().clone() for n, m in layers.items()}
    calibrated = method != "rtn"
    with pytest.raises(ValueError, match=match):
        llmspeed.quantize(model, fmt, group, method=method, calibration=_tokens() if calibrated else None,
                          method_options=OPTS if calibrated else None, hadamard_layers=DOWN, **kwargs)  # fmt: skip
    assert all(m is layers[n] and torch.equal(m.weight, weights[n]) for n, m in model.linear_layers())


@pytest.mark.parametrize("value,match", [("*.mlp.down_proj", "not a single string"),
                                         (["*.nothing"], "hadamard_layers pattern")])  # fmt: skip
def test_bad_hadamard_patterns_are_named(value, match):
    model = llmspeed.models.tiny("llama", seed=0)
    with pytest.raises(ValueError, match=match):
        llmspeed.quantize(model, "int4", 32, hadamard_layers=value)
    assert not any(isinstance(m, Int4Linear) for _, m in model.linear_layers())


@pytest.mark.parametrize("kwargs", [dict(format="nf4", group_size=32), dict(format="int4", group_size=None),
                                    dict(format="int4", group_size=24), dict(format="int4", act_order=True),
                                    dict(format="int4", hadamard=1)])  # fmt: skip
def test_config_refuses_hadamard_where_it_cannot_apply(kwargs):
    kwargs.setdefault("hadamard", True)
    with pytest.raises(ValueError, match="hadamard"):
        QuantConfig(**kwargs)


def test_a_rotated_output_head_shared_with_the_embedding_reads_unrotated_rows():
    """The tied input embedding looks rows up through ``dequantize(rows)``, which undoes the rotation; the fused
    step, which reads packed rows, leaves such a head to the generic path."""
    x = _tokens(2, 16, seed=7)
    ref = _logits(llmspeed.models.tiny("llama", seed=0, tie_word_embeddings=True), x)
    err = {}
    for kind, layers in (("plain", None), ("rotated", ["lm_head"])):
        model = llmspeed.models.tiny("llama", seed=0, tie_word_embeddings=True)
        llmspeed.quantize(model, "int4", 32, lm_head="int4", hadamard_layers=layers)
        err[kind] = float((_logits(model, x) - ref).norm() / ref.norm())
    head = dict(model.linear_layers())["lm_head"]
    assert head.config.hadamard and type(model.module.get_input_embeddings()).__name__ == "QuantizedEmbedding"
    # 4-bit rounding of every layer and the embedding; rows read in the wrong basis would be an error of order 1
    assert err["rotated"] < 2 * err["plain"], err
    gen = llmspeed.Generator(model, progress=False)
    if llmspeed.generation.fused_decode.extension() is not None:
        assert "lm_head" in gen.fused_decode_status and "hadamard" in gen.fused_decode_status
    prompt = [4, 8, 15, 16]
    out = gen.generate_batched([prompt], llmspeed.SamplingParams(max_new_tokens=5, ignore_eos=True))[0]
    assert list(out.token_ids) == _greedy(model, prompt, 5)


def test_rotating_a_tied_head_leaves_the_embedding_it_shares_unrotated():
    """Regression: the rotated weight was written into the shared parameter's data, so inside the block the tied
    input embedding looked up rotated rows."""
    emb = torch.nn.Embedding(10, 64)
    head = torch.nn.Linear(64, 10, bias=False)
    head.weight = emb.weight
    rows = emb.weight.detach().clone()
    ids, x = torch.tensor([1, 7]), torch.randn(3, 64)
    expected = head(x)
    with rotated_inputs([head], 32):
        assert torch.equal(emb(ids), rows[ids])  # the embedding reads the layer's own rows
        torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-5)
    assert head.weight is emb.weight and torch.equal(emb.weight, rows)  # the tie is back


def test_gptq_with_a_rotated_tied_head_calibrates_the_body_on_unrotated_embeddings():
    """Regression: while GPTQ calibrated, the tied embedding of a head in hadamard_layers returned rotated rows, so
    every decoder layer was fitted to another model's activations (all 14 packed differently from the plain run)."""
    packed = []
    for layers in (None, ["lm_head"]):
        model = llmspeed.models.tiny("llama", seed=0, tie_word_embeddings=True)
        llmspeed.quantize(model, "int4", 32, method="gptq", calibration=_tokens(), method_options=OPTS,
                          lm_head="int4", hadamard_layers=layers)  # fmt: skip
        packed.append({n: m.qweight for n, m in model.linear_layers()})
    # the head lies outside the decoder stack (rounded to nearest): rotating it changes nothing else
    assert [n for n in packed[0] if n != "lm_head" and not torch.equal(packed[0][n], packed[1][n])] == []
    assert not torch.equal(packed[0]["lm_head"], packed[1]["lm_head"])


@pytest.mark.parametrize("in_features, group", [(96, 48), (100, 32), (64, None), (64, 0)])
def test_check_rotatable_names_the_layer_for_a_group_it_cannot_rotate(in_features, group):
    from llmspeed.quant.hadamard import check_rotatable

    with pytest.raises(ValueError, match=f"layer 'x.down_proj' has in_features={in_features}, group_size={group}"):
        check_rotatable("x.down_proj", in_features, group)
    check_rotatable("x.down_proj", 96, 32)  # a power of two dividing in_features


@pytest.mark.parametrize("requires_grad", [True, False])
def test_the_rotated_weight_keeps_requires_grad(requires_grad):
    lin = torch.nn.Linear(32, 4)
    lin.weight.requires_grad_(requires_grad)
    with rotated_inputs([lin], 16):
        assert lin.weight.requires_grad is requires_grad
