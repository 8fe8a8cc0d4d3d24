"""GPTQ on a model: the calibration machinery it runs on (shared inputs, layer passes, calibration tokens) and the
model-level method (packed modules, determinism, save/load, rollback, argument checks); the per-layer algorithm on
tensors is in ``test_gptq.py``."""

from __future__ import annotations

import pytest
import torch

import llmspeed
from llmspeed.quant.calibration import (
    capture_layer_inputs,
    decoder_layers,
    layer_hessians,
    quantize_layer,
    run_layer,
)
from llmspeed.quant.calibration_data import CalibrationConfig, calibration_tokens
from llmspeed.quant.methods import gptq as G

from .test_gptq import OPTS, _layer0_activations, _tokens


# --- calibration machinery -----------------------------------------------------------------------
def test_shared_inputs_share_one_hessian(llama):
    _, layers = decoder_layers(llama)
    inputs = capture_layer_inputs(llama, _tokens(), batch_size=8)
    names = [n for n, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)]
    hessians, groups = layer_hessians(layers[0], inputs, names)
    assert sorted(map(sorted, groups.values())) == sorted(
        [
            ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
            ["self_attn.o_proj"],
            ["mlp.gate_proj", "mlp.up_proj"],
            ["mlp.down_proj"],
        ]
    )
    _, _, acts = _layer0_activations(llama)
    x = acts["mlp.down_proj"]
    torch.testing.assert_close(hessians["mlp.down_proj"], 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-4)


def test_run_layer_with_swapped_weights_matches_installed_weights(llama):
    _, layers = decoder_layers(llama)
    inputs = capture_layer_inputs(llama, _tokens(4), batch_size=2)
    new = torch.randn_like(layers[0].mlp.up_proj.weight)
    swapped = run_layer(layers[0], inputs, {"mlp.up_proj.weight": new})
    before = layers[0].mlp.up_proj.weight.detach().clone()
    with torch.no_grad():
        layers[0].mlp.up_proj.weight.copy_(new)
    installed = run_layer(layers[0], inputs)
    with torch.no_grad():
        layers[0].mlp.up_proj.weight.copy_(before)
    for a, b in zip(swapped.hidden, installed.hidden):
        torch.testing.assert_close(a, b)


def test_quantize_layer_in_one_pass_is_true_sequential(llama):
    """One pass: its output is the layer with every weight quantized, and each group's Hessian sees
    the quantized groups before it (the first group sees the float inputs)."""
    _, layers = decoder_layers(llama)
    layer = layers[0]
    inputs = capture_layer_inputs(llama, _tokens(), batch_size=16)
    names = {n: f"model.layers.0.{n}" for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    float_h, groups = layer_hessians(layer, inputs, list(names))
    before = {n: layer.get_submodule(n).weight.detach().clone() for n in names}
    coarse = {n: (w * 4).round() / 4 for n, w in before.items()}  # a visible "quantization"
    seen = {}

    def fake_group(group, config):
        rels = group.names
        seen[rels[0]] = group.hessian
        return [(torch.nn.Identity(), coarse[n]) for n in rels]

    plan = {q: None for q in names.values()}
    out, built = quantize_layer(layer, inputs, names, groups, fake_group, plan)
    assert sorted(built) == sorted(names.values())
    want = run_layer(layer, inputs, {f"{n}.weight": w for n, w in coarse.items()})
    torch.testing.assert_close(out.hidden[0], want.hidden[0])
    torch.testing.assert_close(seen["self_attn.q_proj"], float_h["self_attn.q_proj"])
    assert not torch.allclose(seen["mlp.down_proj"], float_h["mlp.down_proj"])
    for n, w in before.items():
        assert torch.equal(layer.get_submodule(n).weight, w), n
    with pytest.raises(ValueError, match="one batch"):
        quantize_layer(
            layer, capture_layer_inputs(llama, _tokens(), batch_size=8), names, groups, fake_group, plan
        )


def test_calibration_tokens_windows_and_errors(smollm2_cached):
    cfg = CalibrationConfig(n_sequences=4, seq_len=16)
    tokens = calibration_tokens(smollm2_cached, None, cfg)
    assert tokens.shape == (4, 16) and tokens.dtype == torch.long
    text = llmspeed.eval.calibration_mix()  # the default: registers of text Python ships, interleaved
    expected = smollm2_cached.tokenizer.encode(text[:2000], add_special_tokens=False)[:64]
    assert tokens.reshape(-1).tolist() == expected
    assert calibration_tokens(smollm2_cached, ["a b c " * 20], cfg).shape[1] == 16
    for bad, match in (
        ([], "empty"),
        ("", "empty"),
        (["  "], "empty"),
        ("hi", "shorter than one window"),
        (3, "must be"),
    ):
        with pytest.raises(ValueError, match=match):
            calibration_tokens(smollm2_cached, bad, cfg)
    with pytest.raises(ValueError, match="seq_len"):
        CalibrationConfig(seq_len=0)
    with pytest.raises(ValueError, match="n_sequences must be a positive integer; got True"):
        CalibrationConfig(n_sequences=True)
    tiny = llmspeed.models.tiny("llama", seed=0)  # context 512, vocabulary 256
    assert calibration_tokens(tiny, torch.zeros(1024, dtype=torch.long), CalibrationConfig(2, 512)).shape == (2, 512)
    for ids, match in (
        (torch.full((64,), 256), r"token ids must lie in \[0, 256\); got \[256, 256\]"),
        (torch.full((64,), -1), r"token ids must lie in \[0, 256\); got \[-1, -1\]"),
        (torch.zeros(64), r"calibration tensor must hold token ids, int64 \[n, T\] or \[T\]; got torch.float32"),
    ):
        with pytest.raises(ValueError, match=match):
            calibration_tokens(tiny, ids, CalibrationConfig(2, 16))


# --- the model-level method ---------------------------------------------------------------------
def _linears(model):
    return {n: m for n, m in model.linear_layers()}


@pytest.mark.parametrize("fmt,group_size", [("int4", 32), ("nf4", 32), ("int8", None)])
def test_quantize_gptq_builds_packed_modules_and_beats_rtn(fmt, group_size):
    ref = llmspeed.models.tiny("llama", seed=1)
    tokens = _tokens(16, 32, seed=1)
    x = _tokens(2, 32, seed=2)
    with torch.no_grad():
        want = ref.hf(input_ids=x).logits
    errors = {}
    for method in ("rtn", "gptq"):
        model = llmspeed.models.tiny("llama", seed=1)
        opts = OPTS if method == "gptq" else None
        llmspeed.quantize(
            model, fmt, group_size, method=method, calibration=tokens if opts else None, method_options=opts
        )
        with torch.no_grad():
            errors[method] = (
                (model.hf(input_ids=tokens).logits - ref.hf(input_ids=tokens).logits).norm().item()
            )
            got = model.hf(input_ids=x).logits
        assert torch.isfinite(got).all() and got.shape == want.shape
    q = dict(model.linear_layers())["model.layers.1.mlp.down_proj"]
    assert q.quant_format == fmt and q.config.method == "gptq"
    assert errors["gptq"] < errors["rtn"], errors


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_float_targets_bring_the_output_closer_to_the_float_model(method):
    """With ``float_targets`` each layer is fitted to the float model's output, so later layers make up for
    earlier ones' errors: the logits on the calibration windows end closer to the float model's."""
    tokens = _tokens(32, 32, seed=4)
    ref = llmspeed.models.tiny("llama", seed=2)
    with torch.no_grad():
        want = ref.hf(input_ids=tokens).logits  # [n, T, vocab]
    errors = {}
    for on in (False, True):
        model = llmspeed.models.tiny("llama", seed=2)
        opts = dict(OPTS, n_sequences=32, float_targets=on)
        llmspeed.quantize(model, "int4", 16, method=method, calibration=tokens, method_options=opts)
        with torch.no_grad():
            errors[on] = (model.hf(input_ids=tokens).logits - want).norm().item()
    assert errors[True] < errors[False], errors


def test_gptq_is_deterministic():
    tokens = _tokens()
    states = []
    for _ in range(2):
        model = llmspeed.models.tiny("qwen2", seed=3)  # qwen2: q/k/v carry biases
        llmspeed.quantize(model, "int4", 16, method="gptq", calibration=tokens, method_options=OPTS)
        states.append(model.hf.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_gptq_model_survives_save_load(tmp_path):
    model = llmspeed.models.tiny("llama", seed=0)
    llmspeed.quantize(model, "int4", 32, method="gptq", calibration=_tokens(), method_options=OPTS)
    llmspeed.save(model, tmp_path / "m")
    loaded = llmspeed.load(tmp_path / "m")
    x = _tokens(2, 16, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded.hf(input_ids=x).logits, model.hf(input_ids=x).logits)


def test_failure_midway_leaves_model_unchanged(monkeypatch):
    model = llmspeed.models.tiny("llama", seed=0)
    before = _linears(model)
    weights = {n: m.weight.detach().clone() for n, m in before.items()}
    calls = []
    real = G.gptq_quantize

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # layer 1's first group: layer 0 is already done
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(G, "gptq_quantize", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        llmspeed.quantize(model, "int4", 16, method="gptq", calibration=_tokens(), method_options=OPTS)
    assert len(calls) == 6
    after = _linears(model)
    for name, module in before.items():
        assert after[name] is module, name
        assert torch.equal(module.weight, weights[name]), name


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(calibration=[]), "empty"),
        (dict(calibration=""), "empty"),
        (dict(calibration=torch.arange(10)), "shorter than one window"),
        (dict(method="gptqq"), "method must be one of"),
        (dict(method_options=dict(seq_len=-1)), "seq_len"),
        (dict(method_options=dict(damp=0.0)), "damp"),
        (dict(method_options=dict(target_damp=-1.0)), "target_damp must be a finite number > 0"),
        (dict(method="awq+gptq", method_options=dict(target_damp=0.0)), "target_damp must be a finite number > 0"),
        (dict(method_options=dict(damp="x")), "damp must be a finite number > 0; got 'x'"),
        (dict(method_options=dict(damp=float("nan"))), "damp must be a finite number > 0; got nan"),
        (dict(method_options=dict(block_size=7.5)), "block_size must be an integer > 0; got 7.5"),
        (dict(method_options=dict(act_order="yes")), "act_order must be a bool; got 'yes'"),
        (dict(method_options=dict(float_targets="x")), "float_targets must be a bool; got 'x'"),
        (dict(method_options=dict(clip_search=0.9)), "clip_search must be a non-empty tuple"),
        (dict(method_options=dict(clip_search=("x",))), "clip_search must be a non-empty tuple"),
        (dict(method="awq", method_options=dict(duo_scaling="no")), "duo_scaling must be a bool; got 'no'"),
        (dict(method="awq", method_options=dict(damp=float("inf"))), "damp must be a finite number > 0; got inf"),
        # regression: windows past max_position_embeddings (512) calibrated on positions the model never saw
        (dict(calibration=torch.zeros(2048, dtype=torch.long), method_options=dict(seq_len=1024)),
         "seq_len must be at most the model's context of 512 tokens"),
        (dict(method="awq", calibration=torch.zeros(2048, dtype=torch.long), method_options=dict(seq_len=1024)),
         "seq_len must be at most the model's context of 512 tokens"),
    ],
)
def test_bad_input_raises_before_any_layer_changes(kwargs, match):
    model = llmspeed.models.tiny("llama", seed=0)
    before = _linears(model)
    args = dict(method="gptq", calibration=_tokens(), method_options=dict(OPTS))
    if "method_options" in kwargs:
        args["method_options"].update(kwargs.pop("method_options"))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        llmspeed.quantize(model, "int4", 16, **args)
    assert _linears(model) == before


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "qat-gptq"])
@pytest.mark.parametrize("group_size", [None, 16])
def test_a_layer_with_no_input_features_is_refused_by_name_before_any_layer_changes(method, group_size):
    """Regression: intermediate_size=0 builds down_proj = nn.Linear(0, 64); quantize crashed inside the method
    (rtn: "amax(): Expected reduction dim 1 to have non-zero size", gptq/awq: a reshape in the Hessian hook) or
    advised "use group_size <= 0 or None". It is now a ValueError naming the layer, as for any other layer a
    plan cannot take, before anything changes."""
    model = llmspeed.models.tiny("llama", seed=0, intermediate_size=0)
    before = _linears(model)
    match = r"'model.layers.0.mlp.down_proj' has in_features=0 .*add it to skip"
    with pytest.raises(ValueError, match=match):
        if method == "qat-gptq":
            llmspeed.qat.prepare(model, "int4", group_size, init="gptq", calibration=_tokens(), init_options=OPTS)
        else:
            calibration = None if method == "rtn" else _tokens()
            options = None if method == "rtn" else OPTS
            llmspeed.quantize(model, "int4", group_size, method=method, calibration=calibration,
                              method_options=options)  # fmt: skip
    assert _linears(model) == before


def test_text_calibration_needs_a_tokenizer():
    model = llmspeed.models.tiny("llama", seed=0)
    with pytest.raises(ValueError, match="tokenizer"):
        llmspeed.quantize(model, "int4", 16, method="gptq", calibration=["some text"], method_options=OPTS)


@pytest.mark.slow
def test_gptq_on_smollm2_first_layer_beats_rtn(smollm2):
    """On real activations, quantizing only decoder layer 0 with GPTQ leaves a smaller output error than RTN."""
    text = llmspeed.eval.pydoc_text("train")[:20000]
    errs = {}
    for method in ("rtn", "gptq"):
        model = llmspeed.models.smollm2()
        opts = dict(n_sequences=8, seq_len=64, progress=False) if method == "gptq" else None
        llmspeed.quantize(
            model,
            "int4",
            64,
            method=method,
            include=["model.layers.0.*"],
            calibration=text if opts else None,
            method_options=opts,
        )
        ids = calibration_tokens(model, text, CalibrationConfig(8, 64))
        _, layers = decoder_layers(model)
        out_q = run_layer(layers[0], capture_layer_inputs(model, ids, 8)).hidden
        out_f = run_layer(decoder_layers(smollm2)[1][0], capture_layer_inputs(smollm2, ids, 8)).hidden
        errs[method] = sum((a - b).norm().item() for a, b in zip(out_q, out_f))
    assert errs["gptq"] < 0.5 * errs["rtn"], errs  # measured: 19.8 vs 97.2
