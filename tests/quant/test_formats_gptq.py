"""GPTQ folders (published layout, v1/v2, desc_act, sym/asym) -> llmspeed: the stored weights exactly, and tampering named."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import llmspeed
from llmspeed.bench.gptq_folder import dequantize_layer, write_gptq_folder
from llmspeed.quant import Int4Linear

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
WIDE = dict(hidden_size=128, intermediate_size=256)


def nll(hf) -> float:
    with torch.no_grad():
        logits = hf(input_ids=IDS).logits[:, :-1]  # [B, S-1, V]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1)).item()


def reference(folder, version):
    """The float model holding exactly the weights the GPTQ tensors stand for (decoded with explicit shifts)."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    ref = llmspeed.models.tiny("qwen2", **WIDE)
    for name, module in ref.linear_layers():
        if f"{name}.qweight" in tensors:
            module.weight.data.copy_(dequantize_layer(tensors, name, version))
    return ref


@pytest.mark.parametrize("act_order, sym, version", [(True, False, 1), (True, True, 2), (False, False, 2), (False, True, 1)])
def test_gptq_folder_loads_to_its_exact_weights(tmp_path, act_order, sym, version):
    model = llmspeed.models.tiny("qwen2", **WIDE)  # qwen2: biases on q/k/v
    write_gptq_folder(model, tmp_path, group=32, act_order=act_order, sym=sym, version=version, seed=1)
    ref = reference(tmp_path, version)
    loaded = llmspeed.load(tmp_path)
    for name, module in loaded.linear_layers():
        if name == "lm_head":
            continue
        assert isinstance(module, Int4Linear) and module.config.act_order == act_order, name
        assert module.config.symmetric == sym
        assert torch.equal(module.dequantize(), ref.hf.get_submodule(name).weight), name
    assert loaded.hf.model.layers[0].self_attn.q_proj.bias is not None
    want = nll(ref.hf)
    assert abs(nll(loaded.hf) - want) <= 1e-5 * abs(want)  # perplexity of the dequantized reference
    if act_order:  # kernels run in the packed (permuted) order; dequantize() gives the original order back
        q = loaded.hf.model.layers[0].mlp.down_proj
        assert not torch.equal(q.perm, torch.arange(q.in_features))


@pytest.mark.parametrize("act_order, sym", [(True, False), (False, True)])
def test_a_group_size_that_does_not_divide_the_width_loads_with_a_shorter_last_group(tmp_path, act_order, sym):
    """Regression: a GPTQ folder whose group size does not divide a layer's input width (SmolLM2's 576 at the usual
    128; AutoGPTQ stores ``ceil(in / group)`` groups, the last one shorter) was refused. It loads to its exact weights,
    its kernels and the fused decode step agree with them, and it saves and reloads natively."""
    from llmspeed import SamplingParams

    narrow = dict(hidden_size=96, intermediate_size=160)  # at group 64: groups of 64 + 32 and 64 + 64 + 32
    write_gptq_folder(llmspeed.models.tiny("qwen2", **narrow), tmp_path / "g", group=64, act_order=act_order, sym=sym)
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "g" / "model.safetensors"))
    ref = llmspeed.models.tiny("qwen2", **narrow)
    for name, module in ref.linear_layers():
        if f"{name}.qweight" in tensors:
            module.weight.data.copy_(dequantize_layer(tensors, name, 1))
    assert tuple(tensors["model.layers.0.mlp.down_proj.scales"].shape) == (3, 96)
    loaded = llmspeed.load(tmp_path / "g")
    for name, module in loaded.linear_layers():
        if name != "lm_head":
            assert isinstance(module, Int4Linear) and module.config.act_order == act_order, name
            assert torch.equal(module.dequantize(), ref.hf.get_submodule(name).weight), name
    want = nll(ref.hf)
    assert abs(nll(loaded.hf) - want) <= 1e-5 * abs(want)
    sampling = SamplingParams(max_new_tokens=6, temperature=0.0)
    prompts = [[1, 2, 3, 4], [9, 8, 7]]
    greedy = [o.token_ids for o in ref.generate_batched(prompts, sampling)]
    assert [o.token_ids for o in loaded.generate_batched(prompts, sampling)] == greedy
    llmspeed.save(loaded, tmp_path / "n")
    with torch.no_grad():
        assert torch.equal(llmspeed.load(tmp_path / "n").hf(input_ids=IDS).logits, loaded.hf(input_ids=IDS).logits)


def test_act_order_model_saves_natively_and_serves_adapters(tmp_path):
    from llmspeed import lora

    write_gptq_folder(llmspeed.models.tiny("llama", **WIDE), tmp_path / "g", group=64, act_order=True)
    loaded = llmspeed.load(tmp_path / "g")
    with torch.no_grad():
        want = loaded.hf(input_ids=IDS).logits
    llmspeed.save(loaded, tmp_path / "n")
    again = llmspeed.load(tmp_path / "n")
    with torch.no_grad():
        assert torch.equal(again.hf(input_ids=IDS).logits, want)
    with pytest.raises(ValueError, match="permuted input columns.*format='llmspeed'"):
        llmspeed.save(loaded, tmp_path / "ct", format="compressed-tensors")
    lora.add_adapter(again, "a", r=2, init="random")
    x = IDS.clone()
    out = again.hf(input_ids=x).logits  # gradients flow through the gathered input
    out.sum().backward()
    assert again.hf.model.layers[0].mlp.down_proj.lora_A["a"].weight.grad is not None


def _rewrite(path, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


Q = "model.layers.0.self_attn.o_proj"


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"].float()}), rf"'{Q}.qweight' is float32 \[16, 128\]; GPTQ needs int32"),
        (lambda t: t.update({f"{Q}.scales": t[f"{Q}.scales"][:2].contiguous()}), rf"'{Q}.scales' is float16 \[2, 128\]"),
        (lambda t: t.pop(f"{Q}.qzeros"), rf"'{Q}.qzeros' is missing"),
        (lambda t: t.update({f"{Q}.g_idx": torch.zeros(128, dtype=torch.int32)}), rf"'{Q}.g_idx' gives groups of unequal sizes"),
        (lambda t: t.update({f"{Q}.g_idx": ((torch.arange(128) + 16) // 32).clamp(max=3).int()}), r"unequal sizes.*last one may be shorter"),
        (lambda t: t.update({f"{Q}.g_idx": torch.full((128,), 9, dtype=torch.int32)}), rf"'{Q}.g_idx' holds groups outside"),
        (lambda t: t.update({f"{Q}.qzeros": torch.full_like(t[f"{Q}.qzeros"], -1)}), rf"'{Q}.qzeros' holds a v1 zero of 15"),
    ],
)  # fmt: skip
def test_tampered_gptq_folder_names_the_tensor(tmp_path, change, match):
    write_gptq_folder(llmspeed.models.tiny("llama", **WIDE), tmp_path, group=32, act_order=True)
    _rewrite(tmp_path / "model.safetensors", change)
    with pytest.raises(ValueError, match=match):
        llmspeed.load(tmp_path)


def test_a_sym_folder_with_other_zero_points_loads_asymmetric_and_exports_them(tmp_path):
    """``sym: true`` in the config while a layer's zero points are not 8: the layer is asymmetric (its zeros are
    kept, also by a compressed-tensors export, which drops the zero points of symmetric layers)."""
    write_gptq_folder(llmspeed.models.tiny("llama", **WIDE), tmp_path / "g", group=32, act_order=False, sym=True)
    five = torch.tensor(0x44444444, dtype=torch.int32)  # v1: every stored zero 4, so zero point 5
    _rewrite(tmp_path / "g" / "model.safetensors", lambda t: t.update({f"{Q}.qzeros": torch.full_like(t[f"{Q}.qzeros"], five)}))
    ref = reference(tmp_path / "g", 1)
    loaded = llmspeed.load(tmp_path / "g")
    layers = dict(loaded.linear_layers())
    assert not layers[Q].config.symmetric and layers["model.layers.0.self_attn.q_proj"].config.symmetric
    assert torch.equal(layers[Q].dequantize(), ref.hf.get_submodule(Q).weight)
    llmspeed.save(loaded, tmp_path / "ct", format="compressed-tensors")
    again = dict(llmspeed.load(tmp_path / "ct").linear_layers())
    assert torch.equal(again[Q].dequantize(), ref.hf.get_submodule(Q).weight)


def test_unsupported_quantization_configs_are_named(tmp_path):
    write_gptq_folder(llmspeed.models.tiny("llama", **WIDE), tmp_path, group=32)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for change, match in [({"bits": 8}, "config.json: GPTQ bits=8"), ({"group_size": True}, "group_size=True"),
                          ({"checkpoint_format": "marlin"}, "config.json: GPTQ checkpoint_format='marlin'"),
                          ({"quant_method": "bitsandbytes"}, "quant_method='bitsandbytes'.*AWQ.*llmspeed.quantize")]:  # fmt: skip
        (tmp_path / "config.json").write_text(json.dumps({**cfg, "quantization_config": {**cfg["quantization_config"], **change}}))
        with pytest.raises(ValueError, match=match):
            llmspeed.load(tmp_path)


def test_gptqmodel_dynamic_rules_give_layers_their_own_group_size(tmp_path):
    """Regression: GPTQModel's ``dynamic`` per-layer overrides (vLLM reads them) were ignored, so a layer quantized at
    another group size was refused as a tensor of the wrong shape, and one at 8 bits as a wrong-shaped qweight."""
    from safetensors.torch import load_file

    from llmspeed.bench.gptq_folder import gptq_layer

    model = llmspeed.models.tiny("llama", **WIDE)
    write_gptq_folder(model, tmp_path, group=32, act_order=True)
    wide = "model.layers.1.mlp.down_proj"  # 256 inputs: group 128 instead of 32
    layer = gptq_layer(model.hf.get_submodule(wide).weight, 128, True, False, 1, torch.Generator().manual_seed(3))
    _rewrite(tmp_path / "model.safetensors", lambda t: t.update({f"{wide}.{k}": v for k, v in layer.items()}))
    cfg = json.loads((tmp_path / "config.json").read_text())
    quant = cfg["quantization_config"]
    quant["dynamic"] = {r"-:.*\.embed_tokens": {}, r"+:model\.layers\.1\.mlp\.down": {"group_size": 128}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    loaded = dict(llmspeed.load(tmp_path).linear_layers())
    assert loaded[wide].config.group_size == 128 and loaded[Q].config.group_size == 32
    for name in (wide, Q):
        assert torch.equal(loaded[name].dequantize(), dequantize_layer(tensors, name, 1)), name
    quant["dynamic"] = {r"model\.layers\.1\.mlp\.down": {"bits": 8}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"GPTQ bits=8 \(dynamic rule 'model.*down' for layer '" + wide + r"'\); llmspeed reads 4-bit"):
        llmspeed.load(tmp_path)
    quant["dynamic"] = {r"-:.*\.mlp\.down_proj": {}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.mlp.down_proj' has GPTQ tensors, but dynamic rule"):
        llmspeed.load(tmp_path)


def test_malformed_quantization_configs_name_the_file(tmp_path):
    """Regression: a quantize_config.json (AutoGPTQ's older layout) that is not JSON gave a bare JSONDecodeError,
    and one holding a list, or a quantization_config that is not an object, an AttributeError; a bad setting in it
    named the folder only, not the file to fix."""
    write_gptq_folder(llmspeed.models.tiny("llama", **WIDE), tmp_path, group=32)
    cfg = json.loads((tmp_path / "config.json").read_text())
    quant = cfg.pop("quantization_config")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for text, match in [("{bits: 4", r"quantize_config.json is not valid JSON"),
                        ("[4, 32]", r"quantize_config.json must hold a JSON object; got a list")]:  # fmt: skip
        (tmp_path / "quantize_config.json").write_text(text)
        with pytest.raises(ValueError, match=match):
            llmspeed.load(tmp_path)
    (tmp_path / "quantize_config.json").write_text(json.dumps({**quant, "bits": "4"}))  # a bad setting: the file named
    with pytest.raises(ValueError, match=r"quantize_config.json: GPTQ bits='4'; llmspeed reads 4-bit"):
        llmspeed.load(tmp_path)
    (tmp_path / "quantize_config.json").write_text(json.dumps(quant))  # the older layout itself loads
    assert isinstance(llmspeed.load(tmp_path).hf.model.layers[0].mlp.down_proj, Int4Linear)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "quantization_config": "gptq"}))
    with pytest.raises(ValueError, match=r"config.json field quantization_config must be an object; got 'gptq'"):
        llmspeed.load(tmp_path)


@pytest.mark.slow
def test_loaded_gptq_and_compressed_tensors_models_generate_like_their_source(tmp_path):
    """Loaded folders run llmspeed's generator (continuous batching over the packed kernels) greedily like the source."""
    from llmspeed import SamplingParams

    source = llmspeed.models.tiny("llama", **WIDE)
    llmspeed.quantize(source, "int4", group_size=64, symmetric=True)
    llmspeed.save(source, tmp_path / "ct", format="compressed-tensors")
    sampling = SamplingParams(max_new_tokens=8, temperature=0.0)
    prompts = [[1, 2, 3, 4], [9, 8, 7]]
    want = [o.token_ids for o in source.generate_batched(prompts, sampling)]
    loaded = llmspeed.load(tmp_path / "ct")
    assert [o.token_ids for o in loaded.generate_batched(prompts, sampling)] == want
    write_gptq_folder(llmspeed.models.tiny("llama", **WIDE), tmp_path / "g", group=32, act_order=True)
    outs = llmspeed.load(tmp_path / "g").generate_batched(prompts, sampling)
    assert all(len(o.token_ids) == 8 for o in outs)


@pytest.mark.parametrize("dtype, stored", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_float_tensors_of_another_dtype_load_in_the_model_dtype(tmp_path, dtype, stored):
    """Regression: float tensors stored in a dtype other than config.json's kept it (a bf16 norm in an fp32 folder
    stayed bf16; fp32 ones left fp32 layers in a bf16 model). They are cast to the model's dtype, as transformers
    does, so the folder loads as the one whose tensors are all in that dtype (the values survive the casts here)."""
    model = llmspeed.models.tiny("qwen2", dtype=dtype, **WIDE)  # biases on q/k/v: a quantized layer's bias
    write_gptq_folder(model, tmp_path / "plain", group=32, act_order=True)
    write_gptq_folder(model, tmp_path / "mixed", group=32, act_order=True)
    norms = ["model.norm.weight", "model.layers.0.input_layernorm.weight"]  # ones: exact in bf16 too
    retyped = norms if stored == torch.bfloat16 else [*norms, "model.embed_tokens.weight", "lm_head.weight",
                                                      "model.layers.0.self_attn.q_proj.bias"]  # fmt: skip
    _rewrite(tmp_path / "mixed" / "model.safetensors", lambda t: t.update({n: t[n].to(stored) for n in retyped}))
    plain, mixed = llmspeed.load(tmp_path / "plain"), llmspeed.load(tmp_path / "mixed")
    a, b = plain.hf.state_dict(), mixed.hf.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert all(b[n].dtype == dtype for n in retyped)
    with torch.no_grad():
        want, got = plain.hf(input_ids=IDS).logits, mixed.hf(input_ids=IDS).logits
    upcast = llmspeed.precision.cpu_matmul.embedding_installed(mixed.hf)  # a CPU without fast bf16 GEMM: fp32 activations
    assert got.dtype == (torch.float32 if upcast else dtype) and torch.equal(got, want)
