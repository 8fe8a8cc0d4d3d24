"""compressed-tensors folders llmspeed cannot read, or that were tampered with: refused by name, before any layer
changes (formats, schemes, sparsity, quantized KV caches, malformed groups, tensors of the wrong shape or dtype)."""

from __future__ import annotations

import json

import pytest
import torch

import llmspeed
from llmspeed import lora
from llmspeed.quant import Int4Linear
from llmspeed.quant.formats import ct_load  # load() looks read_all up there

pytest.importorskip("compressed_tensors")
from .test_formats_compressed_tensors import WIDE, _reads_or_refuses, _rewrite, _write_with_package  # noqa: E402


def test_a_packed_layer_no_config_group_targets_is_refused_by_name(tmp_path):
    model = llmspeed.models.tiny("llama", **WIDE)
    llmspeed.quantize(model, "int8", include=["*.mlp.*"], lm_head=None)
    llmspeed.save(model, tmp_path, format="compressed-tensors")  # one group, on "Linear"
    cfg = json.loads((tmp_path / "config.json").read_text())
    groups = cfg["quantization_config"]["config_groups"]
    groups["group_1"] = {**groups["group_0"], "targets": ["re:.*self_attn.*"]}  # a second group: targets are read
    groups["group_0"]["targets"] = [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "down")]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="layer 'model.layers.0.mlp.up_proj' has packed weights but no config group"):
        llmspeed.load(tmp_path)


@pytest.mark.parametrize("targets, match", [
    (["re:.*mlp.*"], "layer 'model.layers.0.self_attn.k_proj' has packed weights but no config group targets it"),
    (["model.layers.0.mlp.up_proj", "model.layers.9.mlp.up_proj"],
     "config group 'group_0' has target 'model.layers.9.mlp.up_proj'; it matches no linear layer of the model"),
    (["Linear", "Embedding"], "config group 'group_0' has target 'Embedding'; it matches no linear layer"),
    (["re:.*(mlp"], r"config group 'group_0' has target 're:.*\(mlp'; it is no regular expression \(missing \)"),
    ([], r"config group 'group_0' has targets \[\]; llmspeed reads a non-empty list of 'Linear'"),
    ("Linear", "config group 'group_0' has targets 'Linear'; llmspeed reads a non-empty list"),
])  # fmt: skip
def test_the_targets_of_a_single_config_group_are_read_and_unsupported_ones_named(tmp_path, monkeypatch, targets,
                                                                                  match):  # fmt: skip
    """Regression: with one config group its targets were never read, so a group naming layers the model lacks, a
    class llmspeed does not quantize, a broken pattern or layers other than the stored ones loaded silently."""
    model = llmspeed.models.tiny("llama", **WIDE)
    llmspeed.quantize(model, "int8", lm_head=None)
    llmspeed.save(model, tmp_path, format="compressed-tensors")  # one group, on "Linear"
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["targets"] = targets
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    if "packed weights" not in match:
        monkeypatch.setattr(ct_load, "read_all", lambda directory: pytest.fail("tensors read before the targets were checked"))
    with pytest.raises(ValueError, match=match):
        llmspeed.load(tmp_path)


def test_other_compressed_tensors_formats_are_refused_by_name(tmp_path):
    """Regression: a naive-quantized folder (int8 codes in ``weight``) failed on its first ``weight_scale`` with
    "matches no parameter or buffer of the model", as if the folder were damaged or for another model."""
    _write_with_package(tmp_path, True, 8, None, fmt="naive-quantized")
    with pytest.raises(ValueError, match="config group 'group_0' is in compressed-tensors format 'naive-quantized'; "
                                         "llmspeed reads 'pack-quantized'.*call llmspeed.quantize"):  # fmt: skip
        llmspeed.load(tmp_path)


@pytest.mark.parametrize("edit, match", [
    (lambda g: g.update(input_activations={"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}),
     "config group 'group_0' quantizes activations too"),
    (lambda g: g["weights"].update(num_bits=2), "config group 'group_0' has num_bits=2, strategy='group'"),
    (lambda g: g["weights"].update(actorder="group"), "config group 'group_0' has weights type='int', actorder='group'"),
    (lambda g: g.update(output_activations={"num_bits": 8, "type": "int", "strategy": "tensor"}),
     "config group 'group_0' quantizes activations too"),
    (lambda g: g["weights"].update(type="float"), "config group 'group_0' has weights type='float'"),
    (lambda g: g["weights"].update(num_bits=8, strategy="channel", group_size=None, symmetric=False),
     "config group 'group_0' has num_bits=8, strategy='channel', symmetric=False"),  # zero points llmspeed would drop
    (lambda g: g["weights"].update(strategy="tensor"), "config group 'group_0' has num_bits=4, strategy='tensor'"),
])  # fmt: skip
def test_schemes_llmspeed_cannot_read_are_refused_before_any_tensor_is_read(tmp_path, monkeypatch, edit, match):
    """Regression: a pack-quantized group with quantized activations (W4A8), another bit width or a stored g_idx was
    refused only for its first layer, after every tensor of every shard had been read into memory."""
    model = llmspeed.models.tiny("llama", **WIDE)
    llmspeed.quantize(model, "int4", group_size=64, symmetric=True, lm_head=None)
    llmspeed.save(model, tmp_path, format="compressed-tensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    edit(cfg["quantization_config"]["config_groups"]["group_0"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))

    def read_all(directory):
        raise AssertionError("tensors were read before the scheme was checked")

    monkeypatch.setattr(ct_load, "read_all", read_all)
    with pytest.raises(ValueError, match=match):
        llmspeed.load(tmp_path)


def test_fields_left_to_compressed_tensors_defaults_or_to_the_group_load_as_the_package_reads_them(tmp_path):
    """A weights scheme without ``symmetric`` is symmetric (``QuantizationArgs``' default), and a group's own
    ``format`` wins over the top-level one (``"mixed-precision"`` when groups are in different formats)."""
    model = llmspeed.models.tiny("llama", **WIDE)
    llmspeed.quantize(model, "int4", group_size=64, symmetric=True, lm_head=None)
    llmspeed.save(model, tmp_path, format="compressed-tensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    quant = cfg["quantization_config"]
    del quant["config_groups"]["group_0"]["weights"]["symmetric"]
    quant["format"] = "mixed-precision"
    assert quant["config_groups"]["group_0"]["format"] == "pack-quantized"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    back = llmspeed.load(tmp_path)
    assert back.hf.model.layers[0].mlp.up_proj.config.symmetric
    a, b = model.hf.state_dict(), back.hf.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _write_sparse_bitmask(path):
    """A sparse-only folder as compressed-tensors' bitmask compressor wrote them (0.20 writes none any more): each
    linear weight as ``weight.compressed`` (nonzero values), ``weight.bitmask``, ``weight.shape``, ``weight.row_offsets``."""
    import numpy as np
    from compressed_tensors.config import BitmaskConfig
    from safetensors.torch import save_file

    model = llmspeed.models.tiny("llama", **WIDE)
    model.hf.save_pretrained(path)
    tensors = {k: v.contiguous() for k, v in model.hf.state_dict().items() if not k.endswith("proj.weight")}
    for name, linear in model.linear_layers():
        if name != "lm_head":
            w = linear.weight.detach()  # [out, in]
            mask = w.abs() > w.abs().median()  # half the weights kept
            tensors[f"{name}.weight.compressed"] = w[mask]
            tensors[f"{name}.weight.bitmask"] = torch.from_numpy(np.packbits(mask.numpy(), axis=-1, bitorder="little"))
            tensors[f"{name}.weight.shape"] = torch.tensor(list(w.shape), dtype=torch.int32)
            tensors[f"{name}.weight.row_offsets"] = (mask.sum(1).cumsum(0) - mask.sum(1)).to(torch.int32)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    sparsity = BitmaskConfig(global_sparsity=0.5, targets=["Linear"], ignore=["lm_head"]).model_dump()
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "version": "0.9.1", "sparsity_config": sparsity}
    (path / "config.json").write_text(json.dumps(cfg))


def test_sparse_compressed_tensors_folders_are_refused_by_name(tmp_path):
    """Regression: a sparse-bitmask folder failed with "tensor '...weight.compressed' matches no parameter or buffer
    of the model", as if damaged, and a sparse-24-bitmask config over pack-quantized groups was not looked at."""
    from compressed_tensors.config import Sparse24BitMaskConfig

    accepted = r"which llmspeed does not support; it reads dense compressed-tensors folders \('pack-quantized' int4 and int8 weights, " \
               r"sparsity_config empty or 'dense'\).*call llmspeed.quantize"  # fmt: skip
    _write_sparse_bitmask(tmp_path / "bitmask")
    with pytest.raises(ValueError, match=r"sparsity_config format 'sparse-bitmask' \(sparse weights.*" + accepted):
        llmspeed.load(tmp_path / "bitmask")
    model = llmspeed.models.tiny("llama", **WIDE)
    llmspeed.quantize(model, "int4", group_size=64, symmetric=True, lm_head=None)
    llmspeed.save(model, tmp_path / "24", format="compressed-tensors")
    cfg = json.loads((tmp_path / "24" / "config.json").read_text())
    for sparsity, match in [(Sparse24BitMaskConfig(targets=["Linear"]).model_dump(), "'sparse-24-bitmask'"),
                            ("sparse-bitmask", "'sparse-bitmask'"), (None, None), ({"format": "dense"}, None)]:  # fmt: skip
        cfg["quantization_config"]["sparsity_config"] = sparsity
        (tmp_path / "24" / "config.json").write_text(json.dumps(cfg))
        if match is None:  # no sparsity, or dense tensors: read as before
            assert isinstance(llmspeed.load(tmp_path / "24").hf.model.layers[0].mlp.up_proj, Int4Linear)
            continue
        with pytest.raises(ValueError, match=f"sparsity_config format {match}.*{accepted}"):
            llmspeed.load(tmp_path / "24")


def test_expert_sparsity_is_refused_by_name(tmp_path):
    """Regression: a ``moe_sparsity_config`` (compressed-tensors' ``ExpertSparsityConfig``: experts pruned per layer)
    was not looked at; one that counts no experts (every layer dense) reads as before."""
    from compressed_tensors.config.expert_sparsity import ExpertSparsityConfig

    model = llmspeed.models.tiny("llama", **WIDE)
    llmspeed.quantize(model, "int4", group_size=64, symmetric=True, lm_head=None)
    llmspeed.save(model, tmp_path, format="compressed-tensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    layers = cfg["num_hidden_layers"]
    for experts, refused in [([2] + [None] * (layers - 1), True), ([None] * layers, False)]:
        moe = ExpertSparsityConfig(method="prune", num_experts=experts).model_dump()
        (tmp_path / "config.json").write_text(json.dumps({**cfg, "quantization_config": {
            **cfg["quantization_config"], "moe_sparsity_config": moe}}))  # fmt: skip
        _reads_or_refuses(tmp_path, refused, r"moe_sparsity_config \(experts pruned or merged per layer, method "
                                             r"'prune'\), which llmspeed does not support")  # fmt: skip


def test_a_quantized_kv_cache_is_refused_by_name(tmp_path):
    """Regression: a folder with a ``kv_cache_scheme`` (an fp8 KV cache, ``k_scale``/``v_scale`` stored per layer)
    failed with "tensor '...k_scale' matches no parameter or buffer of the model", as if it were damaged."""
    from safetensors.torch import load_file, save_file

    model = llmspeed.models.tiny("llama", **WIDE)
    llmspeed.quantize(model, "int4", group_size=64, symmetric=True, lm_head=None)
    llmspeed.save(model, tmp_path, format="compressed-tensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                     "dynamic": False, "symmetric": True}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(tmp_path / "model.safetensors")
    for i in range(cfg["num_hidden_layers"]):
        for kv in "kv":
            tensors[f"model.layers.{i}.self_attn.{kv}_scale"] = torch.ones(())
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"has a kv_cache_scheme \(\{'num_bits': 8.*which llmspeed does not apply"):
        llmspeed.load(tmp_path)


def test_malformed_config_groups_name_the_file(tmp_path):
    """Regression: config_groups that were a list, or a group or its weights that were not objects, raised a bare
    AttributeError ("'list' object has no attribute 'items'")."""
    model = llmspeed.models.tiny("llama", **WIDE)
    llmspeed.quantize(model, "int4", group_size=64, symmetric=True, lm_head=None)
    llmspeed.save(model, tmp_path, format="compressed-tensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    group = cfg["quantization_config"]["config_groups"]["group_0"]
    for groups in ([group], {"group_0": "int4"}, {"group_0": {**group, "weights": [4]}}):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, "quantization_config": {
            **cfg["quantization_config"], "config_groups": groups}}))  # fmt: skip
        with pytest.raises(ValueError, match=r"config.json field quantization_config.config_groups must map group "
                                             r"names to objects \(each with a 'weights' object\); got"):  # fmt: skip
            llmspeed.load(tmp_path)


# --- refusals and tampered files ---------------------------------------------------------------------
def _permute_one_layer(model):
    """An int4 model with one GPTQ act-order layer (``act_order=True``: input columns permuted in the packing)."""
    from llmspeed.quant import QuantConfig

    llmspeed.quantize(model, "int4", group_size=16)
    name = "model.layers.0.mlp.up_proj"
    layer = model.hf.get_submodule(name)
    cfg = QuantConfig("int4", 16, act_order=True)
    model.replace_linear(name, Int4Linear.from_codes(layer.codes(), layer.scales, layer.zeros, config=cfg))


@pytest.mark.parametrize(
    "prepare, match",
    [
        (lambda m: llmspeed.quantize(m, "nf4"), "NF4.*format='int4'"),
        (lambda m: llmspeed.quantize(m, "int4", method="hqq"), "fractional zero points.*method='rtn'"),
        (lambda m: (llmspeed.quantize(m, "int4"), lora.add_adapter(m, "a", r=2)), "LoRA.*save_adapter"),
        (lambda m: llmspeed.quantize(m, "int4", activations="int8"), "activations='int8'.*activations='float'"),
        (_permute_one_layer, "permuted input columns.*keep format='llmspeed'"),
        (lambda m: None, "no quantized layer"),
    ],
)
def test_what_the_format_cannot_hold_is_refused(tmp_path, llama, prepare, match):
    prepare(llama)
    with pytest.raises(ValueError, match=match):
        llmspeed.save(llama, tmp_path / "out", format="compressed-tensors")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="format must be one of"):
        llmspeed.save(llama, tmp_path / "x", format="awq")


def test_partial_groups_are_refused_with_a_group_size_that_fits(tmp_path):
    model = llmspeed.models.tiny("llama", hidden_size=96, intermediate_size=192)  # 96 = 1.5 groups of 64
    llmspeed.quantize(model, "int4", group_size=64)
    with pytest.raises(ValueError, match="in_features=96, not a multiple of group_size=64"):
        llmspeed.save(model, tmp_path, format="compressed-tensors")


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t: t.update({"model.layers.0.mlp.up_proj.weight_packed": t["model.layers.0.mlp.up_proj.weight_packed"].float()}),
         r"'model.layers.0.mlp.up_proj.weight_packed' is float32.*int32"),
        (lambda t: t.update({"model.layers.1.self_attn.o_proj.weight_scale": t["model.layers.1.self_attn.o_proj.weight_scale"][:, :1].contiguous()}),
         r"'model.layers.1.self_attn.o_proj.weight_scale' is float32 \[128, 1\]"),
        (lambda t: t.pop("model.layers.0.mlp.down_proj.weight_zero_point"), r"'model.layers.0.mlp.down_proj.weight_zero_point' is missing"),
        (lambda t: t.update({"model.norm.weight": torch.ones(3)}), r"'model.norm.weight' is float32 \[3\]"),
        (lambda t: t.update({"model.layers.0.mlp.up_proj.weight_shape": torch.tensor([256, 64])}),
         r"tensor 'model.layers.0.mlp.up_proj.weight_shape' is \[256, 64\]; the layer is \[256, 128\]"),
        (lambda t: t.update({"model.layers.0.mlp.gate.weight_packed": t["model.layers.0.mlp.up_proj.weight_packed"].clone()}),
         r"tensor 'model.layers.0.mlp.gate.weight_packed' names no linear layer of the model"),
    ],
)  # fmt: skip
def test_tampered_compressed_tensors_folder_names_the_tensor(tmp_path, change, match):
    model = llmspeed.models.tiny("llama", **WIDE)
    llmspeed.quantize(model, "int4", group_size=64)
    llmspeed.save(model, tmp_path, format="compressed-tensors")
    _rewrite(tmp_path / "model.safetensors", change)
    with pytest.raises(ValueError, match=match):
        llmspeed.load(tmp_path)


def _with_metadata(path, change_tensors, change_metadata=lambda m: None):
    """Rewrite ``path`` keeping its metadata (``_rewrite`` drops it), both changed in place by the callables."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    change_tensors(tensors)
    change_metadata(metadata)
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize("record, match", [
    ("{not json", "Expecting property name"),
    ('{"layer": "lm_head", "embedding": null, "config": {"format": "int8"}, "scales": "@@"}', "Only base64 data"),
    ('{"layer": "lm_head", "embedding": null, "config": {"format": "int4"}, "scales": ""}', "format 'int4'"),
    ('{"layer": "lm_head"}', "'embedding'"),
])  # fmt: skip
def test_an_unreadable_int8_head_record_is_refused_by_name(tmp_path, record, match):
    """The metadata from which load rebuilds the int8 head, damaged, is named with the file (not a KeyError)."""
    from llmspeed.quant.formats import ct_head

    model = llmspeed.models.tiny("llama", **WIDE)
    llmspeed.quantize(model, "int4", group_size=64)
    llmspeed.save(model, tmp_path, format="compressed-tensors")
    _with_metadata(tmp_path / "model.safetensors", lambda t: None, lambda m: m.update({ct_head.KEY: record}))
    with pytest.raises(ValueError, match=rf"model.safetensors.*metadata 'llmspeed.int8_head' is unreadable.*{match}"):
        llmspeed.load(tmp_path)


def test_head_rows_edited_after_the_export_load_as_stored(tmp_path):
    """Rows that the recorded scales do not reproduce (the head edited in the file) load as the file holds them:
    a float head with those rows, not an int8 head rounded from them."""
    model = llmspeed.models.tiny("llama", **WIDE)
    llmspeed.quantize(model, "int4", group_size=64)
    llmspeed.save(model, tmp_path, format="compressed-tensors")
    edited = model.hf.lm_head.dequantize() * 1.001  # [vocab, hidden]
    _with_metadata(tmp_path / "model.safetensors", lambda t: t.update({"lm_head.weight": edited}))
    back = llmspeed.load(tmp_path)
    assert isinstance(back.hf.lm_head, torch.nn.Linear) and torch.equal(back.hf.lm_head.weight, edited)
