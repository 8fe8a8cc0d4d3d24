"""``int8_layers``: some layers of a 4-bit model at int8, with every method; what it costs and what it refuses."""

from __future__ import annotations

import pytest
import torch

import llmspeed
from llmspeed.quant import Int4Linear, Int8Linear

# Each layer fitted to its own float weights: on this tiny random model, fitting to the float model's output
# (the default) lowers the held-out error by about 20% and leaves int8 down projections' gain below its noise.
OPTS = dict(seq_len=32, n_sequences=16, progress=False, float_targets=False)
DOWN = ["*.mlp.down_proj"]


def _tokens(n: int = 16, t: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, t), generator=g)  # [n, t]


def _logits(model, tokens):
    with torch.no_grad():
        return model.module(input_ids=tokens, use_cache=False).logits  # [b, T, vocab]


def _quantized(method: str, int8_layers=None):
    model = llmspeed.models.tiny("llama", seed=0)
    calibrated = method not in ("rtn", "hqq")
    llmspeed.quantize(
        model,
        "int4",
        16,
        method=method,
        calibration=_tokens() if calibrated else None,
        method_options=OPTS if calibrated else None,
        int8_layers=int8_layers,
    )
    return model


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq+gptq"])
def test_int8_layers_are_int8_cost_bytes_and_lower_the_error(method, tmp_path):
    x = _tokens(2, 32, seed=5)  # held out
    ref = _logits(llmspeed.models.tiny("llama", seed=0), x)
    plain, mixed = _quantized(method), _quantized(method, DOWN)
    for name, module in mixed.linear_layers():
        if name != "lm_head":
            expected = Int8Linear if name.endswith("down_proj") else Int4Linear
            assert isinstance(module, expected), name
            assert module.config.method == method
    assert llmspeed.memory_footprint(mixed)["linear"] > llmspeed.memory_footprint(plain)["linear"]
    err = {
        k: float((_logits(m, x) - ref).norm() / ref.norm()) for k, m in (("plain", plain), ("mixed", mixed))
    }
    assert err["mixed"] < err["plain"], err
    llmspeed.save(mixed, tmp_path / "q")
    loaded = llmspeed.load(tmp_path / "q")
    assert isinstance(dict(loaded.linear_layers())["model.layers.0.mlp.down_proj"], Int8Linear)
    torch.testing.assert_close(_logits(loaded, x), _logits(mixed, x))


@pytest.mark.parametrize(
    "fmt,method,int8_layers,match",
    [
        ("int8", "rtn", DOWN, "the format is int8 already"),
        ("int4", "rtn", "*.mlp.down_proj", "not a single string"),
        ("int4", "rtn", ["*.mlp.nothing"], "int8_layers pattern '\\*.mlp.nothing' matches no linear layer"),
        ("int4", "rtn", ["down_proj"], r"pattern 'down_proj' matches no linear layer \(as a suffix: '\*.down_proj'\)"),
        ("int4", "gptq", ["*.v_proj"], "linears fed one input are quantized together"),
        ("int4", "awq+gptq", ["*.up_proj"], "linears fed one input are quantized together"),
        ("int4", "hqq", DOWN, "needs a method that also quantizes int8; method='hqq' does not"),
    ],
)
def test_bad_int8_layers_raise_before_anything_changes(fmt, method, int8_layers, match):
    model = llmspeed.models.tiny("llama", seed=0)
    layers = dict(model.linear_layers())
    norms = {n: p.detach().clone() for n, p in model.module.named_parameters() if p.dim() == 1}
    calibrated = method != "rtn"
    with pytest.raises(ValueError, match=match):
        llmspeed.quantize(
            model,
            fmt,
            method=method,
            calibration=_tokens() if calibrated else None,
            method_options=OPTS if calibrated else None,
            int8_layers=int8_layers,
        )
    assert all(m is layers[n] for n, m in model.linear_layers())
    assert all(torch.equal(p, norms[n]) for n, p in model.module.named_parameters() if p.dim() == 1)
