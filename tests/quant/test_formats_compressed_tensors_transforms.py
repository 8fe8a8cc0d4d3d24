"""compressed-tensors transforms both ways: llmspeed's ``hadamard_layers`` exported as a ``transform_config`` that
transformers and compressed-tensors apply (golden against llmspeed's logits) and read back, and transforms
llmspeed cannot apply refused by name before loading."""

from __future__ import annotations

import json

import pytest
import torch

import llmspeed

pytest.importorskip("compressed_tensors")
from transformers import AutoModelForCausalLM  # noqa: E402

from .test_formats_compressed_tensors import WIDE, _reads_or_refuses, logits  # noqa: E402


def test_folders_with_transforms_are_refused_by_name(tmp_path):
    """Regression: a transform_config (SpinQuant/QuIP rotations, written by compressed-tensors' TransformConfig) was
    not looked at, so such a folder loaded without error as a different model (weights in the rotated basis)."""
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    model = llmspeed.models.tiny("llama", **WIDE)
    llmspeed.quantize(model, "int4", group_size=64, symmetric=True, lm_head=None)
    llmspeed.save(model, tmp_path, format="compressed-tensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    rotation = TransformConfig(config_groups={"R1": TransformScheme(
        type="hadamard", apply=[TransformArgs(targets=["Linear"], location="input")])}).model_dump(mode="json")  # fmt: skip
    for transforms, refused in [(rotation, True), ({}, False), (None, False), ({"config_groups": {}}, False)]:
        cfg["quantization_config"]["transform_config"] = transforms
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        _reads_or_refuses(tmp_path, refused, r"has a transform_config llmspeed cannot apply \(group 'R1' has "
                                             r"head_dim=None.*call llmspeed.quantize")  # fmt: skip


# --- hadamard_layers <-> transform_config ----------------------------------------------------------
def _rotated_export(tmp_path, group=64):
    model = llmspeed.models.tiny("llama", **WIDE)
    llmspeed.quantize(model, "int4", group_size=group, symmetric=True, lm_head=None, hadamard_layers=["*.mlp.down_proj"])
    llmspeed.save(model, tmp_path, format="compressed-tensors")
    return model, json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("group", [32, 64])
def test_rotated_layers_export_as_compressed_tensors_hadamard_transforms(tmp_path, group):
    """Golden: transformers decompresses the weights (stored rotated) and compressed-tensors' own Hadamard transform,
    applied online at the inputs the file names (as vLLM applies it), gives llmspeed's logits."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config

    model, cfg = _rotated_export(tmp_path, group)
    transforms = TransformConfig.model_validate(cfg["quantization_config"]["transform_config"])  # the package's schema
    (scheme,) = transforms.config_groups.values()
    assert scheme.type == "hadamard" and scheme.head_dim == group and not scheme.randomize
    assert scheme.apply[0].targets == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    for g in transforms.config_groups.values():  # the weights are stored rotated already: apply the online part
        g.apply = [a for a in g.apply if a.location == "input"]
    plain = logits(hf)
    apply_transform_config(hf, transforms)
    want, got = logits(model.hf), logits(hf)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert (plain - want).abs().max() > 1e-2 * want.abs().max()  # without the transform: another model
    back = llmspeed.load(tmp_path)  # and llmspeed reads its own export back bit for bit, rotated
    assert back.hf.model.layers[0].mlp.down_proj.config.hadamard
    assert not back.hf.model.layers[0].mlp.up_proj.config.hadamard
    a, b = model.hf.state_dict(), back.hf.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.testing.assert_close(logits(back.hf), want)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda g: g.update(randomize=True), "is 'hadamard' randomized"),
        (lambda g: g.update(type="random-matrix"), "is 'random-matrix'"),
        (lambda g: g.update(head_dim=32), "rotated in blocks of 32 but quantized as int4 with group_size=64"),
        (lambda g: g["apply"].pop(1), "fuses the inverse into the weights of \\[\\]"),
        (lambda g: g["apply"][0].update(location="output"), "applies at 'output'"),
        (lambda g: [a.update(targets=["model.layers.0.mlp.up_proj"]) for a in g["apply"]],
         "down_proj.R4_input.weight' matches no parameter"),  # a matrix stored for a layer no group rotates
        (lambda g: [a["targets"].append("lm_head") for a in g["apply"]],
         "transform_config rotates layers stored in float, e.g. 'lm_head'"),
    ],
)
def test_transforms_llmspeed_cannot_apply_are_refused_before_loading(tmp_path, edit, match):
    _, cfg = _rotated_export(tmp_path)
    edit(cfg["quantization_config"]["transform_config"]["config_groups"]["R4"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        llmspeed.load(tmp_path)


def test_a_stored_transform_matrix_that_is_not_hadamards_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _rotated_export(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj.R4_input.weight"
    assert torch.equal(tensors[key].abs(), torch.ones(64, 64))
    tensors[key] = torch.eye(64)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="is not the 64x64 Sylvester Hadamard matrix"):
        llmspeed.load(tmp_path)
