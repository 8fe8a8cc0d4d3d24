"""The layer-by-layer calibration machinery's checks and its float-target bookkeeping (:mod:`llmspeed.quant.calibration`)."""

from __future__ import annotations

import pytest
import torch

from llmspeed.quant import QuantConfig
from llmspeed.quant import calibration as C


def _tokens(n: int = 16, t: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, t), generator=g)  # [n, t]


def _linears(layer: torch.nn.Module) -> list[str]:
    return [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]


def test_float_targets_follow_the_float_model_through_a_layer_with_nothing_planned(llama):
    """Layer 0 has nothing planned and is not quantized, so layer 1 receives exactly what it receives in the
    float model: its float-target map is the identity and every group is handed its own float weights. The
    float hidden states must be carried through the skipped layer, or layer 1 is fitted to layer 0's inputs."""
    _, layers = C.decoder_layers(llama)
    plan = {f"model.layers.1.{n}": QuantConfig("int4", 16) for n in _linears(layers[1])}
    handed: dict[str, torch.Tensor] = {}

    def identity(group, config):
        for name, linear in zip(group.qualified, group.linears):
            handed[name] = linear.weight.detach().clone()
        return [(torch.nn.Identity(), linear.weight) for linear in group.linears]

    built = C.quantize_sequentially(llama, plan, _tokens(), identity, progress=False, float_targets=True)
    assert sorted(built) == sorted(plan) == sorted(handed)
    for name, weight in handed.items():
        want = llama.module.get_submodule(name).weight
        torch.testing.assert_close(weight, want, rtol=1e-4, atol=1e-4, msg=name)


def _layer_0(llama):
    """Layer 0, its captured inputs, its linears' qualified names and their input groups."""
    _, layers = C.decoder_layers(llama)
    layer = layers[0]
    inputs = C.capture_layer_inputs(llama, _tokens(4, 16), batch_size=4)
    names = {n: f"model.layers.0.{n}" for n in _linears(layer)}
    _, groups = C.layer_hessians(layer, inputs, list(names))
    return layer, inputs, names, groups


def test_linears_fed_one_input_with_different_formats_are_refused(llama):
    layer, inputs, names, groups = _layer_0(llama)
    plan = {q: QuantConfig("int4", 16) for q in names.values()}
    plan["model.layers.0.self_attn.k_proj"] = QuantConfig("int8")
    called = []
    with pytest.raises(
        ValueError, match=r"need one format and rotation.*'model.layers.0.self_attn.k_proj': 'int8'"
    ):
        C.quantize_layer(layer, inputs, names, groups, lambda g, c: called.append(g), plan)
    assert called == []


@pytest.mark.parametrize("n,batch_size", [(5, 2), (6, 3)])
def test_capture_checks_that_layer_0_is_reached_for_every_batch(llama, n, batch_size):
    captured = C.capture_layer_inputs(llama, _tokens(n, 8), batch_size)
    assert len(captured.hidden) == -(-n // batch_size)
    calls = []

    def early_exit(module, args):  # the forward ends before the decoder layers for every batch but the first
        calls.append(1)
        if len(calls) > 1:
            raise C._Stop

    handle = llama.module.model.embed_tokens.register_forward_pre_hook(early_exit)
    try:
        with pytest.raises(RuntimeError, match="decoder layer 0 was not reached for every calibration batch"):
            C.capture_layer_inputs(llama, _tokens(n, 8), batch_size)
    finally:
        handle.remove()


def test_a_planned_linear_the_forward_pass_never_calls_is_named(llama):
    layer, inputs, names, groups = _layer_0(llama)
    layer.add_module("unused", torch.nn.Linear(64, 64))  # planned, but the layer's forward never calls it
    names["unused"], groups["unused"] = "model.layers.0.unused", ["unused"]
    plan = {q: QuantConfig("int4", 16) for q in names.values()}

    def keep(group, config):
        return [(torch.nn.Identity(), linear.weight) for linear in group.linears]

    with pytest.raises(RuntimeError, match=r"linear layers \['model.layers.0.unused'\] were not called"):
        C.quantize_layer(layer, inputs, names, groups, keep, plan)
