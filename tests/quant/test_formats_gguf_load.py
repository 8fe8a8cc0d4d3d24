"""GGUF files read by ``llmspeed.load``, checked against the ``gguf`` package's decoder and transformers' GGUF loader.

* blocks: hypothesis over raw ``Q4_0``/``Q4_1``/``Q4_K``/``Q6_K``/``Q8_0`` bytes (zero scales and offsets fp16 cannot divide included): the packed
  module dequantizes as ``gguf.quants.dequantize`` does (``Q4_0`` bit for bit);
* llmspeed -> GGUF -> llmspeed: every packed buffer back bit for bit, per architecture and format, a shared head;
* files quantized block by block as llama.cpp does (``gguf``'s port of ggml's quantizers) and the embedded SmolLM2
  file llama.cpp wrote: the weights transformers' loader reads, the logits and the tokenizer;
* bad files are a ``ValueError`` naming the file and what is wrong.
"""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmspeed
from llmspeed import SamplingParams
from llmspeed.quant import Int4Linear, Int8Linear
from llmspeed.quant.formats import gguf_blocks, gguf_file, gguf_load

from .test_formats_gguf import CASES  # the architectures and formats the export is checked on

gguf = pytest.importorskip("gguf")
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()
IDS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(7))
SMALL = dict(hidden_size=128, intermediate_size=256)


def _tensor(raw: np.ndarray, kind: str, width: int) -> types.SimpleNamespace:
    """What ``GGUFReader`` gives for one 2-D tensor: raw rows, its type and its shape innermost first."""
    return types.SimpleNamespace(name="t.weight", tensor_type=gguf.GGMLQuantizationType[kind], data=raw,
                                 shape=np.array([width, raw.shape[0]]))  # fmt: skip


def _reference(raw: np.ndarray, kind: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]).copy())


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 4), blocks=st.sampled_from([1, 2, 4, 6]), shared=st.booleans(), seed=st.integers(0, 999))
def test_raw_4bit_blocks_load_as_gguf_dequantizes_them(rows, blocks, shared, seed):
    g = torch.Generator().manual_seed(seed)
    width = blocks * 32
    codes = torch.randint(0, 16, (rows, width), generator=g, dtype=torch.uint8)
    d = torch.randn(rows, blocks, generator=g) * 0.05
    m = torch.randn(rows, blocks, generator=g) * 0.5
    d[0, 0] = 0.0  # a constant block: w = m
    if blocks > 1:
        d[-1, 1] = 1e-7  # an offset 10^5 steps away: -m / d past fp16's range
    if shared:  # the values shared over pairs of blocks (a file written at group 64)
        d, m = d[:, ::2].repeat_interleave(2, 1)[:, :blocks], m[:, ::2].repeat_interleave(2, 1)[:, :blocks]
    d, m = d.half().float(), m.half().float()
    rows_all = torch.arange(rows)
    q40 = gguf_blocks.q4_0(codes, d)
    module = gguf_load.quantized(_tensor(q40, "Q4_0", width), rows_all, None)
    assert isinstance(module, Int4Linear) and module.config.symmetric
    assert torch.equal(module.dequantize(), _reference(q40, "Q4_0"))  # bit for bit
    q41 = gguf_blocks.q4_1(codes, d, m)
    module = gguf_load.quantized(_tensor(q41, "Q4_1", width), rows_all, None)
    assert isinstance(module, Int4Linear) and not module.config.symmetric
    if shared and blocks % 2 == 0 and width % 64 == 0:
        assert module.config.group_size in (64, 128)
    bound = m.abs().repeat_interleave(32, 1) * 2**-10 + 1e-6  # the zero point -m / d held in fp16
    assert bool(((module.dequantize() - _reference(q41, "Q4_1")).abs() <= bound).all())


def _q4_k(rows: int, width: int, seed: int, d: float = 3e-3, dmin: float = 2e-3) -> np.ndarray:
    """Random ``Q4_K`` rows (every byte string is a valid block once ``d`` and ``dmin`` are finite fp16)."""
    raw = np.random.default_rng(seed).integers(0, 256, (rows, width // 256, 144), dtype=np.uint8)
    for at, value in ((0, d), (2, dmin)):
        raw[..., at : at + 2] = np.full(raw.shape[:2], value, np.float16).view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 4), blocks=st.integers(1, 3), d=st.sampled_from([0.0, 1e-4, 3e-3, 0.5]),
       dmin=st.sampled_from([0.0, 2e-3, 1.0]), seed=st.integers(0, 999))  # fmt: skip
def test_q4_k_loads_as_int4_g32_within_fp16_of_its_scales(rows, blocks, d, dmin, seed):
    raw = _q4_k(rows, blocks * 256, seed, d, dmin)
    module = gguf_load.quantized(_tensor(raw, "Q4_K", blocks * 256), torch.arange(rows), None)
    assert isinstance(module, Int4Linear) and not module.config.symmetric
    want = _reference(raw, "Q4_K")  # w = d sc q - dmin m, sc and m 6-bit
    bound = 15 * d * 63 * 2**-11 + dmin * 63 * 2**-10 + 1e-6  # the scale d sc and the zero point held in fp16
    assert (module.dequantize() - want).abs().max() <= bound


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 4), blocks=st.integers(1, 4), seed=st.integers(0, 999))
def test_q8_0_is_int8_when_a_row_shares_one_scale(rows, blocks, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (rows, blocks * 32), generator=g, dtype=torch.int8)
    row_scales = (torch.rand(rows, generator=g) + 0.01).half().float()
    raw = gguf_blocks.q8_0(codes, gguf_blocks.block_values(row_scales, None, blocks * 32))
    module = gguf_load.quantized(_tensor(raw, "Q8_0", blocks * 32), torch.arange(rows), None)
    assert isinstance(module, Int8Linear) and torch.equal(module.dequantize(), _reference(raw, "Q8_0"))
    assert module.config.group_size is None and module.scales.dtype == torch.float32
    per_block = torch.rand(rows, blocks, generator=g) + 0.01  # llama.cpp's own Q8_0: group-wise int8 at 32
    if blocks > 1:
        per_block[0, 1] += 1.0
        raw = gguf_blocks.q8_0(codes, per_block)
        module = gguf_load.quantized(_tensor(raw, "Q8_0", blocks * 32), torch.arange(rows), None)
        assert isinstance(module, Int8Linear) and module.config.group_size == 32 and module.scales.dtype == torch.float16
        assert torch.equal(module.qweight, codes) and torch.equal(module.dequantize(), _reference(raw, "Q8_0"))  # bit for bit
        assert torch.equal(module(torch.eye(blocks * 32)).T, _reference(raw, "Q8_0"))  # its kernel, on unit inputs


def _q6_k(rows: int, width: int, seed: int, d: float) -> np.ndarray:
    """Random ``Q6_K`` rows (every byte string is a valid block once ``d`` is a finite fp16)."""
    raw = np.random.default_rng(seed).integers(0, 256, (rows, width // 256, 210), dtype=np.uint8)
    raw[..., 208:210] = np.full(raw.shape[:2], d, np.float16).view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 4), blocks=st.integers(1, 3), d=st.sampled_from([0.0, 1e-4, 3e-3, 0.5]), seed=st.integers(0, 999))
def test_q6_k_loads_as_group_wise_int8_within_fp16_of_its_scales(rows, blocks, d, seed):
    """``Q6_K`` (signed 16-channel scales ``d * sc``, ``sc`` an int8): codes minus 32 as int8 at group 16, a negative
    scale's codes negated, each scale rounded to fp16; checked against ``gguf``'s decoder and through the kernel."""
    raw = _q6_k(rows, blocks * 256, seed, d)
    module = gguf_load.quantized(_tensor(raw, "Q6_K", blocks * 256), torch.arange(rows), None)
    assert isinstance(module, Int8Linear) and module.config.group_size == 16 and bool((module.scales >= 0).all())
    want = _reference(raw, "Q6_K")  # w = d sc (q - 32)
    bound = 32 * d * 128 * 2**-11 + 1e-7  # |q - 32| <= 32 times the fp16 rounding of |d sc| <= 128 d
    assert (module.dequantize() - want).abs().max() <= bound
    assert (module(torch.eye(blocks * 256)).T - want).abs().max() <= bound + 1e-6 * float(want.abs().max())


def _same_buffers(ours, theirs, name):
    assert type(ours) is type(theirs), name
    assert ours.config.group_size == theirs.config.group_size and ours.config.symmetric == theirs.config.symmetric
    assert torch.equal(ours.qweight, theirs.qweight), name
    if isinstance(ours, Int8Linear):  # the row scale went through fp16
        assert torch.equal(ours.scales, theirs.scales.half().float()), name
    else:
        assert torch.equal(ours.scales, theirs.scales) and torch.equal(ours.zeros, theirs.zeros), name


@pytest.mark.parametrize("arch,options", CASES, ids=[f"{a}-{o['fmt']}-{o.get('group_size')}" for a, o in CASES])
def test_llmspeeds_gguf_comes_back_bit_for_bit(arch, options, tmp_path):
    extra = {"head_dim": 64} if arch == "qwen3" else {}
    model = llmspeed.models.tiny(arch, seed=2, **SMALL, **extra)
    options = dict(options)
    llmspeed.quantize(model, options.pop("fmt"), **options)
    back = llmspeed.load(llmspeed.save(model, tmp_path / "m.gguf", format="gguf"))
    layers = dict(back.linear_layers())
    for name, module in model.linear_layers():
        if isinstance(module, (Int4Linear, Int8Linear)):
            _same_buffers(layers[name], module, name)
            if module.bias is not None:
                assert torch.equal(layers[name].bias, module.bias), name
        else:
            assert torch.equal(layers[name].weight, module.weight), name
    theirs, linear = back.module.state_dict(), tuple(f"{n}." for n in model.linear_names())
    for name, tensor in model.module.state_dict().items():  # norms, embedding
        if not name.startswith(linear):
            assert torch.equal(theirs[name], tensor), name
    if arch == "qwen3":
        assert back.module.config.head_dim == 64
    with torch.no_grad():
        ours, again = model.module(IDS).logits, back.module(IDS).logits
    assert torch.allclose(ours, again, atol=1e-3), (ours - again).abs().max()  # int8 heads' scales went through fp16


CONFIG_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "vocab_size", "tie_word_embeddings",
               "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")  # fmt: skip


@pytest.mark.parametrize("arch,options", CASES[:6:2] + CASES[5:], ids=lambda c: str(c)[:12])
def test_the_header_reader_and_config_agree_with_gguf_and_transformers(arch, options, tmp_path):
    from transformers import AutoConfig

    from llmspeed.quant.formats import gguf_read

    extra = {"head_dim": 64} if arch == "qwen3" else {}
    model = llmspeed.models.tiny(arch, seed=2, **SMALL, **extra)
    options = dict(options)
    llmspeed.quantize(model, options.pop("fmt"), **options)
    path = llmspeed.save(model, tmp_path / "m.gguf", format="gguf")
    fields, tensors = gguf_read.read(path)
    reader = gguf.GGUFReader(path)
    for t in reader.tensors:  # the same tensor table, bytes and types
        ours = tensors[t.name]
        assert ours.tensor_type == t.tensor_type and list(ours.shape) == list(t.shape), t.name
        assert ours.data.dtype == t.data.dtype and np.array_equal(ours.data, t.data), t.name
    assert set(tensors) == {t.name for t in reader.tensors}
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            assert fields[key] == field.contents() or fields[key].length == len(field.data), key
    ours = gguf_load.config_of(fields, fields["general.architecture"], tensors)
    theirs = AutoConfig.from_pretrained(tmp_path, gguf_file="m.gguf")
    for key in CONFIG_KEYS:
        if arch == "phi3" and key.endswith("_token_id"):  # no ids in the file: transformers takes Phi-3's own
            assert getattr(theirs, key, None) in (None, 1, 32000) and getattr(ours, key, None) is None, key
            continue
        assert getattr(ours, key, None) == getattr(theirs, key, None), key
    assert ours.rope_parameters["rope_theta"] == theirs.rope_parameters["rope_theta"]
    # transformers' reading keeps Qwen3's default head size instead (Qwen2 has none: hidden / heads)
    assert getattr(ours, "head_dim", None) == getattr(model.hf.config, "head_dim", None)


def test_a_shared_quantized_head_comes_back_shared(tmp_path):
    model = llmspeed.models.tiny("llama", seed=3, tie_word_embeddings=True)
    llmspeed.quantize(model, "int4", group_size=32)
    back = llmspeed.load(llmspeed.save(model, tmp_path / "m.gguf", format="gguf"))
    embedding = back.module.get_input_embeddings()
    assert type(embedding).__name__ == "QuantizedEmbedding" and embedding.head is back.module.lm_head
    _same_buffers(back.module.lm_head, model.module.lm_head, "lm_head")
    with torch.no_grad():
        assert torch.allclose(model.module(IDS).logits, back.module(IDS).logits, atol=1e-3)


def _as_llama_cpp(monkeypatch, kinds):
    """Export float weights quantized block by block by gguf's port of ggml's quantizers, ``{gguf name part: type}``."""
    write = gguf_file._tensors

    def tensors(model, arch):
        out = write(model, arch)
        for name, (array, kind) in list(out.items()):
            for part, new in kinds.items():
                if part in name and array.ndim == 2 and kind == "F32":
                    out[name] = (gguf.quants.quantize(array, gguf.GGMLQuantizationType[new]), new)
        return out

    monkeypatch.setattr(gguf_file, "_tensors", tensors)


def test_llama_cpp_quantized_files_read_as_transformers_reads_them(monkeypatch, tmp_path):
    kinds = {"attn_q": "Q4_0", "attn_k": "Q4_1", "ffn_gate": "Q4_0", "ffn_up": "Q4_1", "attn_v": "Q8_0",
             "ffn_down": "Q5_0", "token_embd": "Q4_0"}  # fmt: skip
    _as_llama_cpp(monkeypatch, kinds)
    model = llmspeed.models.tiny("llama", seed=4, tie_word_embeddings=False, **SMALL)
    path = llmspeed.save(model, tmp_path / "m.gguf", format="gguf")
    with pytest.warns(UserWarning, match=r": 1 Q4_0, 2 Q5_0 tensor\(s\) load as float32"):
        ours = llmspeed.load(path)  # the embedding (a lookup), two down projections
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    weights = hf.state_dict()
    layers = dict(ours.linear_layers())
    for name in layers:
        module = layers[name]
        if "q_proj" in name or "gate_proj" in name:
            assert isinstance(module, Int4Linear) and module.config.symmetric and module.config.group_size == 32
            assert torch.equal(module.dequantize(), weights[f"{name}.weight"]), name
        elif "k_proj" in name or "up_proj" in name:
            assert isinstance(module, Int4Linear) and not module.config.symmetric
            bound = weights[f"{name}.weight"].abs().max() * 2**-9
            assert (module.dequantize() - weights[f"{name}.weight"]).abs().max() <= bound, name
        elif "v_proj" in name:  # llama.cpp's per-block Q8_0: group-wise int8, bit for bit
            assert isinstance(module, Int8Linear) and module.config.group_size == 32, name
            assert torch.equal(module.dequantize(), weights[f"{name}.weight"]), name
        else:  # down_proj (Q5_0), the float head: floats equal to transformers'
            assert isinstance(module, torch.nn.Linear), name
            assert torch.equal(module.weight, weights[f"{name}.weight"]), name
    assert torch.equal(ours.module.get_input_embeddings().weight, weights["model.embed_tokens.weight"])
    with torch.no_grad():
        assert torch.allclose(ours.module(IDS).logits, hf(IDS).logits, atol=1e-3)


def test_q4_k_layers_read_as_transformers_reads_them(monkeypatch, tmp_path):
    """K-quants need 256-channel rows: a model 256 wide, its MLP and query projections stored as random Q4_K."""
    write = gguf_file._tensors

    def q4_k(model, arch):
        out = write(model, arch)
        two_d = [n for n in sorted(out) if out[n][0].ndim == 2]
        for i, name in enumerate(n for n in two_d if any(p in n for p in ("ffn_", "attn_q."))):
            rows, width = out[name][0].shape
            out[name] = (_q4_k(rows, width, seed=i), "Q4_K")
        return out

    monkeypatch.setattr(gguf_file, "_tensors", q4_k)
    model = llmspeed.models.tiny("llama", seed=5, hidden_size=256, intermediate_size=512)
    ours = llmspeed.load(llmspeed.save(model, tmp_path / "k.gguf", format="gguf"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="k.gguf", dtype=torch.float32).eval()
    weights = hf.state_dict()
    packed = {n: m for n, m in ours.linear_layers() if isinstance(m, Int4Linear)}
    assert len(packed) == 2 * 4 and all(m.config.group_size == 32 for m in packed.values())  # q, gate, up, down
    for name, module in packed.items():
        want = weights[f"{name}.weight"]
        assert (module.dequantize() - want).abs().max() <= 3e-3 * 63 * 15 * 2**-11 + 2e-3 * 63 * 2**-10, name
    with torch.no_grad():
        ref = hf(IDS).logits
        assert (ours.module(IDS).logits - ref).abs().max() <= 1e-3 * ref.abs().max()


def test_a_q4_0_file_goes_on_to_compressed_tensors_as_it_is_and_q4_1_is_refused(monkeypatch, tmp_path):
    """llama.cpp's Q4_0 is symmetric int4 at group 32: a folder vLLM serves, without quantizing again."""
    for kind in ("Q4_0", "Q4_1"):
        _as_llama_cpp(monkeypatch, {"attn_": kind, "ffn_": kind})
        model = llmspeed.models.tiny("llama", seed=6, **SMALL)
        loaded = llmspeed.load(llmspeed.save(model, tmp_path / f"{kind}.gguf", format="gguf"))
        monkeypatch.undo()
        folder = tmp_path / kind
        if kind == "Q4_1":
            with pytest.raises(ValueError, match=r"fractional zero points .*read from a GGUF file's Q4_1 or Q4_K blocks"):
                llmspeed.save(loaded, folder, format="compressed-tensors")
            continue
        llmspeed.save(loaded, folder, format="compressed-tensors")
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            assert torch.allclose(hf(IDS).logits, loaded.module(IDS).logits, atol=1e-5)


def test_llama_3_rope_frequencies_are_divided_as_llama_cpp_does(monkeypatch, tmp_path):
    """Llama 3.1+ files carry their rope scaling as ``rope_freqs``: the model must be transformers' llama3 rope."""
    from transformers import LlamaForCausalLM

    model = llmspeed.models.tiny("llama", seed=7, **SMALL, max_position_embeddings=65536)
    scaled = dict(model.hf.config.to_dict(), rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})  # fmt: skip
    reference = LlamaForCausalLM(type(model.hf.config)(**scaled)).eval()
    reference.load_state_dict(model.hf.state_dict())
    model.hf.config.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    plain = LlamaForCausalLM(model.hf.config).model.rotary_emb.inv_freq
    factors = plain / reference.model.rotary_emb.inv_freq  # what llama.cpp's converter writes
    assert factors.max() > 7 and factors.min() == 1
    write = gguf_file._tensors
    monkeypatch.setattr(gguf_file, "_tensors", lambda m, a: {**write(m, a), "rope_freqs.weight": (factors.numpy(), "F32")})
    loaded = llmspeed.load(llmspeed.save(model, tmp_path / "m.gguf", format="gguf"))
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(0))  # positions past 64
    with torch.no_grad():
        want = reference(ids).logits
        assert torch.allclose(loaded.module(ids).logits, want, atol=1e-4)
        greedy = reference.generate(ids[:, :120], max_new_tokens=6, do_sample=False)[0, 120:].tolist()
    sampling = SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=0.0)  # the engine's own decode step
    assert loaded.generate_batched([ids[0, :120].tolist()], sampling, progress=False)[0].token_ids == greedy
    monkeypatch.undo()
    with torch.no_grad():  # without the table the angles differ: the check above can fail
        unscaled = llmspeed.load(llmspeed.save(model, tmp_path / "plain.gguf", format="gguf")).module(ids).logits
    assert not torch.allclose(unscaled, want, atol=1e-2)


@pytest.mark.slow
def test_the_embedded_smollm2_file_loads_packed(smollm2):
    """The file llama.cpp's converter wrote (Q4_1 layers, a Q8_0 tied embedding): 210 packed int4 layers whose
    weights are transformers' own reading of it (the embedded model is that reading), a group-wise int8 head (its
    Q8_0 blocks bit for bit) that the input embedding reads its rows from, the same tokenizer."""
    from llmspeed.models.embedded import gguf_path

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = llmspeed.load(gguf_path())
    assert [str(w.message) for w in caught if "load as float32" in str(w.message)] == []  # every tensor packed
    for key in CONFIG_KEYS:  # the embedded model's config is transformers' reading of this file
        assert getattr(model.module.config, key, None) == getattr(smollm2.module.config, key, None), key
    assert model.module.generation_config.eos_token_id == smollm2.module.generation_config.eos_token_id
    reference = dict(smollm2.linear_layers())
    packed = [(n, m) for n, m in model.linear_layers() if isinstance(m, Int4Linear)]
    assert len(packed) == 210 and all(m.config.group_size == 32 and not m.config.symmetric for _, m in packed)
    for name, module in packed:
        want = reference[name].weight
        assert (module.dequantize() - want).abs().max() <= want.abs().max() * 2**-9, name
    head = model.module.lm_head
    assert isinstance(head, Int8Linear) and head.config.group_size == 32
    assert torch.equal(head.dequantize(), smollm2.module.lm_head.weight)  # the file's Q8_0 blocks, bit for bit
    embedding = model.module.get_input_embeddings()
    assert type(embedding).__name__ == "QuantizedEmbedding" and embedding.head is head
    for text in ["THE SOFTWARE IS PROVIDED \"AS IS\"", "def f(x):\n    return x  # 2024"]:
        assert model.tokenizer(text)["input_ids"] == smollm2.tokenizer(text)["input_ids"]
    ids = smollm2.tokenizer("The license grants the right to", return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = model.module(ids).logits, smollm2.module(ids).logits
    assert (ours - theirs).abs().max() < 0.05 * theirs.abs().max()
    assert torch.equal(ours[0, -1].argmax(), theirs[0, -1].argmax())
    with torch.no_grad():  # the rows the input embedding hands out are the float model's
        assert torch.equal(embedding(ids), smollm2.module.get_input_embeddings()(ids))


def test_bad_files_are_named(monkeypatch, tmp_path):
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_bytes(b"just text")
    with pytest.raises(ValueError, match="a file, not a folder: pass the folder llmspeed.save wrote, or a GGUF file"):
        llmspeed.load(not_gguf)
    good = llmspeed.save(llmspeed.models.tiny("llama", seed=0), tmp_path / "good.gguf", format="gguf")
    with monkeypatch.context() as patch:
        patch.setitem(__import__("sys").modules, "gguf", None)  # import gguf now raises ImportError
        with pytest.raises(ImportError, match=r"pip install 'llmspeed\[gguf\]'"):
            llmspeed.load(good)
    cut = tmp_path / "cut.gguf"
    for size, why in ((good.stat().st_size // 2, "runs past the end of the file"), (100, "header is malformed")):
        cut.write_bytes(good.read_bytes()[:size])  # in the tensor data, then in the header
        with pytest.raises(ValueError, match=rf"cut.gguf is not a readable GGUF file \(.*{why}"):
            llmspeed.load(cut)
    writer = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    with pytest.raises(ValueError, match=r"GGUF architecture 'gpt2' is not read by llmspeed; it reads \['llama'"):
        llmspeed.load(tmp_path / "gpt2.gguf")
    fields = gguf_file._fields
    monkeypatch.setattr(gguf_file, "_fields", lambda c, a: {**fields(c, a), "rope.scaling.type": "yarn",
                                                            "rope.scaling.factor": 4.0})  # fmt: skip
    yarn = llmspeed.save(llmspeed.models.tiny("llama", seed=0), tmp_path / "yarn.gguf", format="gguf")
    with pytest.raises(ValueError, match=r"rope scaling 'yarn' \(llama.rope.scaling.type\) is not read by llmspeed"):
        llmspeed.load(yarn)
    monkeypatch.undo()
    write = gguf_file._tensors
    edits = {
        "missing": (lambda t: t.pop("blk.1.ffn_up.weight"), r"tensor 'blk.1.ffn_up.weight' is missing"),
        "extra": (lambda t: t.update({"blk.9.ffn_up.weight": t["blk.1.ffn_up.weight"]}),
                  r"tensors \['blk.9.ffn_up.weight'\] \(1 in all\) belong to no layer"),
        "shape": (lambda t: t.update({"blk.1.ffn_up.weight": (t["blk.1.ffn_up.weight"][0][:-1], "F32")}),
                  r"tensor 'blk.1.ffn_up.weight' is \[\d+, \d+\]; the config needs"),
    }  # fmt: skip
    for label, (edit, message) in edits.items():
        monkeypatch.setattr(gguf_file, "_tensors", lambda m, a, edit=edit: (t := write(m, a), edit(t))[0])
        path = llmspeed.save(llmspeed.models.tiny("llama", seed=0), tmp_path / f"{label}.gguf", format="gguf")
        with pytest.raises(ValueError, match=message):
            llmspeed.load(path)
