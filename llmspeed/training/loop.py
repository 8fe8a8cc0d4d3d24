"""The training loop every fine-tuning verb shares: random windows, AdamW, warm-up and decay, mixed precision.

Random windows of ``seq_len`` tokens are cut from the training text (default: the ``"train"`` half of
the pydoc text, which shares no characters with the ``"eval"`` half the evaluation windows are cut from, though
some paragraphs occur in both). AdamW updates exactly the parameters it is
given (the caller chooses them: an adapter, a whole model, the latent weights of a QAT model), with linear
warm-up and linear decay, gradient clipping, optional gradient checkpointing and mixed precision
(:mod:`.amp`). Loss on ``pydoc_text("eval")`` windows (the half the default training text is not cut from;
some of its paragraphs repeat in that text, :mod:`llmspeed.eval.text`) is measured before and after when
``eval_windows > 0``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..protocol import CausalLM, holds_step_lock, training_modes
from .amp import MixedPrecision, check_precision


@dataclass(frozen=True)
class FinetuneResult:
    """What a fine-tuning run did.

    Attributes:
        adapter: The adapter trained (``None`` when model parameters were trained).
        steps: Optimizer steps attempted.
        losses: Training loss of every step (nats per token).
        seconds: Wall time of the training steps (evaluation excluded).
        trainable_params: Number of parameters updated.
        eval_loss_before, eval_loss_after: Mean held-out loss (nats per token), ``None`` when
            ``eval_windows == 0``; ``math.exp`` of them is the perplexity.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: ``"bf16"``/``"fp16"`` autocast over fp32 trained
            parameters; ``"fp32"`` runs no autocast, the parameters training in their own dtype (16 bits on a
            model cast to 16 bits).
        skipped_steps: fp16 steps whose gradients overflowed and were not applied (loss scaling).
        trained: What was trained: ``"adapter"``, ``"full"`` or ``"linears"``.
        step_seconds: Wall time of every step (batch, forward, backward, optimizer), for medians.
    """

    adapter: str | None
    steps: int
    losses: tuple[float, ...]
    seconds: float
    trainable_params: int
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    precision: str = "fp32"
    skipped_steps: int = 0
    trained: str = "adapter"
    step_seconds: tuple[float, ...] = ()

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
        integer = not (texts.is_floating_point() or texts.is_complex() or texts.dtype == torch.bool)
        if texts.dim() != 1 or not integer or texts.numel() == 0:
            raise ValueError(
                f"texts as a tensor must be 1-D integer token ids; got {texts.dtype} {tuple(texts.shape)}"
            )
        ids = texts.long().cpu()  # compared as int64: a uint8/int8 tensor would wrap the vocabulary size
        if ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab}); got range [{ids.min()}, {ids.max()}]")
        return ids
    if model.tokenizer is None:
        raise ValueError("model has no tokenizer; wrap it with llmspeed.wrap(hf_model, tokenizer)")
    if texts is None:
        from ..eval import pydoc_text

        texts = [pydoc_text("train")]
    elif isinstance(texts, str):
        texts = [texts]
    elif isinstance(texts, AbstractSet):  # set, frozenset, dict.keys(): an order that changes with the hash seed
        raise ValueError(f"texts must be a non-empty string, a list of non-empty strings or a 1-D tensor of token ids; "
                         f"got a {type(texts).__name__}, whose order (and so the windows a seed draws) changes from "
                         f"run to run: pass a list, e.g. sorted(texts)")  # fmt: skip
    elif isinstance(texts, (list, tuple)) or (hasattr(texts, "__iter__") and not isinstance(texts, (bytes, dict))):
        texts = list(texts)  # a generator is read once here, not emptied by the check below
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise ValueError(f"texts must be a non-empty string, a list of non-empty strings or a 1-D tensor of token "
                         f"ids; got {texts!r:.80}")  # fmt: skip
    eos = model.tokenizer.eos_token_id
    tokens: list[int] = []
    for text in texts:
        tokens += model.tokenizer.encode(text, add_special_tokens=False)
        if eos is not None:
            tokens.append(eos)
    return torch.tensor(tokens, dtype=torch.long)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_arguments(
    steps: int,
    lr: float,
    seq_len: int,
    batch_size: int,
    *,
    warmup_steps: int | None = None,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    eval_windows: int = 0,
    seed: int = 0,
    gradient_checkpointing: bool = False,
    progress: bool = True,
    context: int | None = None,
    tokenizer: bool = True,
) -> None:
    """``ValueError`` naming the first training argument (those of :func:`train`) that is invalid.

    ``context``: the model's longest sequence (``model.spec.max_positions``), which ``seq_len`` may not pass;
    ``tokenizer``: whether the model has one, which ``eval_windows > 0`` needs to score held-out text.
    """
    for arg, value in (("steps", steps), ("seq_len", seq_len), ("batch_size", batch_size)):
        if not _is_int(value) or value <= 0:
            raise ValueError(f"{arg} must be a positive integer; got {value!r}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2; got {seq_len}")
    if context is not None and seq_len > context:
        raise ValueError(f"seq_len must be at most the model's context of {context} tokens "
                         f"(model.spec.max_positions); got seq_len={seq_len}")  # fmt: skip
    if not _is_finite(lr) or not lr > 0:
        raise ValueError(f"lr must be a positive number; got {lr!r}")
    if warmup_steps is not None and (not _is_int(warmup_steps) or warmup_steps < 0):
        raise ValueError(f"warmup_steps must be None (a tenth of steps) or an integer >= 0; got {warmup_steps!r}")
    if warmup_steps is not None and warmup_steps > steps:  # the rate would never reach lr
        raise ValueError(f"warmup_steps must be at most steps; got warmup_steps={warmup_steps} with steps={steps}: "
                         f"the warm-up would end after the last step, short of the peak rate lr")  # fmt: skip
    if not _is_finite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0; got {weight_decay!r}")
    if not _is_finite(max_grad_norm) or not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be a finite number > 0; got {max_grad_norm!r}")
    if not _is_int(eval_windows) or eval_windows < 0:
        raise ValueError(f"eval_windows must be an integer >= 0; got {eval_windows!r}")
    if eval_windows and not tokenizer:
        raise ValueError(f"eval_windows={eval_windows} scores held-out pydoc text, which needs a tokenizer, and the "
                         f"model has none; use eval_windows=0 or llmspeed.wrap(hf_model, tokenizer)")  # fmt: skip
    if not _is_int(seed) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64); got {seed!r}")
    for arg, flag in (("gradient_checkpointing", gradient_checkpointing), ("progress", progress)):
        if not isinstance(flag, bool):
            raise ValueError(f"{arg} must be a bool; got {flag!r}")


def check_length(data: torch.Tensor, seq_len: int) -> None:
    """``ValueError`` when the token stream ``data`` holds less than one window of ``seq_len`` tokens."""
    if data.numel() < seq_len:
        raise ValueError(f"texts hold {data.numel()} tokens; seq_len={seq_len} needs at least {seq_len}")


def set_checkpointing(hf: Any, on: bool, recompute: Callable[[], AbstractContextManager] | None = None) -> bool:
    """Turn transformers' non-reentrant activation checkpointing on or off; False if unsupported.

    ``recompute``: a context factory the recomputation of each checkpointed layer runs in (the backward pass does
    not carry the forward pass's torch function modes)."""
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if recompute is not None:
        kwargs["context_fn"] = lambda: (nullcontext(), recompute())
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.x name
        if on:
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            hf.activation_checkpointing_disable()
        return True
    if hasattr(hf, "gradient_checkpointing_enable"):
        if on:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            hf.gradient_checkpointing_disable()
        return True
    if on:
        raise ValueError(f"gradient_checkpointing=True needs a transformers model; got {type(hf).__name__}")
    return False


_INPUT_GRAD_HOOKS = ("_require_grads_hooks", "_require_grads_hook")  # transformers' enable_input_require_grads handles


def _drop_new_input_grad_hooks(hf: Any, before: dict[str, Any]) -> None:
    """Remove the input-embedding hooks that switching checkpointing on registered and put back what ``hf`` held.

    transformers' ``activation_checkpointing_enable`` calls ``enable_input_require_grads`` (a forward hook making the
    embedding's output require grad) and its ``*_disable`` removes it only for PEFT models: every checkpointed run
    would leave one more hook, and every later forward in grad mode would record a graph from the embedding on.
    """
    hooks = hf.__dict__.get("_require_grads_hooks")
    if hooks is before.get("_require_grads_hooks"):
        return  # none registered during the run
    for handle in hooks or ():
        handle.remove()
    for name in _INPUT_GRAD_HOOKS:
        hf.__dict__.pop(name, None)
        if name in before:
            hf.__dict__[name] = before[name]


def _eval_loss(model: CausalLM, windows: int, seq_len: int) -> float | None:
    if windows <= 0:
        return None
    from ..eval import window_losses

    return window_losses(model, window=seq_len, n_windows=windows, batch_size=4).mean().item()


@holds_step_lock
def train(
    model: CausalLM,
    params: Sequence[torch.Tensor],
    data: torch.Tensor,  # [N] token ids
    *,
    steps: int,
    lr: float,
    seq_len: int,
    batch_size: int,
    precision: str = "fp32",
    gradient_checkpointing: bool = False,
    warmup_steps: int | None = None,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    eval_windows: int = 0,
    seed: int = 0,
    progress: bool = True,
    label: str = "finetune",
    adapter: str | None = None,
    trained: str = "adapter",
) -> FinetuneResult:
    """Train exactly ``params`` of ``model`` on windows of ``data``; every other parameter is frozen meanwhile.

    The arguments are those of :func:`llmspeed.finetune` (validated there); ``requires_grad`` flags and
    the train/eval mode are restored afterwards, also when a step raises. The run holds the model's
    :func:`~llmspeed.protocol.step_lock`: an Engine or Generator stepping the model from another thread waits until
    it ends (its steps would otherwise run in training mode, dropout on, with weights half updated, and set their
    adapter routing under the training forward).
    """
    options: dict[str, Any] = dict(warmup_steps=warmup_steps, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                   eval_windows=eval_windows, seed=seed, gradient_checkpointing=gradient_checkpointing, progress=progress)
    check_arguments(steps, lr, seq_len, batch_size, context=model.spec.max_positions,
                    tokenizer=model.tokenizer is not None, **options)  # fmt: skip
    check_length(data, seq_len)
    device = model.spec.device
    check_precision(precision, device, params)
    frozen = [name for name, p in model.module.named_parameters() if p.is_inference() and any(p is q for q in params)]
    if frozen:  # torch refuses requires_grad on them, and only after the run has started changing flags
        raise ValueError(f"{len(frozen)} of the parameters to train ({', '.join(frozen[:3])}{', ...' if len(frozen) > 3 else ''}) "
                         f"are inference tensors: the model was created under torch.inference_mode(), and such tensors "
                         f"cannot require gradients; load or create the model outside inference_mode to train it")  # fmt: skip
    mp = MixedPrecision(precision, device.type)
    before = _eval_loss(model, eval_windows, seq_len)  # before any change: a failure here leaves the model as is
    hf = model.module
    flags = {p: p.requires_grad for p in hf.parameters()}
    restore_modes = training_modes(hf)  # each module's own: a caller may have switched off some dropout
    warmup = max(1, steps // 10 if warmup_steps is None else warmup_steps)  # 0: full lr from the first step
    generator = torch.Generator().manual_seed(seed)
    checkpointing = False
    bar = None  # the progress bar, closed by the finally also when a step raises
    input_grad_hooks = {name: hf.__dict__[name] for name in _INPUT_GRAD_HOOKS if name in hf.__dict__}
    losses: list[float] = []
    times: list[float] = []
    try:  # from here on the finally restores requires_grad, the train/eval mode and checkpointing
        for p in hf.parameters():
            p.requires_grad_(False)
        for param in params:
            param.requires_grad_(True)
        # fused: one kernel over all tensors (CPU and CUDA); the per-tensor loop costs a third of a CPU step
        fused = device.type in ("cpu", "cuda") and all(p.dtype == torch.float32 for p in params)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
        optimizer.zero_grad(set_to_none=True)  # a caller's leftover .grad would add to the first step's (as Trainer's)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
        )
        # switched on here and off afterwards, unless the caller's model had it on already (then it stays on)
        flag = "is_activation_checkpointing" if hasattr(type(hf), "is_activation_checkpointing") else "is_gradient_checkpointing"
        already = bool(getattr(hf, flag, False))  # the newer name first: the older one warns it is deprecated
        if already:  # its recomputation would not run the fp32-product linears the forward pass ran (amp.py)
            mp.fast_linears = False
        checkpointing = gradient_checkpointing and not already and set_checkpointing(hf, True, mp.recompute_context)
        hf.train()
        start = time.perf_counter()
        # torch.manual_seed seeds every CUDA device too: fork those the process has set up, so that the caller's GPU
        # random state comes back as well
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        # gradients on also when the caller runs under no_grad or inference_mode (backward would fail on a loss with no
        # graph); the caller's mode comes back when the block ends
        with torch.random.fork_rng(devices=cuda), torch.inference_mode(False), torch.enable_grad():
            torch.manual_seed(seed)
            bar = tqdm(range(steps), disable=not progress, desc=f"{label} ({mp.precision})")
            for _ in bar:  # a step that raises closes the bar in the finally below, not half drawn
                tick = time.perf_counter()
                # every window start, the last included: its final token is a target too
                starts = torch.randint(0, data.numel() - seq_len + 1, (batch_size,), generator=generator)  # [B]
                batch = torch.stack([data[s : s + seq_len] for s in starts.tolist()]).to(device)  # [B, seq_len]
                with mp.autocast():
                    loss = hf(input_ids=batch, labels=batch, use_cache=False).loss
                mp.backward(loss)
                mp.step(optimizer, params, max_grad_norm)
                schedule.step()  # a skipped fp16 step still advances the schedule, which ends at `steps` (HF's Trainer holds it)
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())  # .item() waits for the device: the step is complete
                times.append(time.perf_counter() - tick)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        seconds = time.perf_counter() - start
    finally:
        if bar is not None:
            bar.close()
        if checkpointing:
            set_checkpointing(hf, False)
        _drop_new_input_grad_hooks(hf, input_grad_hooks)
        restore_modes()
        for p, trainable in flags.items():
            p.requires_grad_(trainable)
    if steps and mp.skipped_steps == steps:  # a forward pass that overflows fp16 every step: nothing trained
        warnings.warn(f"every one of the {steps} {mp.precision} steps overflowed (last loss {losses[-1]}) and was "
                      f"skipped: the parameters did not change; train with precision='bf16' (fp32's range) or "
                      f"'fp32'", RuntimeWarning, stacklevel=3)  # fmt: skip
    after = _eval_loss(model, eval_windows, seq_len)
    return FinetuneResult(
        adapter,
        steps,
        tuple(losses),
        seconds,
        sum(p.numel() for p in params),
        before,
        after,
        mp.precision,  # the canonical name: "bf16" for "bfloat16" or torch.bfloat16
        mp.skipped_steps,
        trained,
        tuple(times),
    )
