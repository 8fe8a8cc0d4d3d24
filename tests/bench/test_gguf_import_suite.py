"""The GGUF import suite's pieces: what ``_loaded`` reports as read in float, the activations it loads with, and a
clear error without llama.cpp."""

from __future__ import annotations

import sys

import pytest
import torch

import llmspeed
from llmspeed.bench import gguf_import
from llmspeed.quant.formats import gguf_file

gguf = pytest.importorskip("gguf")


def test_the_row_names_what_loaded_as_float(monkeypatch, tmp_path):
    model = llmspeed.models.tiny("llama", seed=0, hidden_size=128, intermediate_size=256)
    llmspeed.quantize(model, "int4", group_size=32, symmetric=True, lm_head=None)
    packed = llmspeed.save(model, tmp_path / "packed.gguf", format="gguf")
    loaded, seconds, floats = gguf_import._loaded(packed)
    assert floats == "none" and seconds > 0 and type(loaded.module.model.layers[0].mlp.up_proj).__name__ == "Int4Linear"
    write = gguf_file._tensors

    def q5_0_down(m, arch):
        out = write(m, arch)
        for name in [n for n in out if "ffn_down" in n]:
            out[name] = (gguf.quants.quantize(out[name][0], gguf.GGMLQuantizationType.Q5_0), "Q5_0")
        return out

    monkeypatch.setattr(gguf_file, "_tensors", q5_0_down)
    mixed = llmspeed.save(llmspeed.models.tiny("llama", seed=0, hidden_size=128, intermediate_size=256),
                          tmp_path / "mixed.gguf", format="gguf")  # fmt: skip
    loaded, _, floats = gguf_import._loaded(mixed)
    assert floats == "2 Q5_0 tensor(s)"
    assert [n for n, m in loaded.linear_layers() if "down_proj" in n and isinstance(m, torch.nn.Linear)] == [
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]  # the Q5_0 layers: floats
    act8, _, _ = gguf_import._loaded(packed, "int8")
    assert {getattr(m, "config", None) and m.config.activations for _, m in act8.linear_layers()} == {"int8", None}

def test_without_llama_cpp_the_suite_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(RuntimeError, match="llama-cpp-python"):
        gguf_import.run(quick=True, progress=False)
