"""``llmspeed.models.from_pretrained``: local transformers folders, quantized while read, bit for bit as quantize()."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmspeed
from llmspeed.models import from_pretrained

IDS = torch.tensor([[1, 5, 9, 33, 2]])


def _folder(tmp_path, arch="llama", tie=False, shard="60KB"):
    model = llmspeed.models.tiny(arch, hidden_size=128, intermediate_size=256)
    if tie:
        model.hf.config.tie_word_embeddings = True
        model.hf.lm_head.weight = model.hf.model.embed_tokens.weight
    model.hf.save_pretrained(tmp_path, max_shard_size=shard)
    return model


def _same_state(a, b):
    sa, sb = a.hf.state_dict(), b.hf.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


CASES = [
    ("llama", False, torch.float32, dict(format="int4", group_size=64)),  # the head at int8 (lm_head's default)
    ("llama", False, torch.float32, dict(format="int4", group_size=64, lm_head=None)),  # the head in float
    ("qwen2", True, torch.float32, dict(format="int4", group_size=32, symmetric=True)),
    ("qwen2", True, torch.bfloat16, dict(format="int4", group_size=64)),
    ("llama", False, torch.bfloat16, dict(format="int8")),
    ("llama", False, torch.float32, dict(format="int4", group_size=32, activations="int8")),
    ("qwen2", True, torch.float32, dict(format="nf4", lm_head="nf4")),  # the tied head quantized from the embedding
    ("qwen2", True, torch.float32, dict(format="int4", lm_head=None)),  # a float head stays tied
    # share_embedding=False: the packed head and the float embedding, as quantize(share_embedding=False) keeps them
    ("qwen2", True, torch.float32, dict(format="int4", group_size=64, share_embedding=False)),
    # an NF4 head with double_quant cannot serve as the embedding: the float embedding stays, the head is packed
    ("qwen2", True, torch.float32, dict(format="nf4", lm_head="nf4", double_quant=True)),
]


@pytest.mark.parametrize("arch, tie, dtype, quant", CASES)
def test_quantize_while_loading_matches_load_then_quantize(tmp_path, arch, tie, dtype, quant):
    _folder(tmp_path, arch, tie)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1  # sharded: one shard at a time
    got = from_pretrained(tmp_path, dtype=dtype, quantize=quant)
    want = llmspeed.wrap(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype))
    llmspeed.precision.attach(want, dtype)  # what from_pretrained gives a 16-bit model: cast's run-time hooks
    options = {k: v for k, v in quant.items() if k != "format"}
    llmspeed.quantize(want, quant["format"], **options)
    _same_state(got, want)
    if quant.get("lm_head", "int8") is None:  # a float head stays tied; a quantized one came from the embedding
        assert (got.hf.lm_head.weight is got.hf.model.embed_tokens.weight) == tie
    with torch.no_grad():
        assert torch.equal(got.hf(IDS).logits, want.hf(IDS).logits)


def test_16_bit_load_carries_the_run_time_hooks_of_cast(tmp_path):
    # Regression: on an AVX2 CPU (no native bf16) the per-call matmul choice makes bf16 logits differ in the
    # last bits from a bare transformers model, so the load-then-quantize test compared unlike models.
    _folder(tmp_path)
    got = from_pretrained(tmp_path, dtype="bf16")
    assert llmspeed.precision.cpu_matmul.installed(got.hf) == len(
        [m for m in got.hf.modules() if type(m) is torch.nn.Linear]
    )
    assert llmspeed.precision.cpu_matmul.installed(from_pretrained(tmp_path).hf) == 0  # fp32: nothing to choose


@pytest.mark.parametrize("dtype", [torch.float64, "float64", "fp64", "double"])
def test_float64_loads_by_dtype_or_name(tmp_path, dtype):
    # regression: torch.float64 loaded but its names were refused by a message listing only 16/32-bit names
    _folder(tmp_path, shard="10MB")
    got = from_pretrained(tmp_path, dtype=dtype, quantize=dict(format="int4", group_size=64))
    assert got.hf.model.embed_tokens.weight.dtype == torch.float64
    assert got.hf(IDS).logits.dtype == torch.float64


@pytest.mark.parametrize("quant", [None, dict(format="int4", group_size=64), dict(format="int8")])
def test_a_weight_of_the_wrong_shape_is_named(tmp_path, quant):
    from safetensors.torch import load_file, save_file

    _folder(tmp_path, shard="10MB")
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name][:, :128].contiguous()  # [128, 256] -> [128, 128]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"tensor '{name}' is float32 \[128, 128\], but the module needs float32 "
                                         r"\[128, 256\]"):  # fmt: skip
        from_pretrained(tmp_path, quantize=quant)


def test_float_load_equals_transformers(tmp_path):
    model = _folder(tmp_path, shard="10MB")
    got = from_pretrained(tmp_path)
    _same_state(got, model)
    with torch.no_grad():
        assert torch.equal(got.hf(IDS).logits, model.hf(IDS).logits)


def test_bad_arguments_and_quantized_folders_are_refused(tmp_path):
    model = _folder(tmp_path)
    for quant, match in [({"group_size": 64}, "at least 'format'"), ({"format": "int3"}, "must be one of"),
                         ({"format": ["int4"]}, r"quantize\['format'\] must be one of .*got \['int4'\]"),
                         ({"format": "int4", "method": "gptq"}, r"unknown keys \['method'\].*llmspeed.quantize"),
                         ({"format": "int8", "group_size": 24}, "group_size for int8 must be None .* or a positive multiple of 16"),
                         ({"format": "int4", "share_embedding": "yes"},
                          r"quantize\['share_embedding'\] must be None, True or False; got 'yes'")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            from_pretrained(tmp_path, quantize=quant)
    # regression: an 8-bit float passed the floating-point check and failed with a bare TypeError about storage
    for dtype in (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2):
        with pytest.raises(ValueError, match=r"dtype must be a floating-point torch dtype of 16 bits or more .*got "
                                             + str(dtype)):  # fmt: skip
            from_pretrained(tmp_path, dtype=dtype)
    for dtype in ("float8", "int8", torch.int8):  # the message lists every accepted name, float64's included
        with pytest.raises(ValueError, match=r"torch.float64\) or one of the names \[.*'bf16'.*'float64'.*\]; got "
                                             + repr(dtype)):  # fmt: skip
            from_pretrained(tmp_path, dtype=dtype)
    with pytest.raises(TypeError, match=r"path must be a folder path \(a str or pathlib.Path\); got 123"):
        from_pretrained(123)
    llmspeed.quantize(model, "int4", group_size=64, symmetric=True)
    llmspeed.save(model, tmp_path / "ct", format="compressed-tensors")
    with pytest.raises(ValueError, match=r"compressed-tensors checkpoint; load it with llmspeed.load"):
        from_pretrained(tmp_path / "ct")
    model.hf.config.save_pretrained(tmp_path / "config only")  # no weights: says what folder to pass
    with pytest.raises(ValueError, match=r"holds neither model.safetensors nor .*: pass the folder that llmspeed.save"):
        from_pretrained(tmp_path / "config only")


@pytest.mark.slow
def test_smollm2_quantized_while_loading_is_bit_identical(smollm2):
    from llmspeed.models.embedded import _CACHE_NAME, cache_dir

    got = from_pretrained(cache_dir() / _CACHE_NAME, quantize=dict(format="int4", group_size=64))
    llmspeed.quantize(smollm2, "int4", group_size=64)
    _same_state(got, smollm2)
    assert got.tokenizer is not None


def test_a_head_stored_with_its_own_values_is_not_shared_despite_the_config(tmp_path):
    """Regression: a folder whose config says tie_word_embeddings=True but which stores an output head with values
    of its own (transformers loads it untied, with a warning) was read tied: with the head quantized, the input
    embedding was replaced by rows of the packed head, so every token was embedded with the head's values and the
    logits were far from those of loading the float folder and calling quantize (0.9 apart)."""
    import json

    _folder(tmp_path, shard="10MB")  # an untied model: both tensors stored, with different values
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    quant = dict(format="int4", group_size=64, lm_head="int8")
    got = from_pretrained(tmp_path, quantize=quant)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert hf.lm_head.weight is not hf.model.embed_tokens.weight  # what transformers makes of such a folder
    want = llmspeed.quantize(hf, "int4", group_size=64, lm_head="int8")
    _same_state(got, want)
    with torch.no_grad():
        assert torch.equal(got.hf(IDS).logits, want.hf(IDS).logits)
    with pytest.raises(ValueError, match="share_embedding'\\]=True needs an output head tied"):
        from_pretrained(tmp_path, quantize={**quant, "share_embedding": True})
    from safetensors.torch import load_file, save_file

    same = tmp_path / "same"  # a tied head stored twice, with equal values: transformers ties it, and it is shared
    _folder(same, tie=True, shard="10MB")
    tensors = load_file(same / "model.safetensors")
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}, same / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    got = from_pretrained(same, quantize=quant)
    assert type(got.hf.model.embed_tokens).__name__ == "QuantizedEmbedding"
    want = llmspeed.quantize(AutoModelForCausalLM.from_pretrained(same), "int4", group_size=64, lm_head="int8")
    with torch.no_grad():
        assert torch.equal(got.hf(IDS).logits, want.hf(IDS).logits)


def test_a_device_that_cannot_hold_the_weights_is_refused_before_reading(tmp_path):
    """device='meta' would load every tensor and return a model with no data; it is refused by name, up front."""
    _folder(tmp_path)
    with pytest.raises(ValueError, match=r"device='meta' holds no data"):
        from_pretrained(tmp_path, device="meta")
