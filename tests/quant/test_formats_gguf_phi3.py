"""Phi-3 GGUF files both ways: llama.cpp's ``phi3`` architecture, whose fused ``attn_qkv`` and ``ffn_up`` are
transformers' ``qkv_proj`` and ``gate_up_proj`` as they are. llama.cpp runs llmspeed's file as llmspeed computes the
model (float, a partial rotary width as Phi-4-mini's, LongRoPE as Phi-3.5's and Phi-4-mini's, int4), the file comes
back as it was written, and factor tables in a file of another architecture are refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import llmspeed
from llmspeed.quant.formats import gguf_file

from .test_formats_gguf_load import _same_buffers

gguf = pytest.importorskip("gguf")

PARTIAL = {"rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_type": "default"}}


def _long_rope(partial: float = 0.5) -> dict:
    """LongRoPE over a 1024-token pre-scaling context stretched to 4096 (attention factor sqrt(1 + ln 4 / ln 1024)):
    llama.cpp pads its context to 256 tokens, which must stay under 1024 for it to take the short factors too."""
    g = torch.Generator().manual_seed(0)
    half = int(32 * partial) // 2
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": partial,
            "long_factor": (1 + 3 * torch.rand(half, generator=g)).tolist(),
            "short_factor": (1 + torch.rand(half, generator=g)).tolist(), "original_max_position_embeddings": 1024}
    return {"rope_parameters": rope, "original_max_position_embeddings": 1024, "max_position_embeddings": 4096}


def _phi3(tokenizer=None, **overrides):
    extra = {}
    if tokenizer is not None:  # llama.cpp needs a vocabulary: SmolLM2's, at its size
        extra = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = llmspeed.models.tiny("phi3", seed=1, hidden_size=128, intermediate_size=256, **extra, **overrides)
    model.tokenizer = tokenizer
    # llama.cpp marks "</s>" of any model whose name says phi3 (a Phi-3 vocabulary has one; SmolLM2's does not)
    model.module.config._name_or_path = "tiny-test"
    return model


def test_the_rotary_width_and_fields_go_both_ways(tmp_path):
    model = _phi3(**PARTIAL)
    llmspeed.quantize(model, "int4", group_size=32)
    path = llmspeed.save(model, tmp_path / "p.gguf", format="gguf")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}
    assert fields["general.architecture"] == "phi3" and fields["phi3.rope.dimension_count"] == 16  # half of 32
    assert fields["phi3.attention.sliding_window"] == 0 and fields["phi3.rope.scaling.original_context_length"] == 4096
    back = llmspeed.load(path)
    assert back.module.config.rope_parameters["partial_rotary_factor"] == 0.5
    for (name, ours), (_, theirs) in zip(model.linear_layers(), back.linear_layers()):
        _same_buffers(theirs, ours, name)  # bit for bit (the int8 head's row scales through fp16)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(model.module(ids).logits, back.module(ids).logits, atol=1e-3)


def test_long_rope_goes_both_ways(tmp_path):
    model = _phi3(**_long_rope())
    path = llmspeed.save(model, tmp_path / "long.gguf", format="gguf")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}
    assert fields["phi3.rope.scaling.original_context_length"] == 1024 and fields["phi3.context_length"] == 4096
    assert fields["phi3.rope.scaling.attn_factor"] == pytest.approx((1 + np.log(4) / np.log(1024)) ** 0.5)
    back = llmspeed.load(path)
    want, got = model.module.config.rope_parameters, back.module.config.rope_parameters
    assert got["rope_type"] == "longrope" and got["original_max_position_embeddings"] == 1024
    for key in ("long_factor", "short_factor"):
        assert got[key] == pytest.approx(want[key], abs=0)  # fp32 as stored
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model.module(ids).logits, back.module(ids).logits)


CHECKS = [({}, None, 1e-3), (PARTIAL, None, 1e-3), (_long_rope(1.0), None, 1e-3), (_long_rope(), None, 1e-3),
          (PARTIAL, "int4", 0.03)]


@pytest.mark.parametrize("overrides,fmt,atol", CHECKS, ids=["plain", "half rotary", "longrope", "longrope half", "int4"])
def test_llama_cpp_runs_the_file_as_llmspeed_computes_it(smollm2_cached, tmp_path, overrides, fmt, atol):
    llama_cpp = pytest.importorskip("llama_cpp")  # llama-cpp-python: a peer built from source, not in the test extras
    tok = smollm2_cached.tokenizer
    model = _phi3(tok, **overrides)
    if fmt is not None:
        llmspeed.quantize(model, fmt, group_size=32)
    path = llmspeed.save(model, tmp_path / "p.gguf", format="gguf")
    ids = tok.encode("The quick brown fox jumps over the lazy dog and runs far away")
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))  # [T, V]
    with torch.no_grad():
        ours = model.module(torch.tensor([ids])).logits[0]  # [T, V]
        back = llmspeed.load(path).module(torch.tensor([ids])).logits[0]
    # llama.cpp rounds activations to 8 bits in its 4-bit dot products: a little more apart there
    assert (ours - theirs).abs().max() < atol and (back - theirs).abs().max() < atol
    if fmt is None:  # random weights: near ties, which 8-bit activations may flip
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_factor_tables_outside_a_phi3_file_are_refused_by_name(monkeypatch, tmp_path):
    write = gguf_file._tensors

    def with_factors(model, arch):
        out = write(model, arch)
        out["rope_factors_long.weight"] = (np.ones(8, np.float32), "F32")
        return out

    monkeypatch.setattr(gguf_file, "_tensors", with_factors)
    for arch in ("llama", "phi3"):  # another architecture's file; a phi3 file with one table of the two
        path = llmspeed.save(llmspeed.models.tiny(arch, seed=0), tmp_path / f"{arch}.gguf", format="gguf")
        with pytest.raises(ValueError, match=rf"{arch}.gguf: tensors \['rope_factors_long.weight'\] hold LongRoPE's "
                                             rf"rope scaling, which llmspeed reads only from phi3 files holding both"):  # fmt: skip
            llmspeed.load(path)
