"""GPTQ: the per-layer algorithm on tensors (the calibration machinery and the model-level method:
``test_gptq_model.py``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmspeed
from llmspeed.quant import QuantConfig
from llmspeed.quant import hessian as H
from llmspeed.quant.calibration import capture_layer_inputs, decoder_layers, run_layer
from llmspeed.quant.methods import gptq as G

FORMATS = [("int4", 16), ("int4", 32), ("nf4", 16), ("int8", None)]
OPTS = dict(seq_len=32, n_sequences=16, progress=False)


def _tokens(n: int = 16, t: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, t), generator=g)  # [n, t]


def _rtn(weight: torch.Tensor, grid, group_size: int | None) -> torch.Tensor:
    """Round-to-nearest with the same grid: the baseline GPTQ must beat."""
    out = torch.empty_like(weight)
    step = weight.shape[1] if group_size is None else group_size
    for j in range(0, weight.shape[1], step):
        s, z = grid.fit(weight[:, j : j + step])
        out[:, j : j + step] = grid.fake_quantize(weight[:, j : j + step], s[:, None], z[:, None])
    return out


def _layer0_activations(model):
    """Inputs of every linear of decoder layer 0 of ``model`` on random calibration tokens."""
    inputs = capture_layer_inputs(model, _tokens(), batch_size=8)
    _, layers = decoder_layers(model)
    acts: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, o, n=n: acts.setdefault(n, []).append(a[0].detach()))
        for n, m in layers[0].named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    run_layer(layers[0], inputs)
    for h in hooks:
        h.remove()
    return layers[0], inputs, {n: torch.cat(x).reshape(-1, x[0].shape[-1]) for n, x in acts.items()}


# --- the algorithm on tensors -----------------------------------------------------------------------
def test_hessian_is_two_xtx_over_n():
    x = torch.randn(3, 5, 8)
    h = torch.zeros(8, 8)
    rows = H.accumulate_hessian(h, x[:2]) + H.accumulate_hessian(h, x[2:])
    x2 = x.reshape(-1, 8)
    torch.testing.assert_close(H.finalize_hessian(h, rows), 2 * x2.T @ x2 / 15)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(16, 64),
    width=st.integers(2, 12),
    out=st.integers(1, 6),
    noise=st.floats(0.0, 1.0),
    damp=st.floats(1e-3, 10.0),
    seed=st.integers(0, 2**16),
)
def test_float_target_map_solves_its_ridge_problem(n, width, out, noise, damp, seed):
    """``W T`` zeroes the gradient of ``||x V^T - x_float W^T||^2 / N + lam / 2 ||V - W||^2`` (float64), so it
    never fits the float outputs worse than ``W`` (plus the ridge term); equal inputs give ``T = I``."""
    g = torch.Generator().manual_seed(seed)
    x_float = torch.randn(n, width, generator=g, dtype=torch.float64)  # [N, in]
    x = x_float + noise * torch.randn(n, width, generator=g, dtype=torch.float64)  # [N, in]: quantized upstream
    w = torch.randn(out, width, generator=g, dtype=torch.float64)  # [out, in]
    hess = 2 * x.T @ x / n  # [in, in]
    t = H.float_target_map(x_float, x, hess, damp)  # [in, in]
    v = w @ t
    lam = damp * hess.diagonal().mean()
    eye = torch.eye(width, dtype=torch.float64)
    torch.testing.assert_close(v @ (hess + lam * eye), w @ (2 * x_float.T @ x / n + lam * eye))

    def objective(m: torch.Tensor) -> float:
        return float(((x @ m.T - x_float @ w.T) ** 2).sum() / n + lam / 2 * ((m - w) ** 2).sum())

    assert objective(v) <= objective(w) + 1e-9
    torch.testing.assert_close(H.float_target_map(x, x, hess, damp), eye)


def test_float_target_map_rejects_bad_arguments():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="one shape"):
        H.float_target_map(torch.randn(4, 2), x, torch.eye(3), 0.1)
    with pytest.raises(ValueError, match="damp must be positive"):
        H.float_target_map(x, x, torch.eye(3), 0.0)


def test_float_target_map_of_all_zero_inputs_is_the_identity():
    """A linear fed only zeros (a zeroed norm weight) has ``H = 0``: the ridge ``damp * mean(diag H)`` was 0 too,
    and the solve raised on a singular matrix; nothing can be fitted, so ``T = I``."""
    x, x_float = torch.zeros(8, 4), torch.randn(8, 4)
    t = H.float_target_map(x_float, x, torch.zeros(4, 4), 0.1)
    torch.testing.assert_close(t, torch.eye(4))


@pytest.mark.parametrize("method", ["gptq", "awq", "awq+gptq"])
def test_float_targets_survive_a_linear_fed_only_zeros(method):
    model = llmspeed.models.tiny("llama", seed=0)
    with torch.no_grad():
        model.module.model.layers[1].input_layernorm.weight.zero_()  # q/k/v of layer 1 read zeros
        want = model.hf(input_ids=_tokens(2, 16, seed=5)).logits
    opts = dict(OPTS, float_targets=True)
    llmspeed.quantize(model, "int4", 16, method=method, calibration=_tokens(), method_options=opts)
    with torch.no_grad():
        got = model.hf(input_ids=_tokens(2, 16, seed=5)).logits
    assert torch.isfinite(got).all()
    assert float((got - want).norm() / want.norm()) < 0.15


@pytest.mark.parametrize("fmt,group_size", FORMATS)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_layer_error_below_rtn_on_calibration_activations(fmt, group_size, act_order):
    model = llmspeed.models.tiny("llama", seed=0)
    layer, _, acts = _layer0_activations(model)
    grid = G.grid_for(fmt)
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
        w = layer.get_submodule(name).weight.detach()
        h = torch.zeros(w.shape[1], w.shape[1])
        h = H.finalize_hessian(h, H.accumulate_hessian(h, acts[name]))
        q = G.gptq_quantize(w, h, grid, group_size, act_order=act_order).dequantized
        e_gptq, e_rtn = (
            G.layer_error(w, q, acts[name]),
            G.layer_error(w, _rtn(w, grid, group_size), acts[name]),
        )
        assert e_gptq < 0.97 * e_rtn, f"{name}: gptq {e_gptq:.4f} vs rtn {e_rtn:.4f}"


@pytest.mark.parametrize("fmt,symmetric,group_size", [("int4", False, 32), ("int4", True, 64), ("int8", False, None)])
@pytest.mark.parametrize("act_order", [False, True])
def test_the_cpp_column_loop_agrees_with_the_python_one(monkeypatch, fmt, symmetric, group_size, act_order):
    """GPTQ's C++ column loop (int4 and int8 grids) against the Python loop it replaces: the same codes but for
    rounding-order flips, the same layer error to 0.5%, both well below round-to-nearest's."""
    from llmspeed.quant.kernels import cpp

    if cpp.extension() is None:
        pytest.skip(f"the C++ kernel cannot be built here: {cpp.unavailable()}")
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(48, 256, generator=g) * (torch.rand(256, generator=g) * 3)  # correlated, uneven channels
    x = torch.randn(1024, 48, generator=g) @ mix + 0.1 * torch.randn(1024, 256, generator=g)  # [N, in]
    w = torch.randn(192, 256, generator=g)  # [out, in]
    h = torch.zeros(256, 256)
    h = H.finalize_hessian(h, H.accumulate_hessian(h, x))
    grid = G.grid_for(fmt, symmetric=symmetric)
    assert G._column_loop(grid).__name__ == "run"  # the C++ loop is the one used
    fast = G.gptq_quantize(w, h, grid, group_size, act_order=act_order, block_size=64)
    assert torch.equal(fast.dequantized, G.gptq_quantize(w, h, grid, group_size, act_order=act_order,
                                                         block_size=64).dequantized)  # fmt: skip  # deterministic
    monkeypatch.setattr(G, "_column_loop", lambda grid: lambda *args: G._python_columns(grid, *args))
    slow = G.gptq_quantize(w, h, grid, group_size, act_order=act_order, block_size=64)
    assert float((fast.dequantized != slow.dequantized).float().mean()) < 0.01
    e_fast, e_slow, e_rtn = (G.layer_error(w, q, x) for q in (fast.dequantized, slow.dequantized, _rtn(w, grid, group_size)))
    assert abs(e_fast - e_slow) <= 0.005 * e_slow and e_fast < 0.9 * e_rtn


@settings(max_examples=25, deadline=None)
@given(
    out=st.integers(1, 12),
    groups=st.integers(1, 4),
    group_size=st.sampled_from([2, 4, 8]),
    seed=st.integers(0, 2**16),
    act_order=st.booleans(),
)
def test_diagonal_hessian_reduces_to_round_to_nearest(out, groups, group_size, seed, act_order):
    """With uncorrelated inputs no error is worth pushing to other columns: GPTQ is exactly RTN."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, groups * group_size, generator=g)
    h = torch.diag(torch.rand(groups * group_size, generator=g) + 0.5)
    grid = G.grid_for("int4")
    q = G.gptq_quantize(w, h, grid, group_size, act_order=act_order).dequantized
    torch.testing.assert_close(q, _rtn(w, grid, group_size), rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt,group_size", [("int4", 16), ("int4", 24), ("nf4", 16), ("int8", None)])
def test_packed_module_reproduces_gptq_values_with_act_order(fmt, group_size):
    """Groups stay by original column index under act-order, so the packed module decodes the same weight."""
    torch.manual_seed(0)
    w = torch.randn(12, 40)  # 40 columns: g16 and g24 pad the last group
    x = torch.randn(200, 40) * torch.linspace(0.1, 3, 40)  # act-order visits columns out of order
    h = torch.zeros(40, 40)
    h = H.finalize_hessian(h, H.accumulate_hessian(h, x))
    res = G.gptq_quantize(w, h, G.grid_for(fmt), group_size, act_order=True, block_size=8)
    config = QuantConfig(fmt, group_size, method="gptq")
    module = G.pack_result(res, config, bias=None)
    assert res.scales.shape == (12, config.num_groups(40))
    torch.testing.assert_close(module.dequantize(), res.dequantized, rtol=0, atol=1e-6)


def test_gptq_rejects_bad_arguments():
    w, h = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ValueError, match="hessian must be"):
        G.gptq_quantize(w, torch.eye(7), G.grid_for("int4"), 4)
    with pytest.raises(ValueError, match="group_size"):
        G.gptq_quantize(w, h, G.grid_for("int4"), 0)
    with pytest.raises(ValueError, match="block_size"):
        G.gptq_quantize(w, h, G.grid_for("int4"), 4, block_size=0)
    with pytest.raises(ValueError, match="format"):
        G.grid_for("fp8")
    for bad in ((1.5,), (0.0,), (-0.5,), (), (True,)):  # shrinks must lie in (0, 1]
        with pytest.raises(ValueError, match=r"clip_search must be a non-empty tuple of shrink factors in \(0, 1\]"):
            G.grid_for("int4", clip_search=bad)


def test_clip_search_never_fits_worse_than_min_max():
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(0))  # long Gaussian tails: clipping pays
    plain, searched = G.grid_for("int4"), G.grid_for("int4", clip_search=(1.0, 0.9, 0.8, 0.7))
    err = {}
    for name, grid in (("plain", plain), ("searched", searched)):
        s, z = grid.fit(w)
        err[name] = (grid.fake_quantize(w, s[:, None], z[:, None]) - w).abs().pow(2.4).sum(1)
    assert (err["searched"] <= err["plain"] + 1e-6).all()
    assert err["searched"].sum() < err["plain"].sum()


@pytest.mark.parametrize("fmt,symmetric", [("int4", False), ("int4", True), ("nf4", False)])
def test_clip_search_keeps_each_rows_best_shrink_of_all_tried(fmt, symmetric):
    """Per row, the fitted scale and zero are those of the shrink with the smallest error among all of them, not
    merely one no worse than the first (plain min/max) shrink."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    shrinks = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.8)

    def row_error(grid, s, z):
        return (grid.fake_quantize(w, s[:, None], z[:, None]) - w).abs().pow(2.4).sum(1)  # [rows]

    plain, each = G.grid_for(fmt, (1.0,), symmetric), []
    for c in shrinks:
        s, z = plain.fit(w * c)  # the grid the search fits for this shrink
        each.append(row_error(plain, s, z))
    best = torch.stack(each).min(0).values  # [rows]
    grid = G.grid_for(fmt, shrinks, symmetric)
    s, z = grid.fit(w)
    torch.testing.assert_close(row_error(grid, s, z), best)
    assert len(set(torch.stack(each).argmin(0).tolist())) > 2  # the rows do pick different shrinks


def test_symmetric_grids_take_the_exact_fit_and_gptq_takes_its_reference_scale(monkeypatch):
    """Round to nearest (and AWQ's rounding) fit the group exactly; GPTQ, and GPTQ under AWQ, keep ``absmax / 7.5``,
    whose half step of room takes the error feedback of the group's later columns (docs/quantization.md)."""
    from llmspeed.quant import primitives as P
    from llmspeed.quant.methods.grids import grid_for

    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    fit_s, _ = grid_for("int4", symmetric=True).fit(w)
    ref_s, _ = grid_for("int4", symmetric=True, headroom=True).fit(w)
    assert torch.equal(fit_s, P.choose_qparams_int4_symmetric(w, None)[0][:, 0])
    assert torch.equal(ref_s, P.choose_qparams_int4_symmetric_absmax(w, None)[0][:, 0])
    assert not torch.equal(fit_s, ref_s)
    calls: list[str] = []
    for name in ("choose_qparams_int4_symmetric", "choose_qparams_int4_symmetric_absmax"):
        real = getattr(P, name)
        monkeypatch.setattr(P, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    for method, want in (("gptq", "choose_qparams_int4_symmetric_absmax"), ("rtn", "choose_qparams_int4_symmetric")):
        calls.clear()
        model = llmspeed.models.tiny("llama", seed=0)
        options = OPTS if method == "gptq" else None
        llmspeed.quantize(model, "int4", 32, method=method, symmetric=True, lm_head=None,
                          calibration=_tokens() if method == "gptq" else None, method_options=options)  # fmt: skip
        assert calls and set(calls) == {want}, (method, set(calls))
