"""GGUF export, checked against the ``gguf`` package's own block decoder, transformers' GGUF loader and the file
llama.cpp's converter wrote for SmolLM2 (the embedded model).

* blocks: hypothesis over codes and scales, decoded by ``gguf.quants.dequantize`` (independent of the writer);
* llmspeed -> GGUF -> ``AutoModelForCausalLM.from_pretrained(gguf_file=...)``: every weight and the logits of
  llmspeed's model, per architecture and format, bf16, a tied head shared with the embedding;
* SmolLM2: every architecture and tokenizer field and every tensor's name, type and shape as llama.cpp's converter
  wrote them, and the tokenizer transformers reads back encodes as the model's own;
* refusals name the layer, before anything is written.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmspeed
from llmspeed import lora
from llmspeed.quant import Int4Linear, Int8Linear
from llmspeed.quant.formats import gguf_blocks, gguf_file, gguf_vocab

gguf = pytest.importorskip("gguf")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()
IDS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(5))


def decode(array: np.ndarray, kind: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(array, gguf.GGMLQuantizationType[kind]).copy())


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), blocks=st.integers(1, 4), group=st.sampled_from([32, 64, 128]), seed=st.integers(0, 99))
def test_4bit_blocks_decode_as_llmspeed_dequantizes(rows, blocks, group, seed):
    g = torch.Generator().manual_seed(seed)
    width = blocks * 32
    groups = -(-width // group)
    codes = torch.randint(0, 16, (rows, width), generator=g, dtype=torch.uint8)
    scales = (torch.rand(rows, groups, generator=g) + 0.01).half().float()
    zeros = torch.randint(0, 16, (rows, groups), generator=g).float()
    expand = lambda t: t.repeat_interleave(group, dim=1)[:, :width]  # noqa: E731
    d = gguf_blocks.block_values(scales, group, width)
    q40 = decode(gguf_blocks.q4_0(codes, d), "Q4_0")
    assert torch.equal(q40, (codes.float() - 8) * expand(scales))  # symmetric int4: bit for bit
    m = gguf_blocks.block_values(-zeros * scales, group, width)
    q41 = decode(gguf_blocks.q4_1(codes, d, m), "Q4_1")
    exact = (codes.float() - expand(zeros)) * expand(scales)
    assert torch.allclose(q41, exact, rtol=0, atol=float((zeros * scales).abs().max()) * 2**-10)  # m in fp16


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 5), blocks=st.integers(1, 4), seed=st.integers(0, 99))
def test_q8_0_blocks_keep_the_codes(rows, blocks, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (rows, blocks * 32), generator=g, dtype=torch.int8)
    scales = (torch.rand(rows, generator=g) + 0.01).half().float()  # fp16 values: no rounding to see
    d = gguf_blocks.block_values(scales, None, blocks * 32)
    assert torch.equal(decode(gguf_blocks.q8_0(codes, d), "Q8_0"), codes.float() * scales[:, None])


def test_rotary_rows_are_llama_cpps_permutation_which_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(32, 3)  # 4 heads of 8 rows
    stored = w[gguf_file.rotary_rows(32, 4)].numpy()
    back = LlamaTensorProcessor()._reverse_permute_weights(stored, 4, 4)
    assert np.array_equal(back, w.numpy()) and not np.array_equal(stored, w.numpy())


def _export(model, tmp_path, name="m.gguf"):
    path = llmspeed.save(model, tmp_path / name, format="gguf")
    assert path == tmp_path / name and path.is_file() and not list(tmp_path.glob("*.partial"))
    # a file without a tokenizer has no token ids: transformers' Phi3Config then takes Phi-3's 32000, past the vocabulary
    ids = {"pad_token_id": None, "eos_token_id": None} if model.module.config.model_type == "phi3" else {}
    return AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=name, dtype=model.spec.dtype, **ids).eval()


def _tolerance(module) -> float:
    """How far a layer's GGUF weights may be from llmspeed's: 0 for Q4_0; fp16 rounding of m or of the int8 scale."""
    if isinstance(module, Int8Linear):
        return float(module.scales.abs().max()) * 127 * 2**-11
    if bool((module.zeros == 8).all()):
        return 0.0
    return float((module.zeros.float() * module.scales.float()).abs().max()) * 2**-10


CASES = [
    ("llama", dict(fmt="int4", group_size=32, symmetric=True)),
    ("llama", dict(fmt="int4", group_size=64)),
    ("qwen2", dict(fmt="int4", group_size=128, symmetric=True)),
    ("qwen2", dict(fmt="int8")),
    ("llama", dict(fmt="int8", group_size=32)),  # group-wise int8: llama.cpp's own Q8_0, the head too
    ("qwen3", dict(fmt="int4", group_size=64)),
    ("mistral", dict(fmt="int4", group_size=32, symmetric=True, lm_head=None)),
    ("phi3", dict(fmt="int4", group_size=64)),  # fused qkv_proj / gate_up_proj: llama.cpp's attn_qkv / ffn_up
]


@pytest.mark.parametrize("arch,options", CASES, ids=[f"{a}-{o['fmt']}-{o.get('group_size')}" for a, o in CASES])
def test_transformers_loads_the_file_as_llmspeeds_model(arch, options, tmp_path):
    extra = {"head_dim": 128} if arch == "qwen3" else {}  # transformers' GGUF reader keeps Qwen3's default head_dim
    model = llmspeed.models.tiny(arch, seed=2, hidden_size=128, intermediate_size=256, **extra)
    llmspeed.quantize(model, **options)
    hf = _export(model, tmp_path)
    weights = hf.state_dict()
    quantized = [(n, m) for n, m in model.linear_layers() if isinstance(m, (Int4Linear, Int8Linear))]
    assert len(quantized) == len(model.linear_names()) - (options.get("lm_head", "int8") is None)
    for name, module in quantized:
        diff = (weights[f"{name}.weight"] - module.dequantize()).abs().max()
        assert diff <= _tolerance(module), name
    for name, tensor in model.module.state_dict().items():  # float tensors (norms, embedding, biases): as they are
        if name in weights and tensor.dtype.is_floating_point:
            assert torch.equal(weights[name], tensor), name
    with torch.no_grad():
        ours, theirs = model.module(IDS).logits, hf(IDS).logits
    assert torch.allclose(ours, theirs, atol=2e-3), (ours - theirs).abs().max()


def test_a_shared_quantized_head_is_the_quantized_token_embedding(tmp_path):
    model = llmspeed.models.tiny("llama", seed=3, tie_word_embeddings=True)
    llmspeed.quantize(model, "int4", group_size=32)
    assert type(model.module.get_input_embeddings()).__name__ == "QuantizedEmbedding"
    hf = _export(model, tmp_path)
    tensors = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert "output.weight" not in tensors and tensors["token_embd.weight"] == "Q8_0"
    assert hf.config.tie_word_embeddings
    with torch.no_grad():
        assert torch.allclose(model.module(IDS).logits, hf(IDS).logits, atol=2e-3)


def test_bf16_float_layers_are_written_in_bf16(tmp_path):
    model = llmspeed.models.tiny("qwen2", seed=4, dtype=torch.bfloat16)
    llmspeed.quantize(model, "int4", group_size=32, skip=["*.mlp.down_proj"])
    hf = _export(model, tmp_path)
    tensors = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert tensors["blk.0.ffn_down.weight"] == "BF16" and tensors["blk.0.attn_norm.weight"] == "F32"
    assert tensors["blk.0.attn_q.bias"] == "F32"
    assert torch.equal(hf.model.layers[0].mlp.down_proj.weight, model.module.model.layers[0].mlp.down_proj.weight)


def test_smollm2_fields_and_tensors_are_llama_cpps(smollm2, tmp_path):
    """The embedded file was written by llama.cpp's converter with Q4_1 layers and a Q8_0 embedding: int4 g32
    (asymmetric) with the default int8 head is the same layout, so every field and tensor must match."""
    from llmspeed.models.embedded import gguf_path

    llmspeed.quantize(smollm2, "int4", group_size=32)
    path = llmspeed.save(smollm2, tmp_path / "smol.gguf", format="gguf")
    ref, new = gguf.GGUFReader(gguf_path()), gguf.GGUFReader(path)
    provenance = {"general.type", "general.name", "general.organization", "general.finetune", "general.basename",
                  "general.size_label", "general.license", "general.languages"}  # fmt: skip
    # llama.cpp names SmolLM's original pre-tokenizer (digits apart, then GPT-2's) "smollm"; the tokenizer
    # transformers builds from this file is GPT-2's alone, and the vocabulary has no token of two digits, so
    # both split every text the same way
    assert new.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert not any(any(c.isdigit() for c in t[:-1]) and t[-1].isdigit() for t in smollm2.tokenizer.get_vocab())
    for key, field in ref.fields.items():
        if key.startswith("GGUF.") or key in provenance or key == "tokenizer.ggml.pre":
            continue
        assert key in new.fields, key
        assert new.fields[key].contents() == field.contents(), key
        assert new.fields[key].types == field.types, key
    shapes = lambda r: {t.name: (t.tensor_type.name, tuple(map(int, t.shape))) for t in r.tensors}  # noqa: E731
    assert shapes(new) == shapes(ref)
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="smol.gguf")
    texts = ["The year 2024 had 366 days.", "  spaces\tand\nnewlines", "naïve café <|im_start|>user"]
    for text in texts:
        assert tok(text)["input_ids"] == smollm2.tokenizer(text)["input_ids"], text


def test_pre_tokenizers_by_their_steps():
    spec = lambda pre: {"pre_tokenizer": pre}  # noqa: E731
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    digits = {"type": "Digits", "individual_digits": True}
    split = {"type": "Split", "pattern": {"Regex": gguf_vocab.QWEN2_REGEX}, "behavior": "Isolated", "invert": False}
    plain = {**byte_level, "use_regex": False}
    assert gguf_vocab._pre_name(spec(byte_level)) == "gpt-2"
    assert gguf_vocab._pre_name(spec({"type": "Sequence", "pretokenizers": [digits, byte_level]})) == "smollm"
    assert gguf_vocab._pre_name(spec({"type": "Sequence", "pretokenizers": [split, plain]})) == "qwen2"
    with pytest.raises(ValueError, match="pre-tokenizer .* is not one llama.cpp implements"):
        gguf_vocab._pre_name(spec({"type": "Sequence", "pretokenizers": [{**digits, "individual_digits": False},
                                                                          byte_level]}))  # fmt: skip


def test_what_gguf_cannot_hold_is_refused_before_writing(tmp_path):
    target = tmp_path / "keep.gguf"
    target.write_bytes(b"the user's file")
    cases = [
        (dict(fmt="nf4"), "layer 'model.layers.0.self_attn.q_proj' is NF4"),
        (dict(fmt="int4", group_size=16), "must be multiples of 32"),
        (dict(fmt="int4", group_size=32, hadamard_layers=["*.mlp.down_proj"]), "Hadamard-rotated groups"),
    ]
    for options, message in cases:
        model = llmspeed.models.tiny("llama", seed=0)
        llmspeed.quantize(model, **options)
        with pytest.raises(ValueError, match=message):
            llmspeed.save(model, target, format="gguf")
    model = llmspeed.models.tiny("llama", seed=0)
    llmspeed.quantize(model, "int4", group_size=32)
    lora.add_adapter(model, "a", r=2)
    with pytest.raises(ValueError, match="carries LoRA adapters: merge them in"):
        llmspeed.save(model, target, format="gguf")
    with pytest.raises(ValueError, match="is a folder"):
        llmspeed.save(llmspeed.models.tiny("llama"), tmp_path, format="gguf")
    with pytest.raises(TypeError, match="directory must be a file path for format='gguf'"):
        llmspeed.save(llmspeed.models.tiny("llama"), 3, format="gguf")
    assert target.read_bytes() == b"the user's file" and sorted(os.listdir(tmp_path)) == ["keep.gguf"]


def test_without_the_gguf_package_the_error_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # import gguf now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'llmspeed\[gguf\]'"):
        llmspeed.save(llmspeed.models.tiny("llama"), tmp_path / "m.gguf", format="gguf")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_float_model_round_trips_through_transformers(arch, tmp_path):
    """No quantized layer: the float query/key rows go through llama.cpp's rotary order and back."""
    extra = {"head_dim": 128} if arch == "qwen3" else {}
    model = llmspeed.models.tiny(arch, seed=6, **extra)
    hf = _export(model, tmp_path)
    tensors = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert set(tensors.values()) == {"F32"} and "output.weight" in tensors
    for name, tensor in model.module.state_dict().items():
        assert torch.equal(hf.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(model.module(IDS).logits, hf(IDS).logits)
