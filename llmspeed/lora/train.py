"""``finetune``: a small, honest trainer for LoRA adapters (or, for comparison, the whole model).

Random windows of ``seq_len`` tokens are cut from the training text (default: the ``"train"``
half of the pydoc text, which never overlaps the evaluation windows), AdamW updates only the
active adapter's matrices (the base, float or quantized, stays frozen: its tensors are bit-identical
afterwards), with linear warm-up and linear decay, gradient clipping and optional gradient
checkpointing. Held-out loss on ``pydoc_text("eval")`` windows is measured before and after when
``eval_windows > 0``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..protocol import CausalLM, is_quantized
from .inject import active_adapter, lora_layers, require_adapter, set_adapter, trainable_parameters


@dataclass(frozen=True)
class FinetuneResult:
    """What :func:`finetune` did.

    Attributes:
        adapter: The adapter trained (``None`` for a full fine-tune).
        steps: Optimizer steps taken.
        losses: Training loss of every step (nats per token).
        seconds: Wall time of the training steps (evaluation excluded).
        trainable_params: Number of parameters updated.
        eval_loss_before, eval_loss_after: Mean held-out loss (nats per token), ``None`` when
            ``eval_windows == 0``; ``math.exp`` of them is the perplexity.
    """

    adapter: str | None
    steps: int
    losses: tuple[float, ...]
    seconds: float
    trainable_params: int
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None

    @property
    def steps_per_second(self) -> float:
        """Optimizer steps per second of training time."""
        return self.steps / self.seconds if self.seconds > 0 else float("inf")


def token_stream(model: CausalLM, texts: str | Sequence[str] | torch.Tensor | None) -> torch.Tensor:  # [N]
    """Token ids of ``texts`` joined with the end-of-sequence token (default: the pydoc train half).

    A 1-D integer tensor is taken as token ids already (for models without a tokenizer).
    """
    if isinstance(texts, torch.Tensor):
        vocab = model.spec.vocab_size
        if texts.dim() != 1 or texts.is_floating_point() or texts.numel() == 0:
            raise ValueError(
                f"texts as a tensor must be 1-D integer token ids; got {texts.dtype} {tuple(texts.shape)}"
            )
        if texts.min() < 0 or texts.max() >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab}); got range [{texts.min()}, {texts.max()}]")
        return texts.long().cpu()
    if model.tokenizer is None:
        raise ValueError("model has no tokenizer; wrap it with llmspeed.wrap(hf_model, tokenizer)")
    if texts is None:
        from ..eval import pydoc_text

        texts = [pydoc_text("train")]
    elif isinstance(texts, str):
        texts = [texts]
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise ValueError("texts must be a non-empty string or a list of non-empty strings")
    eos = model.tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids += model.tokenizer.encode(text, add_special_tokens=False)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def _check(steps: int, lr: float, seq_len: int, batch_size: int) -> None:
    for arg, value in (("steps", steps), ("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{arg} must be a positive integer; got {value!r}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2; got {seq_len}")
    if not isinstance(lr, (int, float)) or not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"lr must be a positive number; got {lr!r}")


def _parameters(model: CausalLM, adapter: str | None, full: bool) -> list[torch.Tensor]:
    if full:
        quantized = [n for n, m in model.linear_layers() if is_quantized(m)]
        if quantized or any(True for _ in lora_layers(model)):
            raise ValueError(
                "full=True trains a plain float model; this one is quantized or carries adapters"
            )
        return [p for p in model.module.parameters() if p.is_floating_point()]
    require_adapter(model, adapter, arg="adapter")
    assert adapter is not None  # checked just above
    if any(adapter in layer.merged for _, layer in lora_layers(model)):
        raise ValueError(f"adapter {adapter!r} is merged into the base; unmerge it before training")
    return trainable_parameters(model, adapter)


def _set_checkpointing(hf: Any, on: bool) -> bool:
    """Turn transformers' non-reentrant activation checkpointing on or off; False if unsupported."""
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.x name
        if on:
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.activation_checkpointing_disable()
        return True
    if hasattr(hf, "gradient_checkpointing_enable"):
        if on:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_disable()
        return True
    if on:
        raise ValueError(f"gradient_checkpointing=True needs a transformers model; got {type(hf).__name__}")
    return False


def _eval_loss(model: CausalLM, windows: int, seq_len: int) -> float | None:
    if windows <= 0:
        return None
    from ..eval import window_losses

    return window_losses(model, window=seq_len, n_windows=windows, batch_size=4).mean().item()


def finetune(
    model: CausalLM,
    texts: str | Sequence[str] | torch.Tensor | None = None,
    steps: int = 200,
    lr: float = 2e-4,
    seq_len: int = 256,
    batch_size: int = 8,
    adapter: str | None = None,
    full: bool = False,
    gradient_checkpointing: bool = False,
    warmup_steps: int | None = None,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    eval_windows: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> FinetuneResult:
    """Train the active adapter (or ``adapter``) of ``model`` on ``texts``; return the losses and timing.

    Args:
        model: A model carrying at least one adapter (``full=True``: a plain float model).
        texts: Training text(s), or a 1-D tensor of token ids; default ``llmspeed.eval.pydoc_text("train")``.
        steps, lr, seq_len, batch_size: Optimizer steps, peak learning rate, tokens per window,
            windows per step.
        adapter: The adapter to train (default: the active one); it is made active.
        full: Train every float parameter of the model instead (the full fine-tuning baseline).
        gradient_checkpointing: Recompute each decoder layer's activations in the backward pass
            (transformers' non-reentrant checkpointing): less memory, about a third more compute.
        warmup_steps: Linear warm-up steps (default: a tenth of ``steps``), then linear decay to 0.
        weight_decay, max_grad_norm: AdamW decay and the gradient-norm clip.
        eval_windows: Held-out windows of ``seq_len`` tokens from ``pydoc_text("eval")`` scored
            before and after (0: skip).
        seed: Seed of the window sampler (and dropout).
        progress: Show a tqdm progress bar with the running loss.
    """
    _check(steps, lr, seq_len, batch_size)
    adapter = None if full else (adapter or active_adapter(model))
    if not full and adapter is None:
        raise ValueError(
            "model has no active adapter; call lora.add_adapter(model, name, ...) first or pass full=True"
        )
    params = _parameters(model, adapter, full)
    data = token_stream(model, texts)
    if data.numel() < seq_len + 1:
        raise ValueError(f"texts hold {data.numel()} tokens; seq_len={seq_len} needs at least {seq_len + 1}")
    if adapter is not None:
        set_adapter(model, adapter)
    hf = model.module
    device = model.spec.device
    flags = {p: p.requires_grad for p in hf.parameters()}
    for p in hf.parameters():
        p.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    was_training = hf.training
    before = _eval_loss(model, eval_windows, seq_len)
    warmup = max(1, steps // 10) if warmup_steps is None else warmup_steps
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    generator = torch.Generator().manual_seed(seed)
    checkpointing = gradient_checkpointing and _set_checkpointing(hf, True)
    losses: list[float] = []
    hf.train()
    start = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            bar = tqdm(range(steps), disable=not progress, desc=f"finetune {adapter or 'full'}")
            for _ in bar:
                starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=generator)  # [B]
                batch = torch.stack([data[s : s + seq_len] for s in starts.tolist()]).to(
                    device
                )  # [B, seq_len]
                loss = hf(input_ids=batch, labels=batch, use_cache=False).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        seconds = time.perf_counter() - start
    finally:
        if checkpointing:
            _set_checkpointing(hf, False)
        hf.train(was_training)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    after = _eval_loss(model, eval_windows, seq_len)
    return FinetuneResult(
        adapter, steps, tuple(losses), seconds, sum(p.numel() for p in params), before, after
    )
