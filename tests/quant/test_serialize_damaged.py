"""``load`` of damaged or foreign folders: each refusal names the tensor, alias, layer or field at fault."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import llmspeed
from llmspeed.quant.serialize import WEIGHTS

from .test_serialize import UP, _meta, _state, _tamper


def test_plain_transformers_folder_is_rejected(tmp_path, llama):
    llama.hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not an llmspeed checkpoint"):
        llmspeed.load(tmp_path)
    with pytest.raises(ValueError, match="not an llmspeed checkpoint"):
        llmspeed.load(tmp_path / "missing")


def test_truncated_or_corrupt_file_raises(tmp_path, llama):
    llmspeed.quantize(llama, "int8")
    llmspeed.save(llama, tmp_path)
    path = tmp_path / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        llmspeed.load(tmp_path)
    path.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        llmspeed.load(tmp_path)
    path.write_bytes(data)
    config = tmp_path / "config.json"
    config.write_text(config.read_text()[:40])  # a truncated config.json: transformers raised OSError
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        llmspeed.load(tmp_path)
    config.write_text("[]")
    with pytest.raises(ValueError, match=r"config\.json must hold a JSON object"):
        llmspeed.load(tmp_path)


def test_config_not_matching_tensors_raises(tmp_path, llama):
    llmspeed.quantize(llama, "int4", group_size=32)
    llmspeed.save(llama, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match its config"):
        llmspeed.load(tmp_path)
    cfg["num_hidden_layers"], cfg["intermediate_size"] = 2, 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"down_proj.scales.* but the module needs float16 \[64, 3\]"):
        llmspeed.load(tmp_path)


@pytest.mark.parametrize(
    "change, match",
    [  # regressions: each of these loaded and failed, or silently changed numbers, later
        (lambda t: t.update({f"{UP}.qweight": t[f"{UP}.qweight"].float()}),
         rf"tensor '{UP}.qweight' is float32 \[128, 32\], but the module needs uint8 \[128, 32\]"),
        (lambda t: t.update({f"{UP}.scales": t[f"{UP}.scales"].float()}),
         rf"tensor '{UP}.scales' is float32 \[128, 2\], but the module needs float16"),
        (lambda t: t.update({f"{UP}.zeros": t[f"{UP}.zeros"][:, :1].contiguous()}), rf"tensor '{UP}.zeros' is float16 \[128, 1\]"),
        (lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int32)}), r"'model.norm.weight' is int32"),
    ],
)  # fmt: skip
def test_tampered_tensor_is_named(tmp_path, llama, change, match):
    llmspeed.quantize(llama, "int4", group_size=32)
    llmspeed.save(llama, tmp_path)
    _tamper(tmp_path / WEIGHTS, change)
    with pytest.raises(ValueError, match=match):
        llmspeed.load(tmp_path)


def test_version_1_folder_with_fp32_scales_loads_rounded_to_fp16(tmp_path, llama):
    """Folders written before 4-bit scales moved to fp16 (version 1: fp32 scales and zeros) still load."""
    llmspeed.quantize(llama, "int4", group_size=32)
    llmspeed.save(llama, tmp_path)
    v2 = llmspeed.load(tmp_path)
    old = {}

    def to_fp32(t):  # version 1 stored fp32 values that fp16 does not hold exactly
        for k in [k for k in t if k.endswith((".scales", ".zeros")) and t[k].dtype == torch.float16]:
            t[k] = t[k].float() * (1 + 2.0**-10) if k.endswith(".scales") else t[k].float()
            old[k] = t[k]

    _tamper(tmp_path / WEIGHTS, to_fp32, lambda m: m.update({"version": "1"}))
    loaded = llmspeed.load(tmp_path)
    state = _state(loaded)
    assert old and all(state[k].dtype == torch.float16 and torch.equal(state[k], v.half()) for k, v in old.items())
    assert any(not torch.equal(state[k], _state(v2)[k]) for k in old)  # the fp32 values were read, not ignored
    _tamper(tmp_path / WEIGHTS, change_meta=lambda m: m.update({"version": "0"}))
    with pytest.raises(ValueError, match=r"version '0'; this llmspeed reads \('1', '2'\)"):
        llmspeed.load(tmp_path)


@pytest.mark.parametrize(
    "aliases, match",
    [
        ({"lm_head.weight": "model.norm.weight"}, r"'lm_head.weight \(alias of model.norm.weight\)' is float32 \[64\].*\[128, 64\]"),
        ({"lm_head.weight": "model.missing.weight"}, r"alias 'lm_head.weight' -> 'model.missing.weight' names 'model.missing.weight'"),
        ({"model.ghost.weight": "model.embed_tokens.weight"}, r"names 'model.ghost.weight'"),
        ({"lm_head.weight": "model.embed_tokens.weight", "model.embed_tokens.weight": "lm_head.weight"},
         r"alias 'model.embed_tokens.weight' -> 'lm_head.weight' points to no stored tensor"),
    ],
)  # fmt: skip
def test_tampered_alias_is_named(tmp_path, aliases, match):
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    model = llmspeed.wrap(transformers.AutoModelForCausalLM.from_config(config).eval())
    llmspeed.quantize(model, "int8", lm_head=None)  # a float head tied to the embedding: an alias in the file
    llmspeed.save(model, tmp_path)
    assert json.loads(_meta(tmp_path)["aliases"]) == {"lm_head.weight": "model.embed_tokens.weight"}
    _tamper(tmp_path / WEIGHTS, change_meta=lambda m: m.update({"aliases": json.dumps(aliases)}))
    with pytest.raises(ValueError, match=match):
        llmspeed.load(tmp_path)


def test_symmetric_metadata_over_asymmetric_zeros_is_refused(tmp_path, llama):
    """Regression: a folder whose metadata called an asymmetric int4 layer symmetric loaded without an error, and
    its compressed-tensors export then dropped the zero points (symmetric layers are written without them): the
    config must describe the tensors, and the error names the layer."""
    llmspeed.quantize(llama, "int4", group_size=32)
    llmspeed.save(llama, tmp_path)

    def mark_symmetric(meta):
        quant = json.loads(meta["quantization"])
        quant[UP]["symmetric"] = True
        meta["quantization"] = json.dumps(quant)

    _tamper(tmp_path / WEIGHTS, change_meta=mark_symmetric)
    with pytest.raises(ValueError, match=rf"layer '{UP}' is symmetric=True in the file's .* zeros are not all 8"):
        llmspeed.load(tmp_path)


def test_a_metadata_dtype_that_is_no_dtype_and_a_meta_device_are_named(tmp_path, llama):
    llmspeed.save(llama, tmp_path)
    with pytest.raises(ValueError, match="device='meta' holds no data"):
        llmspeed.load(tmp_path, device="meta")
    _tamper(tmp_path / WEIGHTS, change_meta=lambda m: m.update({"dtype": "nn"}))  # torch.nn: an attribute, no dtype
    with pytest.raises(ValueError, match=r"has unreadable llmspeed metadata \(dtype 'nn'"):
        llmspeed.load(tmp_path)
