"""``save``/``load``: bit-exact round trips, tied heads, and clear errors on foreign or damaged folders."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import llmspeed
from llmspeed.protocol import is_quantized
from llmspeed.quant import NF4Linear
from llmspeed.quant.serialize import WEIGHTS


def _state(model):
    return {k: v for k, v in model.module.state_dict().items()}


def _assert_bit_exact(a, b):
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _tamper(path, change_tensors=None, change_meta=None):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    if change_tensors:
        change_tensors(tensors)
    if change_meta:
        change_meta(meta)
    save_file(tensors, str(path), metadata=meta)


def _meta(folder):
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        return f.metadata()


UP = "model.layers.0.mlp.up_proj"


@pytest.mark.parametrize("fmt, kwargs", [("int8", {}), ("int4", {"group_size": 32}), ("nf4", {"double_quant": True}),
                                         ("nf4", {"group_size": 48, "skip": []})])  # fmt: skip
def test_round_trip_is_bit_exact(tmp_path, llama, fmt, kwargs):
    llmspeed.quantize(llama, fmt, **kwargs)
    llmspeed.save(llama, tmp_path)
    loaded = llmspeed.load(tmp_path)
    assert not any(m.training for m in loaded.hf.modules())  # inference mode, as from_pretrained returns it
    _assert_bit_exact(llama, loaded)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(llama.hf(ids).logits, loaded.hf(ids).logits)
    q = {n: type(m) for n, m in llama.linear_layers()}
    assert q == {n: type(m) for n, m in loaded.linear_layers()}


@pytest.mark.parametrize("dtype, fmt", [("bf16", None), ("bf16", "int8"), ("fp16", "int4"), ("bf16", "nf4")])
def test_16_bit_models_load_with_their_cast_hooks(tmp_path, llama, dtype, fmt):
    from llmspeed.precision import Fp16OverflowError, cpu_matmul

    llmspeed.cast(llama, dtype)
    if fmt is not None:
        llmspeed.quantize(llama, fmt, lm_head=None)  # the float head keeps a cast hook
    llmspeed.save(llama, tmp_path)
    loaded = llmspeed.load(tmp_path)
    _assert_bit_exact(llama, loaded)  # norms come back in fp32, the rest in 16 bits
    ids = torch.arange(1, 17)[None]  # [1, 16]: past the CPU matmul crossover on most machines
    with torch.no_grad():  # without the norms' rounding hooks the next 16-bit matmul gets fp32 inputs and fails
        assert torch.equal(llama.hf(ids).logits, loaded.hf(ids).logits)
    assert cpu_matmul.installed(loaded.hf) == cpu_matmul.installed(llama.hf) > 0
    if dtype == "fp16":  # the overflow check comes back too
        with torch.no_grad():
            mlp = loaded.hf.model.layers[0].mlp  # int4: scales 6e4 make activations past 65504
            mlp.up_proj.scales.fill_(6e4)
            mlp.down_proj.scales.fill_(6e4)
        with pytest.raises(Fp16OverflowError):  # gradient mode: fp16 activations (inference runs fp32 here)
            loaded.hf(ids)


@pytest.mark.parametrize("fmt", ["llmspeed", "compressed-tensors"])
def test_loaded_tensors_are_aligned_for_the_aten_kernels(tmp_path, fmt):
    """Regression: load kept the memory-mapped views safetensors returns, 8-byte aligned; the bf16 model with
    rotated down projections (whose metadata shifts every tensor) put its int8 head's weight 8 bytes off a 32-byte
    boundary, and torch._weight_int8pack_mm, which auto picks for that head, crashed the process."""
    from llmspeed.quant.formats.skeleton import ALIGN
    from llmspeed.quant.kernels import KERNELS

    model = llmspeed.models.tiny("llama", seed=0, dtype="bf16")
    llmspeed.quantize(model, "int4", 32, symmetric=fmt != "llmspeed", hadamard_layers=["*.mlp.down_proj"])
    loaded = llmspeed.load(llmspeed.save(model, tmp_path, format=fmt))
    assert [k for k, v in _state(loaded).items() if v.data_ptr() % ALIGN] == []
    head = dict(loaded.linear_layers())["lm_head"]
    x = torch.randn(32, head.in_features).bfloat16()  # [32, hidden]
    if fmt == "llmspeed" and KERNELS["aten_int8"].why_not(head, x) is None:
        y, ref = KERNELS["aten_int8"].run(head, x).float(), KERNELS["reference"].run(head, x).float()  # [32, vocab]
        assert (y - ref).norm() / ref.norm() < 1e-2  # bf16 rounding only
    ids = torch.arange(1, 17)[None]  # [1, 16]
    # load attaches what a 16-bit model runs with (on a CPU without fast bf16 GEMM: fp32 activations); the same here
    llmspeed.precision.attach(model, "bf16")
    with torch.no_grad():  # compressed-tensors writes the head in float: its rounding differs
        torch.testing.assert_close(loaded.hf(ids).logits, model.hf(ids).logits, **({} if fmt == "llmspeed" else
                                   dict(rtol=0, atol=1e-2)))  # fmt: skip


def test_tied_head_stays_tied_and_float_model_works(tmp_path):
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = llmspeed.wrap(transformers.AutoModelForCausalLM.from_config(config).eval())
    llmspeed.save(model, tmp_path / "float")
    llmspeed.quantize(model, "int4", group_size=32, lm_head=None)
    llmspeed.save(model, tmp_path / "q")
    for sub in ("float", "q"):
        loaded = llmspeed.load(tmp_path / sub)
        assert loaded.hf.lm_head.weight is loaded.hf.model.embed_tokens.weight
    _assert_bit_exact(model, loaded)


def test_tokenizer_and_quant_config_are_saved(tmp_path, llama):
    llmspeed.quantize(llama, "nf4", group_size=32)
    llmspeed.save(llama, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / WEIGHTS), "pt") as f:
        meta = f.metadata()
    quant = json.loads(meta["quantization"])
    assert quant["model.layers.0.mlp.up_proj"]["group_size"] == 32 and meta["format"] == "llmspeed"
    assert isinstance(llmspeed.load(tmp_path).hf.model.layers[0].mlp.up_proj, NF4Linear)


def test_the_tokenizer_travels_with_the_folder(tmp_path):
    from llmspeed.models.embedded import tokenizer

    tok = tokenizer()
    model = llmspeed.wrap(llmspeed.models.tiny("llama", vocab_size=len(tok)).hf, tok)
    llmspeed.quantize(model, "int8")
    llmspeed.save(model, tmp_path)
    loaded = llmspeed.load(tmp_path)
    assert loaded.tokenizer is not None and loaded.tokenizer("Hello there").input_ids == tok("Hello there").input_ids


@pytest.mark.parametrize("fmt", ["llmspeed", "compressed-tensors"])
def test_a_chat_template_an_earlier_save_left_does_not_come_back_with_a_tokenizer_without_one(tmp_path, fmt):
    """Regression: saving a model whose tokenizer has no chat template over a folder an earlier save with a template
    wrote left ``chat_template.jinja`` there, and load gave the tokenizer that old template (chat requests then
    rendered with a template the saved model never had)."""
    import copy

    from llmspeed.models.embedded import tokenizer

    tok = tokenizer()
    assert tok.chat_template
    model = llmspeed.wrap(llmspeed.models.tiny("llama", vocab_size=len(tok)).hf, tok)
    llmspeed.quantize(model, "int8")
    llmspeed.save(model, tmp_path, format=fmt)
    assert (tmp_path / "chat_template.jinja").is_file()
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    other = llmspeed.wrap(llmspeed.models.tiny("llama", vocab_size=len(tok), seed=1).hf, plain)
    llmspeed.quantize(other, "int8")
    llmspeed.save(other, tmp_path, format=fmt)
    assert llmspeed.load(tmp_path).tokenizer.chat_template is None
    llmspeed.save(model, tmp_path, format=fmt)  # and a template saved again comes back
    assert llmspeed.load(tmp_path).tokenizer.chat_template == tok.chat_template


def test_a_tokenizer_an_earlier_save_left_is_named_at_load(tmp_path):
    """Regression: saving a model without a tokenizer over a folder that held another model and its tokenizer left the
    tokenizer there; load then failed with "pass the tokenizer that was saved with this model", which load cannot take."""
    from transformers import AutoTokenizer

    source = llmspeed.models.smollm2()
    source.tokenizer.save_pretrained(tmp_path)  # what an earlier llmspeed.save of SmolLM2 leaves besides its weights
    assert len(AutoTokenizer.from_pretrained(tmp_path)) > 256
    llmspeed.save(llmspeed.models.tiny("llama", seed=0), tmp_path)  # vocabulary 256, no tokenizer
    with pytest.raises(ValueError, match=r"holds a tokenizer \(tokenizer_config.json\) that does not fit the model in "
                                         r"it \(tokenizer does not match the model: it has 49152 tokens.*delete the "
                                         r"folder's tokenizer files"):
        llmspeed.load(tmp_path)


def test_parameters_that_are_views_of_one_storage_round_trip(tmp_path):
    """Two weights sliced from one fused tensor (same storage, other offsets: what splitting a fused k/v weight into
    views gives) are two tensors in the file, not an alias of the first."""
    model = llmspeed.models.tiny("llama")
    attn = model.hf.model.layers[0].self_attn
    kv = torch.randn(2 * attn.k_proj.out_features, attn.k_proj.in_features)
    k, v = kv.chunk(2)  # same shape, same storage, different offsets
    attn.k_proj.weight, attn.v_proj.weight = torch.nn.Parameter(k), torch.nn.Parameter(v)
    llmspeed.save(model, tmp_path)
    assert json.loads(_meta(tmp_path)["aliases"]) == {}
    loaded = llmspeed.load(tmp_path).hf.model.layers[0].self_attn
    assert torch.equal(loaded.k_proj.weight, k) and torch.equal(loaded.v_proj.weight, v)


def test_quantization_metadata_naming_no_linear_position_is_named(tmp_path, llama):
    llmspeed.quantize(llama, "int8")

    def add(name):
        def change(meta):
            quant = json.loads(meta["quantization"])
            quant[name] = quant[UP]
            meta["quantization"] = json.dumps(quant)

        return change

    for name in ("model.layers.0.mlp.nowhere", "model.norm"):
        llmspeed.save(llama, tmp_path)
        _tamper(tmp_path / WEIGHTS, change_meta=add(name))
        with pytest.raises(ValueError, match=rf"quantized layer '{name}' is not a linear position of this architecture"):
            llmspeed.load(tmp_path)


def test_a_transformers_model_is_saved_like_its_wrapper(tmp_path, llama):
    with pytest.raises(TypeError, match="model must be an llmspeed.Model .*; got builtins.NoneType"):
        llmspeed.save(None, tmp_path)
    llmspeed.save(llama.hf, tmp_path)
    _assert_bit_exact(llmspeed.load(tmp_path), llama)


@pytest.mark.parametrize("fmt", ["llmspeed", "compressed-tensors"])
@pytest.mark.parametrize(
    "change, match",
    [
        (lambda m: llmspeed.lora.add_adapter(llmspeed.quantize(m, "int4", symmetric=True), "a", r=4), "carries LoRA"),
        (lambda m: llmspeed.qat.prepare(m, "int8"), r"prepared for quantization-aware training.*call llmspeed.qat.convert"),
    ],
    ids=["lora", "qat"],
)
def test_a_model_load_cannot_rebuild_is_refused_before_writing(tmp_path, llama, fmt, change, match):
    change(llama)
    with pytest.raises(ValueError, match=match):
        llmspeed.save(llama, tmp_path / "out", format=fmt)
    assert not (tmp_path / "out").exists()


def test_transformers_refuses_native_folder_naming_llmspeed(tmp_path, llama):
    # regression: from_pretrained "succeeded" with every quantized linear missing and randomly initialised
    llmspeed.quantize(llama, "int4", group_size=32)
    llmspeed.save(llama, tmp_path)
    with pytest.raises(ValueError, match=r"llmspeed-native.*llmspeed.load\(path\).*format='compressed-tensors'"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded = llmspeed.load(tmp_path)  # llmspeed still loads it, and saving again keeps the marker
    llmspeed.save(loaded, tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())
    assert cfg["quantization_config"]["llmspeed_format"] == "llmspeed"


@pytest.mark.parametrize("fmt", ["llmspeed", "compressed-tensors"])
def test_save_into_a_file_or_load_a_non_path_names_the_argument(tmp_path, llama, fmt):
    """mkdir's bare FileExistsError / NotADirectoryError and pathlib's TypeError become errors naming directory."""
    file = tmp_path / "model.bin"
    file.write_bytes(b"keep")
    for target in (file, file / "sub"):
        with pytest.raises(ValueError, match=rf"directory must be a folder .*got '{target}', but '{file}' is a file"):
            llmspeed.save(llama, target, format=fmt)
    assert file.read_bytes() == b"keep"
    for bad in (None, 3):
        with pytest.raises(TypeError, match=rf"directory must be a folder path \(a str or pathlib.Path\); got {bad}"):
            llmspeed.load(bad)
        with pytest.raises(TypeError, match="directory must be a folder path"):
            llmspeed.save(llama, bad, format=fmt)


@pytest.mark.parametrize("fmt", ["llmspeed", "compressed-tensors"])
def test_generation_config_travels_with_the_folder(tmp_path, llama, fmt):
    """Regression: generation_config.json (eos ids, sampling defaults) was neither written nor read, so a loaded
    or exported model stopped on config.json's eos only and lost the checkpoint's sampling defaults."""
    llama.hf.generation_config.eos_token_id = [3, 7]  # e.g. an instruct model's end-of-turn ids
    llama.hf.generation_config.update(do_sample=True, temperature=0.6)
    llama.hf.save_pretrained(tmp_path / "hf")
    read = llmspeed.models.from_pretrained(tmp_path / "hf").hf.generation_config  # quantize-while-loading reader
    assert read.eos_token_id == [3, 7] and read.temperature == 0.6
    llmspeed.quantize(llama, "int4", group_size=32, symmetric=True)
    llmspeed.save(llama, tmp_path / fmt, format=fmt)
    loaded = llmspeed.load(tmp_path / fmt).hf.generation_config
    assert loaded.eos_token_id == [3, 7] and loaded.temperature == 0.6
    if fmt == "compressed-tensors":  # what transformers (and vLLM) read from the export
        pytest.importorskip("compressed_tensors")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / fmt)
        assert hf.generation_config.eos_token_id == [3, 7] and hf.generation_config.temperature == 0.6


@pytest.mark.parametrize("fmt", ["llmspeed", "compressed-tensors"])
def test_saving_over_a_sharded_folder_removes_its_index_and_shards(tmp_path, llama, fmt):
    """Regression: saving into a folder that held a sharded checkpoint left model.safetensors.index.json and its
    shards beside the new model.safetensors; a reader that follows the index (vLLM filters the safetensors files
    by it) would load the stale weights. They go, as save_pretrained cleans up; other files stay."""
    folder = tmp_path / "out"
    llama.hf.save_pretrained(folder, max_shard_size="100KB")  # an earlier sharded save of the float model
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (folder / "model.safetensors").exists()
    (folder / "notes.txt").write_text("mine")
    llmspeed.quantize(llama, "int4", group_size=32, symmetric=True)
    llmspeed.save(llama, folder, format=fmt)
    assert not (folder / "model.safetensors.index.json").exists()
    assert not any((folder / s).exists() for s in shards)
    assert (folder / "notes.txt").read_text() == "mine"
    loaded = llmspeed.load(folder)  # the new quantized weights, not the float shards
    assert is_quantized(loaded.hf.model.layers[0].mlp.down_proj)
    if fmt == "llmspeed":  # read back bit-exact
        ids = torch.tensor([[1, 5, 9, 2]])
        with torch.no_grad():
            assert torch.equal(loaded.hf(input_ids=ids).logits, llama.hf(input_ids=ids).logits)


def test_saving_over_an_index_deletes_no_file_outside_the_folder(tmp_path, llama):
    """A weights index is cleaned up with the shards it names, but only plain shard names of the folder itself: an
    index naming '../other.safetensors' or 'sub/x.safetensors' (or the new weights file) deletes none of them."""
    folder, outside = tmp_path / "out", tmp_path / "other.safetensors"
    (folder / "sub").mkdir(parents=True)
    kept = [outside, folder / "sub" / "x.safetensors", folder / "notes.txt"]
    for path in kept:
        path.write_text("mine")
    weight_map = {"a": "../other.safetensors", "b": "sub/x.safetensors", "c": "notes.txt", "d": "s-1.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "s-1.safetensors").write_text("stale")
    llmspeed.save(llama, folder)
    assert all(path.read_text() == "mine" for path in kept)
    assert not (folder / "s-1.safetensors").exists() and not (folder / "model.safetensors.index.json").exists()
    assert (folder / WEIGHTS).is_file()
