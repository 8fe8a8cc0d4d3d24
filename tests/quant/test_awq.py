"""AWQ: scale folding keeps the float function, the scale and clip searches, the model-level methods, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import llmspeed
from llmspeed.quant import QuantConfig
from llmspeed.quant import hessian as H
from llmspeed.quant.calibration import capture_layer_inputs, decoder_layers, run_layer
from llmspeed.quant.methods import awq as A
from llmspeed.quant.methods.awq_fold import fold_params
from llmspeed.quant.methods.grids import grid_for

OPTS = dict(seq_len=32, n_sequences=16, progress=False)


def _tokens(n: int = 16, t: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, t), generator=g)  # [n, t]


def _skewed(model, factor: float = 30.0, channels: int = 4):
    """Make a few input channels of every linear fed by a norm carry large activations (as real LLMs do)."""
    for layer in decoder_layers(model)[1]:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            with torch.no_grad():
                norm.weight[:channels] *= factor
    return model


def _logits(model, tokens):
    with torch.no_grad():
        return model.module(input_ids=tokens, use_cache=False).logits  # [b, T, vocab]


def _norm_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.module.named_parameters() if p.dim() == 1}


# --- folding -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(llmspeed.models.ARCHITECTURES))
def test_folding_random_scales_keeps_the_float_function(arch):
    model = llmspeed.models.tiny(arch, seed=0)
    x = _tokens(2, 24, seed=1)
    before = _logits(model, x)
    plan = llmspeed.quant.plan_layers(model, QuantConfig("int4", 16))
    norms, rows = A.plan_folds(model, plan, _tokens())
    assert {f.producer for f in norms} == {"input_layernorm", "post_attention_layernorm"}
    # o_proj's tied over GQA heads; Phi-3's fused qkv_proj / gate_up_proj leave o_proj and down_proj without a fold
    assert {f.producer for f in rows} == (set() if arch == "phi3" else {"mlp.up_proj", "self_attn.v_proj"})
    g = torch.Generator().manual_seed(0)
    for layer in decoder_layers(model)[1]:
        for fold in norms + rows:
            in_f = layer.get_submodule(sorted(fold.consumers)[0]).in_features
            s = fold.tie_stat(torch.rand(in_f, generator=g) * 4 + 0.25)  # [in]
            for name, value in fold_params(layer, fold, s).items():
                layer.get_parameter(name).data.copy_(value)
    after = _logits(model, x)
    assert not torch.equal(model.module.model.layers[0].input_layernorm.weight, torch.ones(64))
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("duo_scaling", [False, True])  # its weight statistic is tied over GQA heads too
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: v_proj has a bias, divided with its rows by o_proj's s
def test_int8_awq_model_stays_close_to_float(arch, duo_scaling):
    """Folded norms and rows plus quantized modules compute what the float model does (int8: tiny error)."""
    model = _skewed(llmspeed.models.tiny(arch, seed=0))
    g = torch.Generator().manual_seed(2)
    for name, p in model.module.named_parameters():
        if name.endswith("bias"):  # the tiny model's biases start at zero: give the fold something to divide
            p.data.copy_(torch.randn(p.shape, generator=g))
    ref = _logits(model, _tokens(2, 32, seed=3))
    norms_before = _norm_weights(model)
    opts = dict(OPTS, duo_scaling=duo_scaling)
    llmspeed.quantize(model, "int8", method="awq", calibration=_tokens(), method_options=opts)
    changed = [n for n, w in _norm_weights(model).items() if not torch.equal(w, norms_before[n])]
    assert any("input_layernorm" in n for n in changed) and any(
        "post_attention_layernorm" in n for n in changed
    )
    err = (_logits(model, _tokens(2, 32, seed=3)) - ref).norm() / ref.norm()
    assert err < 0.02


# --- the searches --------------------------------------------------------------------------------------
def _qkv_activations(model, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight [q+k+v out, in], inputs [N, in], Hessian [in, in]) of decoder layer 0's q/k/v."""
    layer = decoder_layers(model)[1][0]
    seen = []
    hook = layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    run_layer(layer, capture_layer_inputs(model, _tokens(seed=seed), 16))
    hook.remove()
    x = torch.cat(seen).reshape(-1, seen[0].shape[-1])  # [N, in]
    h = torch.zeros(x.shape[1], x.shape[1])
    h = H.finalize_hessian(h, H.accumulate_hessian(h, x))
    w = torch.cat([layer.self_attn.get_submodule(n).weight.detach() for n in ("q_proj", "k_proj", "v_proj")])
    return w, x, h


@pytest.mark.parametrize("fmt", ["int4", "nf4"])
def test_awq_scales_lower_held_out_output_error_below_rtn(fmt):
    model = _skewed(llmspeed.models.tiny("llama", seed=0))
    w, x_cal, h_cal = _qkv_activations(model, seed=0)
    _, x_new, _ = _qkv_activations(model, seed=7)  # held out: other tokens
    config = QuantConfig(fmt, 16)
    grid = grid_for(fmt)

    def quant(v):
        return A.grid_quantize(v, grid, config).dequantized

    s, err = A.search_scales(w, h_cal, x_cal.abs().mean(0), quant)
    assert err <= A.output_error(w, quant(w), h_cal)  # s = 1 is a candidate
    assert not torch.allclose(s, torch.ones_like(s))
    torch.testing.assert_close(s.max() * s.min(), torch.tensor(1.0))  # normalized so that max(s) min(s) = 1
    direct = ((x_cal @ (quant(w) - w).T) ** 2).sum() / x_cal.shape[0]  # ||X W^T - X A^T||^2 / N
    torch.testing.assert_close(torch.tensor(A.output_error(w, quant(w), h_cal)), direct, rtol=1e-4, atol=0)
    rtn = ((x_new @ (quant(w) - w).T) ** 2).sum()
    awq = ((x_new @ (quant(w * s) / s - w).T) ** 2).sum()
    assert awq < 0.8 * rtn


def test_the_error_from_few_tokens_equals_the_hessians_and_the_search_picks_the_same_scales():
    """With fewer tokens than input channels the scale search scores candidates from the tokens themselves
    (cheaper than through the ``[in, in]`` Hessian): the same errors up to rounding, so the same choice."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 96, generator=gen)  # [out, in]
    x = torch.randn(40, 96, generator=gen) * torch.linspace(0.1, 4.0, 96)  # [N < in, in]: skewed channels
    h = 2 * x.T @ x / x.shape[0]  # [in, in]
    config = QuantConfig("int4", 16)

    def quant(v):
        return A.grid_quantize(v, grid_for("int4"), config).dequantized

    approx = quant(w)
    assert A.output_error(w, approx, h, x) == pytest.approx(A.output_error(w, approx, h), rel=1e-4)
    s_tokens, err_tokens = A.search_scales(w, h, x.abs().mean(0), quant, inputs=x)
    s_hessian, err_hessian = A.search_scales(w, h, x.abs().mean(0), quant)
    assert torch.equal(s_tokens, s_hessian) and err_tokens == pytest.approx(err_hessian, rel=1e-4)
    many = torch.cat([x, x, x])  # N >= in: the Hessian form, the same value
    assert A.output_error(w, approx, h, many) == A.output_error(w, approx, h)


def test_duo_scaling_search_never_does_worse_than_plain_rounding():
    """With ``duo_scaling`` no grid point is ``s = 1`` (alpha = 0 gives ``1 / w_stat``), so ``s = 1`` is scored on its
    own: where every scale hurts (an activation statistic the Hessian does not bear out), it wins."""
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    h = torch.eye(64)
    x = torch.ones(64)
    x[:4] = 1000.0
    config = QuantConfig("int4", 16)

    def quant(v):
        return A.grid_quantize(v, grid_for("int4"), config).dequantized

    s, err = A.search_scales(w, h, x, quant, duo_scaling=True)
    assert err == A.output_error(w, quant(w), h)
    assert torch.equal(s, torch.ones(64))


def test_grid_quantize_without_clip_is_round_to_nearest():
    w = torch.randn(8, 40)
    config = QuantConfig("int4", 16)
    ref = llmspeed.quant.Int4Linear.from_linear(_linear(w), config).dequantize()
    torch.testing.assert_close(A.grid_quantize(w, grid_for("int4"), config).dequantized, ref)


def _linear(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    return lin


@pytest.mark.parametrize("fmt", ["int4", "nf4"])
def test_clip_search_never_increases_the_error_it_minimizes(fmt):
    torch.manual_seed(0)
    w = torch.randn(32, 64) * torch.rand(1, 64) * 3  # [out, in]
    x = torch.randn(512, 64) * (torch.rand(64) * 4)  # [N, in]
    h = 2 * x.T @ x / x.shape[0]
    config = QuantConfig(fmt, 16)

    def block_error(deq):
        d = (deq - w).view(32, 4, 16)
        hb = torch.stack([h[i * 16 : (i + 1) * 16, i * 16 : (i + 1) * 16] for i in range(4)])
        return torch.einsum("ong,ngh,onh->on", d, hb, d)  # [out, groups]

    plain = block_error(A.grid_quantize(w, grid_for(fmt), config, h).dequantized)
    shrinks = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)
    clipped = block_error(A.grid_quantize(w, grid_for(fmt, shrinks), config, h).dequantized)
    assert bool((clipped <= plain + 1e-5).all())
    assert clipped.sum() < plain.sum()


# --- the model-level methods ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,fmt,kwargs",
    [
        ("awq", "int4", {}),
        ("awq", "int4", {"symmetric": True}),
        ("awq+gptq", "int4", {}),
        ("awq", "nf4", {"double_quant": True}),
        ("awq+gptq", "nf4", {}),
    ],
)
def test_awq_builds_packed_modules_that_beat_rtn_and_survive_save_load(method, fmt, kwargs, tmp_path):
    x = _tokens(4, 32, seed=9)  # held out
    ref = _logits(_skewed(llmspeed.models.tiny("llama", seed=0)), x)
    errs = {}
    for m in ("rtn", method):
        model = _skewed(llmspeed.models.tiny("llama", seed=0))
        opts = None if m == "rtn" else dict(OPTS, clip_search=(1.0, 0.9, 0.8))
        llmspeed.quantize(
            model,
            fmt,
            16,
            method=m,
            calibration=None if m == "rtn" else _tokens(),
            method_options=opts,
            **kwargs,
        )
        errs[m] = float((_logits(model, x) - ref).norm() / ref.norm())
    cls = llmspeed.quant.module_class(fmt)
    assert all(isinstance(mod, cls) for n, mod in model.linear_layers() if n != "lm_head")
    assert errs[method] < errs["rtn"], errs
    llmspeed.save(model, tmp_path / "q")
    loaded = llmspeed.load(tmp_path / "q")
    torch.testing.assert_close(_logits(loaded, x), _logits(model, x))


@pytest.mark.parametrize("method,default", [("awq", A.AWQ_CLIP), ("awq+gptq", (1.0,))])
def test_clip_search_defaults_to_awq_clip_for_awq_and_none_with_gptq(method, default):
    """Without ``clip_search``, ``"awq"`` searches :data:`AWQ_CLIP`'s shrinks and ``"awq+gptq"`` does not clip."""
    other = (1.0,) if default != (1.0,) else A.AWQ_CLIP
    weights = {}
    for key, opts in (("none", OPTS), ("default", dict(OPTS, clip_search=default)), ("other", dict(OPTS, clip_search=other))):
        model = _skewed(llmspeed.models.tiny("llama", seed=0))
        llmspeed.quantize(model, "int4", 16, method=method, calibration=_tokens(), method_options=opts)
        weights[key] = dict(model.linear_layers())["model.layers.0.self_attn.q_proj"].dequantize()
    assert torch.equal(weights["none"], weights["default"])
    assert not torch.equal(weights["none"], weights["other"])


def test_awq_is_deterministic():
    outs = []
    for _ in range(2):
        model = _skewed(llmspeed.models.tiny("llama", seed=0))
        llmspeed.quantize(model, "int4", 16, method="awq+gptq", calibration=_tokens(), method_options=OPTS)
        outs.append(_logits(model, _tokens(2, 16, seed=4)))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
@pytest.mark.parametrize("producer,consumer", [("self_attn.v_proj", "self_attn.o_proj"), ("mlp.up_proj", "mlp.down_proj")])
def test_a_row_producer_left_in_float_in_a_later_layer_gets_no_fold(method, producer, consumer):
    """The folds are planned on the first layer; a later layer whose producer is skipped quantizes its consumer
    unscaled (there is nowhere to put ``1/s``) instead of failing with a KeyError, or keeping ``W s``."""
    model = _skewed(llmspeed.models.tiny("llama", seed=0))
    x = _tokens(2, 16, seed=4)
    floats, ref = dict(model.linear_layers()), _logits(model, x)
    skipped = f"model.layers.1.{producer}"
    llmspeed.quantize(model, "int4", 16, method=method, calibration=_tokens(), method_options=OPTS, skip=[skipped])
    layers = dict(model.linear_layers())
    assert layers[skipped] is floats[skipped]
    w = floats[f"model.layers.1.{consumer}"].weight.detach()
    deq = layers[f"model.layers.1.{consumer}"].dequantize()
    assert float((deq - w).norm() / w.norm()) < 0.15  # Q(W), not Q(W s) with s nowhere undone
    assert float((_logits(model, x) - ref).norm() / ref.norm()) < 0.15


class _OnePlusNorm(nn.Module):
    """Gemma's RMSNorm: ``(1 + w) * x / rms(x)``, which a division of ``w`` by ``s`` does not scale by ``1/s``."""

    def __init__(self, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


def _gemma_like():
    model = llmspeed.models.tiny("llama", seed=0)
    for layer in decoder_layers(model)[1]:
        layer.input_layernorm = _OnePlusNorm(64)
        layer.post_attention_layernorm = _OnePlusNorm(64)
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_half_precision_models_fold_and_quantize(arch, dtype):
    """check_fold compares two bf16 / fp16 passes, which differ by their rounding (about 1% of the largest value
    in bf16): a fixed 0.1% tolerance refused every bf16 model as if its norms were (1 + w) norms."""
    model = llmspeed.models.tiny(arch, seed=0, dtype=dtype)
    plan = llmspeed.quant.plan_layers(model, QuantConfig("int4", 16))
    norms, rows = A.plan_folds(model, plan, _tokens())
    assert {f.producer for f in norms} == {"input_layernorm", "post_attention_layernorm"}
    assert {f.producer for f in rows} == {"mlp.up_proj", "self_attn.v_proj"}
    x = _tokens(2, 16, seed=4)
    ref = _logits(model, x).float()
    llmspeed.quantize(model, "int4", 16, method="awq", calibration=_tokens(), method_options=OPTS)
    assert float((_logits(model, x).float() - ref).norm() / ref.norm()) < 0.15
    gemma = _gemma_like()
    gemma.module.to(dtype)
    with pytest.raises(ValueError, match="cannot fold input scales into 'input_layernorm'"):  # still told apart
        llmspeed.quantize(gemma, "int4", 16, method="awq", calibration=_tokens(), method_options=OPTS)


@pytest.mark.parametrize(
    "make,kwargs,match",
    [
        (None, dict(method_options=dict(OPTS, alpha=0.5)), r"method_options \['alpha'\].*'awq'.*n_grid"),
        (None, dict(method_options=dict(OPTS, n_grid=0)), "n_grid must be a positive"),
        (None, dict(method_options=dict(OPTS, clip_search=(1.2,))), "clip_search"),
        (None, dict(calibration=None), "needs a tokenizer"),
        (None, dict(include=["*.o_proj"]), "no RMSNorm feeding"),
        (_gemma_like, {}, "cannot fold input scales into 'input_layernorm'"),
    ],
)
def test_bad_input_raises_before_anything_changes(make, kwargs, match):
    model = (make or (lambda: llmspeed.models.tiny("llama", seed=0)))()
    args = dict(method="awq", calibration=_tokens(), method_options=dict(OPTS))
    args.update(kwargs)
    layers, norms = dict(model.linear_layers()), _norm_weights(model)
    with pytest.raises(ValueError, match=match):
        llmspeed.quantize(model, "int4", 16, **args)
    assert all(m is layers[n] for n, m in model.linear_layers())
    assert all(torch.equal(w, norms[n]) for n, w in _norm_weights(model).items())


def test_failure_midway_restores_linears_and_norms(monkeypatch):
    """The folded norm weights land first, then the modules: a failure after both started restores both."""
    model = llmspeed.models.tiny("llama", seed=0)
    layers, norms = dict(model.linear_layers()), _norm_weights(model)
    install = model.replace_linear
    calls = []

    def flaky(name, module):
        calls.append(name)
        if len(calls) == 3:  # the third module installed (the norms are in by now)
            raise RuntimeError("boom")
        install(name, module)

    monkeypatch.setattr(model, "replace_linear", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        llmspeed.quantize(model, "int4", 16, method="awq", calibration=_tokens(), method_options=OPTS)
    assert all(m is layers[n] for n, m in model.linear_layers())
    assert all(torch.equal(w, norms[n]) for n, w in _norm_weights(model).items())


def test_method_errors_list_the_registry():
    model = llmspeed.models.tiny("llama", seed=0)
    with pytest.raises(ValueError) as err:
        llmspeed.quantize(model, "int4", 16, method="awk")
    assert str(sorted(llmspeed.quant.METHODS)) in str(err.value)
    assert "'awq'" in str(err.value) and "'awq+gptq'" in str(err.value)
    with pytest.raises(
        ValueError, match=r"symmetric=True is available with method in \['awq', 'awq\+gptq', 'gptq', 'rtn'\]"
    ):
        llmspeed.quantize(model, "int4", 16, method="hqq", symmetric=True)
