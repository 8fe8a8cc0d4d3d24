"""``finetune``: a small, honest trainer for LoRA adapters (or, for comparison, the whole model).

AdamW updates only the active adapter's matrices (the base, float or quantized, stays frozen: its
tensors are bit-identical afterwards). The loop itself (random windows of the training text, warm-up
and decay, clipping, checkpointing, mixed precision, held-out loss) is :func:`llmspeed.training.train`,
shared with :func:`llmspeed.finetune`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..model import as_model
from ..protocol import CausalLM, holds_step_lock, is_quantized
from ..training import FinetuneResult, check_arguments, check_length, check_precision, token_stream, train
from .inject import (
    active_adapter,
    adapter_names,
    lora_layers,
    require_adapter,
    set_adapter,
    trainable_parameters,
)

__all__ = ["FinetuneResult", "finetune", "token_stream"]


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
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.disabled for layer in layers):  # the loss would not depend on the adapter at all
        raise ValueError("the model's adapters are disabled (inside lora.disabled(model)); train outside that block")
    if any(layer.routing is not None for layer in layers):  # the rows would run the routed adapters instead
        raise ValueError("the model runs a mixed-adapter batch (inside lora.per_row_adapters or per_token_adapters); "
                         "train outside that block")  # fmt: skip
    return trainable_parameters(model, adapter)


@holds_step_lock
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
    precision: str = "fp32",
) -> FinetuneResult:
    """Train the active adapter (or ``adapter``) of ``model`` on ``texts``; return the losses and timing.

    Holds the model's :func:`~llmspeed.protocol.step_lock` from its checks to its end, as the other verbs that change
    adapters do: an Engine serving the model from another thread finishes its step in flight, then waits for the
    training to end, and serves on with the trained adapter.

    Args:
        model: A model carrying at least one adapter (``full=True``: a plain float model).
        texts: Training text(s), or a 1-D tensor of token ids; default ``llmspeed.eval.pydoc_text("train")``.
        steps, lr, seq_len, batch_size: Optimizer steps, peak learning rate, tokens per window,
            windows per step.
        adapter: The adapter to train (default: the active one); it is made active.
        full: Train every float parameter of the model instead (the full fine-tuning baseline).
        gradient_checkpointing: Recompute each decoder layer's activations in the backward pass
            (transformers' non-reentrant checkpointing): less memory, about a third more compute.
        warmup_steps: Linear warm-up steps, at most ``steps`` (default: a tenth of ``steps``), then linear decay to 0.
        weight_decay, max_grad_norm: AdamW decay and the gradient-norm clip.
        eval_windows: Windows of ``seq_len`` tokens from ``pydoc_text("eval")`` scored before and after (0: skip);
            the default training text is the other half, though some paragraphs repeat in both.
        seed: Seed of the window sampler (and dropout).
        progress: Show a tqdm progress bar with the running loss.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: autocast compute over fp32 adapters and
            optimizer state (fp16 with dynamic loss scaling); over a quantized base this is QLoRA's
            bf16 compute over the 4-bit weights. See :mod:`llmspeed.training.amp`.
    """
    model = as_model(model)  # a transformers model is wrapped, as add_adapter does
    check_arguments(
        steps, lr, seq_len, batch_size, warmup_steps=warmup_steps, weight_decay=weight_decay,
        max_grad_norm=max_grad_norm, eval_windows=eval_windows, seed=seed,
        gradient_checkpointing=gradient_checkpointing, progress=progress, context=model.spec.max_positions,
        tokenizer=model.tokenizer is not None,
    )
    if not isinstance(full, bool):
        raise ValueError(f"full must be a bool; got {full!r}")
    adapter = None if full else (active_adapter(model) if adapter is None else adapter)  # "" names no adapter: refused
    if not full and adapter is None and adapter_names(model):  # full=True would refuse an adapted model
        raise ValueError(
            f"none of the model's adapters {adapter_names(model)} is active; pass adapter=<name> or call "
            f"lora.set_adapter(model, name) first"
        )
    if not full and adapter is None:
        raise ValueError(
            "model has no active adapter; call lora.add_adapter(model, name, ...) first or pass full=True"
        )
    params = _parameters(model, adapter, full)
    data = token_stream(model, texts)
    check_length(data, seq_len)
    check_precision(precision, model.spec.device, params)  # before set_adapter changes anything
    if adapter is not None:
        set_adapter(model, adapter)
    return train(
        model,
        params,
        data,
        steps=steps,
        lr=lr,
        seq_len=seq_len,
        batch_size=batch_size,
        precision=precision,
        gradient_checkpointing=gradient_checkpointing,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        eval_windows=eval_windows,
        seed=seed,
        progress=progress,
        label=f"finetune {adapter or 'full'}",
        adapter=adapter,
        trained="full" if full else "adapter",
    )
