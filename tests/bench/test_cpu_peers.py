"""The llama.cpp comparison reports, instead of failing, when its anchor is missing."""

from __future__ import annotations

import sys

import pytest

from llmspeed.bench import cpu_peers


def test_a_missing_anchor_is_reported_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    reason = cpu_peers.llama_cpp_missing()
    assert reason is not None and "llama-cpp-python is not installed" in reason
    assert "-DGGML_NATIVE=ON" in reason


def test_it_compares_the_embedded_model_on_the_cpu_only():
    with pytest.raises(ValueError, match="device='cuda'"):
        cpu_peers.run(device="cuda")
    with pytest.raises(ValueError, match="model='tiny-llama'"):
        cpu_peers.run(model="tiny-llama")
    with pytest.raises(ValueError, match=r"formats \['int3'\] are not cpu_peers rows; known: \['fp32'"):
        cpu_peers.run(formats=["int3"])


def test_every_format_maps_to_the_llama_cpp_type_of_the_same_width():
    anchors = {k: v[0] for k, v in cpu_peers.FORMATS.items() if isinstance(v, tuple)}
    assert anchors == {"fp32": "F32", "bf16": "F16", "int8": "Q8_0", "int4": "Q4_0"}
    variants = {k: v for k, v in cpu_peers.FORMATS.items() if isinstance(v, str)}
    assert variants and all(k.split(", ")[0] == v and v in anchors for k, v in variants.items())


def test_variants_build_what_their_names_say():
    """Regression guard for the llmspeed-only rows: the head and the activations are what the row claims."""
    from llmspeed.quant import Int4Linear, Int8Linear

    model = cpu_peers._llmspeed_model("int4, int8 activations, int8 lm_head")
    layers = dict(model.linear_layers())
    assert isinstance(layers["lm_head"], Int8Linear)
    assert all(isinstance(m, Int4Linear) and m.config.activations == "int8" and m.config.group_size == 64
               for n, m in layers.items() if n != "lm_head")  # fmt: skip
    options = {"int8 lm_head", "int4 lm_head", "int8 activations", "awq+gptq", "fp16 kv cache"}
    assert all(k.split(", ")[1:] and set(k.split(", ")[1:]) <= options
               for k, v in cpu_peers.FORMATS.items() if isinstance(v, str))  # fmt: skip
    int4_head = dict(cpu_peers._llmspeed_model("int4, int8 activations, int4 lm_head").linear_layers())["lm_head"]
    assert isinstance(int4_head, Int4Linear) and int4_head.config.group_size == 64
    assert cpu_peers._kv_cache_dtype("fp32, fp16 kv cache") == "fp16" and cpu_peers._kv_cache_dtype("int8") == "auto"
    plain = dict(cpu_peers._llmspeed_model("int8").linear_layers())
    assert type(plain["lm_head"]).__name__ == "Linear" and plain["model.layers.0.mlp.up_proj"].config.activations == "float"
