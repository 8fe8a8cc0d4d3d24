"""merge_and_unload: a merged model saved as a plain one (the leftover it fixes: a model with merged adapters
could be saved in neither format, and the compressed-tensors error suggested merging, which did not help)."""

from __future__ import annotations

import pytest
import torch

import llmspeed
from llmspeed import lora

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


def logits(model):
    with torch.no_grad():
        return model.hf(input_ids=IDS).logits


def _plain(model) -> bool:
    return not any(isinstance(m, lora.LoraLinear) for m in model.hf.modules()) and not lora.adapter_names(model)


@pytest.mark.parametrize("fmt", ["llmspeed", "compressed-tensors"])
def test_merged_int4_model_unloads_saves_and_loads(tmp_path, fmt):
    model = llmspeed.models.tiny("llama", seed=0)
    llmspeed.quantize(model, "int4", group_size=32)
    torch.manual_seed(0)
    lora.add_adapter(model, "a", r=4, init="random")
    with pytest.raises(ValueError, match="merge_and_unload"):  # the refusal names the way out
        llmspeed.save(model, tmp_path / "wrapped", format=fmt)
    with pytest.warns(UserWarning, match="re-quantized"):
        report = lora.merge_and_unload(model, "a")
    assert report is not None and report.requantized == report.layers > 0
    assert _plain(model) and isinstance(model.hf.model.layers[0].self_attn.q_proj, llmspeed.quant.Int4Linear)
    merged = logits(model)
    loaded = llmspeed.load(llmspeed.save(model, tmp_path / "merged", format=fmt))
    torch.testing.assert_close(logits(loaded), merged, atol=1e-4, rtol=1e-4)


def test_float_merge_into_a_tied_head_saves_the_merged_head(tmp_path):
    model = llmspeed.models.tiny("llama", seed=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    lora.add_adapter(model, "a", r=4, init="random", targets=["lm_head", "q_proj"])
    with_adapter = logits(model)
    lora.merge_and_unload(model, "a")
    assert _plain(model)
    torch.testing.assert_close(logits(model), with_adapter, atol=1e-5, rtol=1e-5)
    loaded = llmspeed.load(llmspeed.save(model, tmp_path / "m"))
    torch.testing.assert_close(logits(loaded), with_adapter, atol=1e-5, rtol=1e-5)


def test_requantize_false_keeps_float_layers_and_generates_as_before(tmp_path):
    model = llmspeed.models.tiny("llama", seed=0)
    llmspeed.quantize(model, "int4", group_size=32)
    torch.manual_seed(0)
    lora.add_adapter(model, "a", r=4, init="random")
    prompts = [[5, 9, 11, 3], [7, 1]]
    expected = [o.token_ids for o in model.generate_batched(prompts, max_new_tokens=6, adapter="a")]
    with_adapter = logits(model)
    lora.merge_and_unload(model, "a", requantize=False)
    assert _plain(model) and type(model.hf.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(model), with_adapter, atol=1e-5, rtol=1e-5)
    assert [o.token_ids for o in model.generate_batched(prompts, max_new_tokens=6)] == expected
    loaded = llmspeed.load(llmspeed.save(model, tmp_path / "m"))
    torch.testing.assert_close(logits(loaded), with_adapter, atol=1e-5, rtol=1e-5)


def test_adapters_merged_earlier_stay_merged():
    model = llmspeed.models.tiny("llama", seed=0)
    torch.manual_seed(0)
    lora.add_adapter(model, "a", r=4, init="random")
    lora.merge(model, "a")
    merged = logits(model)
    assert lora.merge_and_unload(model) is None
    assert _plain(model)
    torch.testing.assert_close(logits(model), merged, atol=0, rtol=0)


def test_an_adapter_that_would_be_dropped_is_refused_before_any_change():
    model = llmspeed.models.tiny("llama", seed=0)
    torch.manual_seed(0)
    lora.add_adapter(model, "a", r=4, init="random")
    lora.add_adapter(model, "b", r=4, init="random")
    before = logits(model)
    with pytest.raises(ValueError, match=r"\['b'\] are neither merged nor named"):
        lora.merge_and_unload(model, "a")
    with pytest.raises(ValueError, match="name must name an adapter"):
        lora.merge_and_unload(model, "c")
    assert lora.adapter_names(model) == ["a", "b"] and list(lora.lora_layers(model))
    assert not any(layer.merged for _, layer in lora.lora_layers(model))
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)


def test_an_adapter_on_a_head_shared_with_the_embedding_is_refused_before_any_change(tmp_path):
    """Regression: with quantize's shared int4 head as the input embedding, merge_and_unload of an adapter on the head
    left the embedding reading the replaced head outside the module tree, and llmspeed.save then failed with a
    bare KeyError."""
    model = llmspeed.models.tiny("llama", seed=0, tie_word_embeddings=True)
    llmspeed.quantize(model, "int4")
    assert type(model.hf.model.embed_tokens).__name__ == "QuantizedEmbedding"
    torch.manual_seed(0)
    lora.add_adapter(model, "a", r=4, targets=["lm_head", "q_proj"], init="random")
    before = logits(model)
    with pytest.raises(ValueError, match="'lm_head' is also the model's input embedding"):
        lora.merge_and_unload(model, "a")
    assert lora.adapter_names(model) == ["a"] and not any(layer.merged for _, layer in lora.lora_layers(model))
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)
    lora.merge(model, "a")  # merging without unloading still works (the head merged into a copy)
    lora.unmerge(model, "a")
    lora.add_adapter(model, "b", r=4, targets=["q_proj"], init="random")  # adapters elsewhere unload and save
    lora.delete_adapter(model, "a")
    lora.merge_and_unload(model, "b")
    llmspeed.save(model, tmp_path)
    torch.testing.assert_close(logits(llmspeed.load(tmp_path)), logits(model))
