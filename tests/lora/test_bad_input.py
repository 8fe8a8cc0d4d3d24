"""Bad input gives a clear error naming the problem, and leaves the model unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import llmspeed
from llmspeed import lora

from .helpers import assert_same_tensors, base_tensors


def snapshot(model):
    return (
        base_tensors(model),
        {n: type(m) for n, m in model.linear_layers()},
        lora.adapter_names(model),
        {n: t.detach().clone() for n, t in model.hf.state_dict().items()},
    )


def assert_unchanged(model, snap):
    tensors, types, names, state = snap
    assert_same_tensors(base_tensors(model), tensors)
    assert {n: type(m) for n, m in model.linear_layers()} == types
    assert lora.adapter_names(model) == names
    assert_same_tensors({n: t for n, t in model.hf.state_dict().items()}, state)


@pytest.mark.parametrize("r", [0, -3, 2.5, True])
def test_bad_rank(llama, r):
    snap = snapshot(llama)
    with pytest.raises(ValueError, match=f"r must be a positive integer.*got {r!r}"):
        lora.add_adapter(llama, "a", r=r)
    assert_unchanged(llama, snap)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dropout=1.0), "dropout must be a number in"),
        (dict(dropout="0.1"), r"dropout must be a number in \[0, 1\); got '0.1'"),
        (dict(dropout=False), r"dropout must be a number in \[0, 1\); got False"),
        (dict(init="gaussian"), "init must be one of"),
        (dict(alpha=float("nan")), "alpha must be a finite number"),
        (dict(targets=[]), "targets must be a non-empty list"),
        (dict(use_rslora="no"), "use_rslora must be a bool; got 'no'"),
        (dict(targets=5), "targets must be 'all-linear', a regex string or a list of module-name suffixes; got 5"),
        (dict(targets=None), "targets must be 'all-linear', .*; got None"),
    ],
)
def test_bad_hyper_parameters(llama, kwargs, message):
    snap = snapshot(llama)
    with pytest.raises(ValueError, match=message):
        lora.add_adapter(llama, "a", **kwargs)
    assert_unchanged(llama, snap)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8, "float64x", None])
def test_bad_adapter_dtype_is_named(llama, tmp_path, dtype):
    """float8 passed the old floating-point check and failed inside torch's initialiser with
    NotImplementedError ("check_uniform_bounds" not implemented); now every verb names the argument."""
    lora.add_adapter(llama, "a", r=2, init="random")
    folder = lora.save_adapter(llama, tmp_path / "a", "a")
    snap = snapshot(llama)
    for verb in (lambda: lora.add_adapter(llama, "b", dtype=dtype), lambda: lora.load_adapter(llama, folder, "b", dtype=dtype)):
        with pytest.raises(ValueError, match=r"dtype must be a floating-point dtype .*'bf16'.*; got"):
            verb()
        assert_unchanged(llama, snap)


@pytest.mark.parametrize("spelling, dtype", [("bf16", torch.bfloat16), ("half", torch.float16), ("float32", torch.float32)])
def test_adapter_dtype_takes_the_names_every_verb_takes(llama, tmp_path, spelling, dtype):
    """README: llmspeed/names.py holds "the dtype and format spellings every verb accepts"; the LoRA verbs refused them."""
    lora.add_adapter(llama, "a", r=2, init="random", dtype=spelling)
    assert {p.dtype for p in lora.trainable_parameters(llama, "a")} == {dtype}
    folder = lora.save_adapter(llama, tmp_path / "a", "a")
    lora.load_adapter(llama, folder, "b", dtype=spelling)
    assert {p.dtype for p in lora.trainable_parameters(llama, "b")} == {dtype}


@pytest.mark.parametrize("targets", [["qq_proj"], "attn.*", "nothing", "proj", ["proj"]])
def test_targets_matching_nothing_lists_module_names(llama, targets):
    snap = snapshot(llama)
    with pytest.raises(ValueError, match=r"match no linear layer.*'down_proj'.*'q_proj'"):
        lora.add_adapter(llama, "a", targets=targets)
    assert_unchanged(llama, snap)


def test_name_used_twice(llama):
    lora.add_adapter(llama, "a", r=2, init="random")
    snap = snapshot(llama)
    with pytest.raises(ValueError, match="adapter 'a' already exists on this model"):
        lora.add_adapter(llama, "a", r=4)
    assert_unchanged(llama, snap)


@pytest.mark.parametrize("name", ["", "a.b", "keys", 3])
def test_bad_adapter_name(llama, name):
    snap = snapshot(llama)
    with pytest.raises(ValueError, match="adapter name must be"):
        lora.add_adapter(llama, name)
    assert_unchanged(llama, snap)


def test_loading_adapter_of_another_shape(tmp_path, llama):
    other = llmspeed.models.tiny("llama", seed=0, hidden_size=32, intermediate_size=64)
    lora.add_adapter(other, "x", r=2, init="random")
    lora.save_adapter(other, tmp_path, "x")
    lora.add_adapter(llama, "a", r=2, init="random")
    snap = snapshot(llama)
    with pytest.raises(
        ValueError,
        match=r"shapes do not fit this model at 'model.layers.0.mlp.down_proj': lora_A \(2, 64\).*needs \(2, 128\)",
    ):
        lora.load_adapter(llama, tmp_path, "x")
    assert_unchanged(llama, snap)


def test_loading_adapter_for_missing_module(tmp_path, llama):
    deeper = llmspeed.models.tiny("llama", seed=0, num_hidden_layers=3)
    lora.add_adapter(deeper, "x", r=2, targets=r"model\.layers\.2\..*")
    lora.save_adapter(deeper, tmp_path, "x")
    snap = snapshot(llama)
    with pytest.raises(ValueError, match="saved for module 'model.layers.2"):
        lora.load_adapter(llama, tmp_path, "x")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load_adapter(llama, tmp_path / "nope", "x")
    assert_unchanged(llama, snap)


def test_a_pickled_peft_adapter_is_named_with_the_way_to_safetensors(tmp_path, llama):
    lora.add_adapter(llama, "x", r=2)
    lora.save_adapter(llama, tmp_path, "x")
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")  # an old PEFT's file name
    lora.delete_adapter(llama, "x")
    with pytest.raises(FileNotFoundError, match=r"holds adapter_model.bin, a pickle .*\.save_pretrained\(new_path\)"):
        lora.load_adapter(llama, tmp_path, "x")


def test_merge_unmerge_set_of_missing_adapter(llama):
    lora.add_adapter(llama, "a", r=2, init="random")
    snap = snapshot(llama)
    for verb in (lora.merge, lora.unmerge, lora.set_adapter, lora.delete_adapter):
        with pytest.raises(
            ValueError, match=r"must name an adapter on this model; got 'b'; adapters: \['a'\]"
        ):
            verb(llama, "b")
    with pytest.raises(ValueError, match="not merged"):
        lora.unmerge(llama, "a")
    assert_unchanged(llama, snap)
    lora.merge(llama, "a")
    with pytest.raises(ValueError, match="already merged"):
        lora.merge(llama, "a")


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_loading_adapter_with_integer_matrices(tmp_path, llama, dtype):
    """Regression: a lora_A stored as integers or booleans (a damaged file) was copied into the float adapter
    without a word; the error now names the matrix, the layer and the dtype."""
    from safetensors.torch import load_file, save_file

    lora.add_adapter(llama, "x", r=2, init="random", targets=["q_proj"])
    folder = lora.save_adapter(llama, tmp_path, "x")
    tensors = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    tensors[key] = (tensors[key] * 100).to(dtype)
    save_file(tensors, folder / "adapter_model.safetensors")
    snap = snapshot(llama)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=rf"lora_A of 'model.layers.1.self_attn.q_proj' is {name}; .*floating point"):
        lora.load_adapter(llama, folder, "y")
    assert_unchanged(llama, snap)


def test_loading_adapter_with_a_scalar_matrix(tmp_path, llama):
    """Regression: a lora_A stored as a 0-d tensor (a damaged file) raised a bare IndexError ("tuple index out
    of range") while its rank was read; the error now names the layer and both shapes."""
    from safetensors.torch import load_file, save_file

    lora.add_adapter(llama, "x", r=2, init="random", targets=["q_proj"])
    folder = lora.save_adapter(llama, tmp_path, "x")
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"] = torch.tensor(1.0)
    save_file(tensors, folder / "adapter_model.safetensors")
    snap = snapshot(llama)
    with pytest.raises(ValueError, match=r"lora_A \(\) and lora_B \(64, 2\) of 'model.layers.1.self_attn.q_proj' must be"):
        lora.load_adapter(llama, folder, "y")
    assert_unchanged(llama, snap)


@pytest.mark.parametrize("targets", [5, None, ["q_proj", 3]])
def test_resolve_targets_names_targets_of_the_wrong_kind(llama, targets):
    """Regression: ``lora.resolve_targets(model, 5)`` gave a bare "'int' object is not iterable" (add_adapter checks
    its own targets through LoraConfig first)."""
    with pytest.raises(ValueError, match="targets must be 'all-linear', a regex string or a list of module-name"):
        lora.resolve_targets(llama, targets)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r must be a positive integer.*got 0"),
        (dict(r=-2), "r must be a positive integer.*got -2"),
        (dict(r=True), "r must be a positive integer.*got True"),
        (dict(scale=float("inf")), "scale must be a finite number; got inf"),
        (dict(scale="2"), "scale must be a finite number; got '2'"),
        (dict(dropout=1.5), r"dropout must be a number in \[0, 1\); got 1.5"),
        (dict(dropout=True), r"dropout must be a number in \[0, 1\); got True"),
        (dict(init="gaussian"), "init must be one of .*; got 'gaussian'"),
        (dict(dtype=torch.int8), "dtype must be a floating-point dtype"),
        (dict(name="train"), "adapter name must be an identifier-like string"),
    ],
)
def test_lora_linear_add_refuses_bad_arguments_and_changes_nothing(kwargs, message):
    layer = lora.LoraLinear(torch.nn.Linear(6, 4))
    layer.add("kept", 2, 1.0)
    args = dict(name="a", r=2, scale=1.0) | kwargs
    with pytest.raises(ValueError, match=message):
        layer.add(**args)
    assert list(layer.lora_A) == list(layer.lora_B) == list(layer.lora_dropout) == ["kept"]
    assert dict(layer.scaling) == {"kept": 1.0}


@pytest.mark.parametrize("alpha", [np.float32(16.0), torch.tensor(16.0), np.int64(16), torch.tensor(16)])
def test_real_number_scalars_are_taken_as_plain_numbers(llama, tmp_path, alpha):
    """Regression: a NumPy or 0-dim tensor alpha/scale/dropout/r (as configs loaded with NumPy give) was refused
    with "must be a finite number"; PEFT takes them. They are stored as plain Python numbers (saved as JSON)."""
    config = lora.LoraConfig(r=np.int64(4), alpha=alpha, dropout=np.float64(0.25))
    assert (config.r, config.alpha, config.dropout) == (4, 16, 0.25)
    assert {type(config.r), type(config.dropout)} == {int, float} and type(config.alpha) in (int, float)
    lora.add_adapter(llama, "a", r=np.int64(4), alpha=alpha, init="random")
    lora.save_adapter(llama, tmp_path / "a", "a")  # JSON-serialisable fields
    layer = lora.LoraLinear(torch.nn.Linear(6, 4))
    layer.add("b", torch.tensor(2), torch.tensor(0.5), dropout=np.float32(0.0))
    assert layer.scaling["b"] == 0.5 and type(layer.scaling["b"]) is float and layer.rank("b") == 2


@pytest.mark.parametrize("scale", [torch.tensor(True), np.bool_(True), torch.tensor([1.0]), torch.tensor(float("nan")),
                                   np.float32("inf"), torch.tensor(1j), pytest.param(10**400, id="int-beyond-float")])  # fmt: skip
def test_non_real_scalars_are_still_refused(scale):
    layer = lora.LoraLinear(torch.nn.Linear(6, 4))
    with pytest.raises(ValueError, match="scale must be a finite number; got"):
        layer.add("a", 2, scale)
    assert not layer.lora_A and not layer.scaling
