"""finetune: loss falls, only adapters change, packed base tensors stay bit-identical, checkpointing works."""

from __future__ import annotations

import pytest
import torch

from llmspeed import lora

from .helpers import assert_same_tensors, base_tensors, fake_quantize, quantize_real

# a learnable token stream: 5 random tokens repeated (a tiny random model's output head, behind an
# RMSNorm, bounds the logits, so the loss plateaus near 4.4 nats from 5.6)
TOKENS = torch.randint(0, 256, (5,), generator=torch.Generator().manual_seed(0)).repeat(200)


def fell(losses) -> bool:
    return sum(losses[-3:]) < 0.85 * sum(losses[:3])


def _train(model, **kwargs):
    lora.add_adapter(model, "a", r=8, alpha=16)
    before = base_tensors(model)
    result = lora.finetune(
        model, TOKENS, steps=15, lr=1e-2, seq_len=16, batch_size=4, progress=False, **kwargs
    )
    assert_same_tensors(base_tensors(model), before)
    return result


def test_finetune_float_base_loss_falls_base_untouched(llama):
    result = _train(llama)
    assert result.steps == 15 and len(result.losses) == 15
    assert fell(result.losses)
    assert result.trainable_params == sum(p.numel() for p in lora.trainable_parameters(llama, "a"))
    assert not llama.hf.training and all(
        not p.requires_grad for n, p in llama.hf.named_parameters() if ".lora_" not in n
    )


def test_finetune_quantized_base_packed_tensors_bit_identical(llama):
    fake_quantize(llama)
    result = _train(llama)
    assert fell(result.losses)


@pytest.mark.parametrize("method", ["int8", "int4", "nf4"])
def test_finetune_real_quantized_base(llama, method):
    quantize_real(llama, method)
    result = _train(llama)
    assert fell(result.losses)


def test_an_adapter_added_under_inference_mode_to_a_base_quantized_under_it_trains(llama):
    """Regression: lora.add_adapter under ``torch.inference_mode()`` made the adapter matrices inference tensors and
    finetune failed with "Setting requires_grad=True on inference tensor outside InferenceMode". (Quantizing under
    it was already fine: the packed buffers are only read.)"""
    with torch.inference_mode():
        quantize_real(llama, "int4")
        lora.add_adapter(llama, "a", r=8, alpha=16)
    assert not any(p.is_inference() for p in lora.trainable_parameters(llama, "a"))
    result = lora.finetune(llama, TOKENS, steps=15, lr=1e-2, seq_len=16, batch_size=4, progress=False)
    assert fell(result.losses)


def test_gradient_checkpointing_gives_the_same_losses():
    import llmspeed

    losses = []
    for checkpointing in (False, True):
        model = llmspeed.models.tiny("llama", seed=0)
        torch.manual_seed(0)  # same adapter init for both runs
        result = _train(model, gradient_checkpointing=checkpointing)
        assert not model.hf.is_activation_checkpointing
        losses.append(torch.tensor(result.losses))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-4, rtol=1e-4)


def test_checkpointing_the_caller_turned_on_stays_on():
    """Regression: finetune(gradient_checkpointing=True) switched checkpointing off afterwards even where the caller
    had turned it on for their model (noted by the QAT audit)."""
    import llmspeed

    model = llmspeed.models.tiny("llama", seed=0)
    model.hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    _train(model, gradient_checkpointing=True)
    assert model.hf.is_activation_checkpointing


def test_full_finetune_changes_base(llama):
    before = base_tensors(llama)
    result = lora.finetune(
        llama, TOKENS, steps=3, lr=1e-3, seq_len=16, batch_size=2, full=True, progress=False
    )
    assert result.adapter is None and result.trainable_params == sum(p.numel() for p in llama.hf.parameters())
    assert not torch.equal(
        base_tensors(llama)["model.layers.0.self_attn.q_proj.weight"],
        before["model.layers.0.self_attn.q_proj.weight"],
    )


def test_finetune_bad_input(llama):
    with pytest.raises(ValueError, match="no active adapter"):
        lora.finetune(llama, TOKENS, steps=2, progress=False)
    lora.add_adapter(llama, "a", r=2)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        lora.finetune(llama, TOKENS, steps=0, progress=False)
    with pytest.raises(ValueError, match="texts hold 100 tokens; seq_len=200 needs at least 200"):
        lora.finetune(llama, TOKENS[:100], steps=2, seq_len=200, progress=False)
    with pytest.raises(ValueError, match="seq_len must be at most the model's context of 512 tokens .*; got seq_len=2000"):
        lora.finetune(llama, TOKENS, steps=2, seq_len=2000, progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        lora.finetune(llama, "some text", steps=2, progress=False)
    # regression: a truthy non-bool full ran a full fine-tune of the base instead of the adapter
    base = {n: p.detach().clone() for n, p in llama.hf.named_parameters() if "lora_" not in n}
    with pytest.raises(ValueError, match="full must be a bool; got 'no'"):
        lora.finetune(llama, TOKENS, steps=2, seq_len=16, batch_size=2, full="no", progress=False)
    assert all(torch.equal(p, base[n]) for n, p in llama.hf.named_parameters() if "lora_" not in n)
    # regression: adapter="" trained the active adapter silently (an empty name is falsy), as if none was named
    with pytest.raises(ValueError, match="adapter must name an adapter on this model; got ''"):
        lora.finetune(llama, TOKENS, steps=2, seq_len=16, batch_size=2, adapter="", progress=False)
    with pytest.raises(ValueError, match="full=True trains a plain float model"):
        lora.finetune(llama, TOKENS, steps=2, seq_len=16, batch_size=2, full=True, progress=False)
    lora.merge(llama, "a")
    with pytest.raises(ValueError, match="adapter 'a' is merged into the base; unmerge it"):
        lora.finetune(llama, TOKENS, steps=2, seq_len=16, batch_size=2, progress=False)


@pytest.mark.parametrize("block", ["disabled", "per_row_adapters"])
def test_training_inside_a_block_that_bypasses_the_adapter_is_refused(llama, block):
    """Regression: inside lora.disabled the loss did not depend on the adapter, and the first backward failed
    with torch's "element 0 of tensors does not require grad"; inside per_row_adapters (as many names as
    windows) the rows ran the routed adapters, not the one trained, with the same obscure error."""
    lora.add_adapter(llama, "a", r=2, init="random")
    lora.add_adapter(llama, "b", r=2)
    before = {n: p.detach().clone() for n, p in llama.hf.named_parameters()}
    context = lora.disabled(llama) if block == "disabled" else lora.per_row_adapters(llama, ["a", "a"])
    with context, pytest.raises(ValueError, match=f"inside lora.{block}.*train outside that block"):
        lora.finetune(llama, TOKENS, steps=2, seq_len=16, batch_size=2, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in llama.hf.named_parameters())
    assert lora.active_adapter(llama) == "b"


def test_finetune_of_a_named_adapter_makes_it_active_and_trains_it(llama):
    lora.add_adapter(llama, "a", r=2)
    lora.add_adapter(llama, "b", r=2)
    lora.set_adapter(llama, "a")
    a_before = [p.detach().clone() for p in lora.trainable_parameters(llama, "a")]
    b_before = [p.detach().clone() for p in lora.trainable_parameters(llama, "b")]
    lora.finetune(llama, TOKENS, steps=2, seq_len=16, batch_size=2, adapter="b", progress=False)
    assert lora.active_adapter(llama) == "b"
    assert all(torch.equal(p, q) for p, q in zip(lora.trainable_parameters(llama, "a"), a_before))
    assert any(not torch.equal(p, q) for p, q in zip(lora.trainable_parameters(llama, "b"), b_before))
