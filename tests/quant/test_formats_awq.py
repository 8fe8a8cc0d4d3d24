"""AutoAWQ (GEMM) folders -> llmspeed: the stored weights exactly (against an explicit-shift oracle and against
compressed-tensors' own AutoAWQ converter, the one vLLM's project ships), float layers kept, round trips through
the native and compressed-tensors formats, and every unreadable folder named."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llmspeed
from llmspeed.bench.awq_folder import dequantize_layer, write_awq_folder
from llmspeed.quant import Int4Linear

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
WIDE = dict(hidden_size=128, intermediate_size=256)


def _tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _compressed_tensors_reading(tensors: dict[str, torch.Tensor], name: str, group: int) -> torch.Tensor:
    """The float weight compressed-tensors' AutoAWQ converter reads out of layer ``name``: ``(q - zp) * scale``."""
    convert = pytest.importorskip("compressed_tensors.entrypoints.convert.converters.autoawq")
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    layer = {k: v for k, v in tensors.items() if k.startswith(f"{name}.") and k.rsplit(".", 1)[1] in
             ("qweight", "qzeros", "scales")}  # fmt: skip
    out = convert.AutoAWQConverter(group_size=group).process(dict(layer))
    shape = torch.Size(out[f"{name}.weight_shape"].tolist())  # [out, in]
    q = unpack_from_int32(out[f"{name}.weight_packed"], 4, shape).float()  # [out, in], signed
    scale = out[f"{name}.weight_scale"].float()  # [out, G]
    zp = unpack_from_int32(out[f"{name}.weight_zero_point"], 4, scale.shape, packed_dim=0).float()  # [out, G]
    return (q - zp.repeat_interleave(group, 1)) * scale.repeat_interleave(group, 1)


def _nll(hf) -> float:
    with torch.no_grad():
        logits = hf(input_ids=IDS).logits[:, :-1]  # [B, S-1, V]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1)).item()


@pytest.mark.parametrize("arch, group", [("qwen2", 32), ("llama", 64)])
def test_awq_folder_loads_to_its_exact_weights(tmp_path, arch, group):
    write_awq_folder(llmspeed.models.tiny(arch, **WIDE), tmp_path, group=group)  # qwen2: biases on q/k/v
    tensors = _tensors(tmp_path)
    loaded = llmspeed.load(tmp_path)
    reference = llmspeed.models.tiny(arch, **WIDE)  # the float model holding exactly the stored weights
    checked = 0
    for name, module in loaded.linear_layers():
        if name == "lm_head":
            continue
        assert isinstance(module, Int4Linear) and module.config.group_size == group and module.config.method == "awq"
        want = dequantize_layer(tensors, name)
        assert torch.equal(module.dequantize(), want), name
        assert torch.equal(_compressed_tensors_reading(tensors, name, group), want), name
        reference.hf.get_submodule(name).weight.data.copy_(want)
        checked += 1
    assert checked == 7 * loaded.spec.num_layers
    want_nll = _nll(reference.hf)
    assert abs(_nll(loaded.hf) - want_nll) <= 1e-5 * abs(want_nll)
    if arch == "qwen2":
        assert torch.equal(loaded.hf.model.layers[0].self_attn.q_proj.bias, reference.hf.model.layers[0].self_attn.q_proj.bias)


def test_modules_to_not_convert_stay_float_and_the_model_round_trips(tmp_path):
    source = llmspeed.models.tiny("llama", **WIDE)
    write_awq_folder(source, tmp_path / "awq", group=32, skip=("down_proj",))
    loaded = llmspeed.load(tmp_path / "awq")
    down = loaded.hf.model.layers[1].mlp.down_proj
    assert type(down) is nn.Linear and torch.equal(down.weight, source.hf.model.layers[1].mlp.down_proj.weight)
    assert isinstance(loaded.hf.model.layers[1].mlp.up_proj, Int4Linear)
    with torch.no_grad():
        logits = loaded.hf(input_ids=IDS).logits
    for fmt in ("llmspeed", "compressed-tensors"):
        llmspeed.save(loaded, tmp_path / fmt, format=fmt)
        again = llmspeed.load(tmp_path / fmt)
        for (name, a), (_, b) in zip(loaded.linear_layers(), again.linear_layers()):
            if isinstance(a, Int4Linear):
                assert torch.equal(a.dequantize(), b.dequantize()), (fmt, name)
        with torch.no_grad():
            assert torch.allclose(again.hf(input_ids=IDS).logits, logits, atol=1e-5), fmt
    out = llmspeed.Generator(loaded, progress=False).generate_batched([[5, 6, 7]], llmspeed.SamplingParams(max_new_tokens=4))
    assert len(out[0].token_ids) == 4


def _rewrite_config(folder, **changes):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data["quantization_config"].update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("changes, match", [
    ({"version": "gemv"}, "version='gemv'.*'gemm'"),
    ({"version": "GEMM"}, None),  # AutoAWQ's older configs write it in capitals
    ({"bits": 8}, "bits=8.*4-bit"),
    ({"zero_point": False}, "zero_point=False"),
    ({"group_size": 0}, "group_size=0"),
    ({"group_size": 64}, "down_proj.qzeros' is int32 \\[4, 8\\]; AWQ needs int32 \\[2, 8\\]"),  # the group changed
])  # fmt: skip
def test_unreadable_awq_configs_are_named(tmp_path, changes, match):
    write_awq_folder(llmspeed.models.tiny("llama", hidden_size=64, intermediate_size=128), tmp_path, group=32)
    _rewrite_config(tmp_path, **changes)
    if match is None:
        assert isinstance(llmspeed.load(tmp_path).hf.model.layers[0].mlp.up_proj, Int4Linear)
        return
    with pytest.raises(ValueError, match=match):
        llmspeed.load(tmp_path)


def test_tampered_awq_tensors_are_named(tmp_path):
    from safetensors.torch import save_file

    write_awq_folder(llmspeed.models.tiny("llama", **WIDE), tmp_path, group=32)
    tensors = _tensors(tmp_path)
    name = "model.layers.0.mlp.up_proj"
    for key, change, match in [(f"{name}.qzeros", None, "qzeros' is missing"),
                               (f"{name}.scales", lambda t: t[:, :-8], "scales' is float16 \\[4, 248\\]"),
                               (f"{name}.qweight", lambda t: t.to(torch.int64), "qweight' is int64")]:  # fmt: skip
        changed = dict(tensors)
        if change is None:
            del changed[key]
        else:
            changed[key] = change(changed[key]).contiguous()
        save_file(changed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ValueError, match=match):
            llmspeed.load(tmp_path)
