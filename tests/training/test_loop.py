"""The training loop against a hand-written reference: the same random windows, AdamW with decoupled weight
decay, global-norm gradient clipping and the linear warm-up/decay schedule give the same weights."""

from __future__ import annotations

import copy

import pytest
import torch

import llmspeed

TOKENS = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(1))


def _reference(hf, *, steps, lr, seq_len, batch_size, warmup, weight_decay, max_grad_norm, seed=0):
    """Train every parameter of ``hf`` the textbook way; the rate at step s (0-based) is
    lr * min((s + 1) / warmup, (steps - s) / (steps - warmup)): the peak after ``warmup`` steps, then linearly down."""
    params = list(hf.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    hf.train()
    rates = []
    for s in range(steps):
        rate = lr * min((s + 1) / warmup, (steps - s) / (steps - warmup))
        for group in optimizer.param_groups:
            group["lr"] = rate
        rates.append(rate)
        starts = torch.randint(0, TOKENS.numel() - seq_len + 1, (batch_size,), generator=generator)
        batch = torch.stack([TOKENS[s0 : s0 + seq_len] for s0 in starts.tolist()])
        loss = hf(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
        for p in params:  # clip to the global norm
            p.grad.mul_(min(1.0, max_grad_norm / (float(norm) + 1e-6)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return rates


@pytest.mark.parametrize(
    "warmup_steps, weight_decay, max_grad_norm", [(2, 0.0, 1e9), (1, 0.5, 1e9), (3, 0.1, 0.05)]
)
def test_finetune_matches_a_reference_adamw_loop(warmup_steps, weight_decay, max_grad_norm):
    model = llmspeed.models.tiny("llama", seed=0)
    reference = copy.deepcopy(model.hf)
    run = dict(steps=6, lr=3e-3, seq_len=16, batch_size=2)
    seen = []
    step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):  # the rate each step was taken with
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    torch.optim.AdamW.step = spy
    try:
        result = llmspeed.finetune(model, TOKENS, train="full", warmup_steps=warmup_steps, weight_decay=weight_decay,
                                   max_grad_norm=max_grad_norm, progress=False, **run)  # fmt: skip
    finally:
        torch.optim.AdamW.step = step
    rates = _reference(
        reference, warmup=warmup_steps, weight_decay=weight_decay, max_grad_norm=max_grad_norm, **run
    )
    assert seen == pytest.approx(rates, rel=1e-6)
    assert result.trainable_params == sum(p.numel() for p in reference.parameters())
    for (name, got), want in zip(model.hf.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("extra", [0, 1])
def test_every_window_is_drawn_the_last_included(extra):
    """Regression: starts were drawn below ``len - seq_len``, so the last window was never trained on (the
    text's final token never a target) and a text of exactly ``seq_len`` tokens was refused."""
    model = llmspeed.models.tiny("llama", seed=0)
    seq_len = 8
    text = TOKENS[: seq_len + extra]
    seen = set()

    def spy(module, args, kwargs):
        seen.update(int(row[-1]) for row in kwargs["input_ids"])

    hook = model.hf.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        llmspeed.finetune(model, text, steps=6, lr=1e-3, seq_len=seq_len, batch_size=2, train="full", progress=False)
    finally:
        hook.remove()
    assert int(text[-1]) in seen  # the window ending at the text's last token was drawn
    assert seen <= {int(t) for t in text[seq_len - 1 :]}


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_a_run_started_without_gradients_trains_as_any_other(mode):
    """Regression: called under no_grad or inference_mode (a notebook's evaluation helper, a serving thread), every run
    failed at its first backward with torch's "element 0 of tensors does not require grad"; the caller's mode now
    stays its own outside the run."""
    run = dict(steps=3, lr=1e-3, seq_len=16, batch_size=2, progress=False)
    model = llmspeed.models.tiny("llama", seed=0)
    expected = llmspeed.finetune(copy.deepcopy(model), TOKENS, **run).losses
    with mode():
        assert llmspeed.finetune(model, TOKENS, **run).losses == expected
        assert not torch.is_grad_enabled()


def test_a_model_created_under_inference_mode_is_refused_by_name_before_anything_changes():
    """Regression: training a model whose parameters are inference tensors failed with torch's "Setting
    requires_grad=True on inference tensor outside InferenceMode is not allowed", after the run had started."""
    with torch.inference_mode():
        model = llmspeed.models.tiny("llama", seed=0)
    flags = [p.requires_grad for p in model.hf.parameters()]
    with pytest.raises(ValueError, match=r"parameters to train \(model\.embed_tokens\.weight, .*\) are inference "
                                         r"tensors: the model was created under torch\.inference_mode\(\)"):
        llmspeed.finetune(model, TOKENS, steps=2, lr=1e-3, seq_len=16, batch_size=2, train="full", progress=False)
    assert [p.requires_grad for p in model.hf.parameters()] == flags and model.hf.training is False


def test_gradients_left_on_the_parameters_by_the_caller_do_not_reach_the_first_step():
    """Regression: the loop cleared the gradients after each step only, so a caller's leftover ``.grad`` (their own
    backward pass before the run) was added to the first step's gradient: other weights, other losses."""
    run = dict(steps=3, lr=1e-3, seq_len=16, batch_size=2, progress=False)
    model = llmspeed.models.tiny("llama", seed=0)
    clean = copy.deepcopy(model)
    expected = llmspeed.finetune(clean, TOKENS, **run).losses
    ids = TOKENS[None, :8]
    model.hf(input_ids=ids, labels=ids).loss.mul(1000).backward()  # the caller's own gradients, left in place
    assert llmspeed.finetune(model, TOKENS, **run).losses == expected
    assert all(torch.equal(p, q) for p, q in zip(model.hf.parameters(), clean.hf.parameters()))
