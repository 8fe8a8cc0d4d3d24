"""Training a QAT-prepared model: deterministic given the seed, the same with gradient checkpointing, scales that
stay positive, and a head tied to the embedding."""

from __future__ import annotations

import pytest
import torch

import llmspeed
from llmspeed import qat
from tests.qat.conftest import IDS, TOKENS


def _trained(seed: int, **options) -> tuple[tuple[float, ...], dict[str, torch.Tensor]]:
    model = llmspeed.models.tiny("llama", seed=0)
    qat.prepare(model, "int4", 16, learn_scales=True)
    result = llmspeed.finetune(model, TOKENS, steps=4, lr=1e-2, seq_len=16, batch_size=4, seed=seed, progress=False,
                               **options)  # fmt: skip
    assert not model.hf.is_activation_checkpointing  # turned off again after a checkpointed run
    return result.losses, {k: v.clone() for k, v in model.hf.state_dict().items()}


def test_training_a_prepared_model_is_deterministic_given_the_seed():
    losses, state = _trained(seed=3)
    again, state_again = _trained(seed=3)
    assert losses == again and all(torch.equal(v, state_again[k]) for k, v in state.items())
    other, _ = _trained(seed=4)  # other windows
    assert other != losses


def test_gradient_checkpointing_trains_a_prepared_model_as_without():
    losses, state = _trained(seed=0)
    checkpointed, state_checkpointed = _trained(seed=0, gradient_checkpointing=True)
    assert checkpointed == pytest.approx(losses, rel=1e-5)
    for key, value in state.items():
        torch.testing.assert_close(state_checkpointed[key], value, rtol=1e-4, atol=1e-5)


def test_learned_scales_stay_positive_and_convert_packs_them_after_a_large_lr():
    llama = llmspeed.models.tiny("llama", seed=0)
    qat.prepare(llama, "int4", 16, learn_scales=True)
    llmspeed.finetune(llama, TOKENS, steps=8, lr=5e-2, seq_len=16, batch_size=4, progress=False)
    layers = dict(qat.fake_quant_layers(llama))
    for layer in layers.values():
        scales, zeros = layer.effective_scales(), layer.effective_zeros()
        assert bool((scales > 0).all()) and bool(scales.isfinite().all()) and bool(zeros.isfinite().all())
    fake = {n: (layer.effective_scales().detach(), layer.effective_zeros().detach(), layer.quantized_weight().detach())
            for n, layer in layers.items()}  # fmt: skip
    qat.convert(llama)
    for name, module in llama.linear_layers():
        if name in fake:
            scales, zeros, weight = fake[name]
            assert torch.equal(module.scales.float(), scales) and torch.equal(module.zeros.float(), zeros), name
            assert torch.equal(module.dequantize(), weight), name


@pytest.mark.parametrize("train", ["full", "linears"])
def test_a_prepared_model_whose_head_is_tied_to_the_embedding_trains_and_converts(train):
    model = llmspeed.models.tiny("llama", seed=0, tie_word_embeddings=True)
    embedding = model.hf.model.embed_tokens.weight
    assert model.hf.lm_head.weight is embedding
    qat.prepare(model, "int4", 16, learn_scales=True)
    assert "lm_head" not in dict(qat.fake_quant_layers(model))  # the head stays in float, tied
    before = embedding.detach().clone()
    result = llmspeed.finetune(model, TOKENS, train=train, steps=5, lr=1e-2, seq_len=16, batch_size=4, progress=False)
    assert result.losses[-1] < result.losses[0]
    assert model.hf.lm_head.weight is model.hf.model.embed_tokens.weight is embedding
    assert torch.equal(embedding, before) == (train == "linears")  # "linears" leaves the embedding (and head)
    with torch.no_grad():
        fake = model.hf(IDS).logits
    qat.convert(model)
    assert model.hf.lm_head.weight is model.hf.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(model.hf(IDS).logits, fake, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hadamard", [False, True])  # rotated layers get a new latent weight parameter too
def test_a_model_prepared_under_inference_mode_trains_as_one_prepared_outside(hadamard):
    """Regression: prepare under ``torch.inference_mode()`` built the grids and learnable gains as inference
    tensors, and training then failed with "Setting requires_grad=True on inference tensor outside InferenceMode"
    (or, without learn_scales, "Inference tensors cannot be saved for backward")."""
    options = dict(learn_scales=True, hadamard_layers=["*down_proj"] if hadamard else None)
    runs = []
    for inference in (False, True):
        model = llmspeed.models.tiny("llama", seed=0)
        with torch.inference_mode(inference):
            qat.prepare(model, "int4", 16, **options)
        result = llmspeed.finetune(model, TOKENS, steps=3, lr=1e-2, seq_len=16, batch_size=4, progress=False)
        runs.append((result.losses, model.hf.state_dict()))
    (losses, state), (again, state_again) = runs
    assert again == losses and all(torch.equal(v, state_again[k]) for k, v in state.items())
