"""The GGUF suite's pieces: the rules symmetric_grid.py emulates against their reference implementations, the windows
the GGUF suite hands llama.cpp against the ones llmspeed's perplexity scores, and a clear error without llama.cpp."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from llmspeed.bench import gguf_export, symmetric_grid
from llmspeed.eval.perplexity import _windows
from llmspeed.eval.text import pydoc_text
from llmspeed.quant import primitives as P

gguf = pytest.importorskip("gguf")


def test_the_emulated_q4_0_is_llama_cpps_own_quantizer():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))  # [rows, 4 blocks]
    Q4_0 = gguf.GGMLQuantizationType.Q4_0
    theirs = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), Q4_0), Q4_0)  # gguf-py's port of ggml's
    ours = symmetric_grid.llama_cpp_q4_0(w, 32)
    assert np.array_equal(ours.numpy(), theirs)


def test_the_gptq_rule_rows_are_what_an_int4_layer_packed_with_it_computes():
    from llmspeed.quant import Int4Linear, QuantConfig

    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    scales, zeros = P.choose_qparams_int4_symmetric_absmax(w, 32)
    layer = Int4Linear.from_codes(P.quantize_int4(w, scales, zeros, 32), scales, zeros,
                                  config=QuantConfig("int4", 32, symmetric=True))  # fmt: skip
    assert torch.equal(symmetric_grid.gptq_reference(w, 32), layer.dequantize())
    assert not torch.equal(symmetric_grid.gptq_reference(w, 32), symmetric_grid.llama_cpp_q4_0(w, 32))


def test_llama_cpp_scores_the_windows_llmspeed_scores(smollm2_cached):
    got = gguf_export._windows(smollm2_cached, 64, 3)
    assert torch.equal(got, _windows(smollm2_cached, pydoc_text("eval"), 64, 3))


def test_without_llama_cpp_the_suite_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(RuntimeError, match="llama-cpp-python"):
        gguf_export.run(quick=True, progress=False)
