"""``llmspeed.finetune``: fine-tune whatever should learn (an adapter, the whole model, its linear
weights, a QAT model's latent weights) with one loop and optional mixed precision.

What trains (``train=``):

* ``"auto"`` (default): an adapter (``adapter``, else the active one) when the model carries LoRA adapters,
  else ``"full"``;
* ``"adapter"``: the active (or named) adapter, exactly :func:`llmspeed.lora.finetune`;
* ``"full"``: every floating-point parameter (on a model prepared by :func:`llmspeed.qat.prepare`:
  the latent weights behind the fake quantizers, embeddings, norms, and learnable scales);
* ``"linears"``: only the weights and biases of the linear positions other than the output head (and a
  QAT model's learnable scales): no embedding gradient, the cheapest full-rank choice.

The loop is :func:`llmspeed.training.train`; mixed precision is :mod:`llmspeed.training.amp`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .lora.inject import active_adapter, adapter_names, lora_layers
from .lora.train import finetune as lora_finetune
from .model import as_model
from .protocol import CausalLM, base_linear, is_quantized
from .qat import fake_quant_layers, is_prepared
from .training import FinetuneResult, check_arguments, check_precision, token_stream
from .training import train as run_training

TRAIN = ("auto", "adapter", "full", "linears")
DEFAULT_LR = {"adapter": 2e-4, "full": 2e-5, "linears": 2e-5}


def _head(model: CausalLM) -> nn.Module | None:
    get = getattr(model.module, "get_output_embeddings", None)
    return get() if callable(get) else None


def parameters_to_train(model: CausalLM, train: str) -> list[torch.Tensor]:
    """The parameters ``train="full"`` or ``"linears"`` updates; ``ValueError`` on a quantized or adapted model."""
    quantized = [n for n, m in model.linear_layers() if is_quantized(m)]
    if quantized:
        raise ValueError(
            f"train={train!r} needs float weights, but {len(quantized)} layers are quantized "
            f"(e.g. {quantized[0]!r}); add a LoRA adapter and use train='adapter', or prepare the float "
            f"model with llmspeed.qat.prepare for quantization-aware training"
        )
    if any(True for _ in lora_layers(model)):
        raise ValueError(f"train={train!r} trains the model itself, but it carries LoRA adapters; use train='adapter'")
    if train == "full":
        return [p for p in model.module.parameters() if p.is_floating_point()]
    head = _head(model)
    params: dict[int, torch.Tensor] = {}
    for _, module in model.linear_layers():
        linear = base_linear(module)
        if linear is head:
            continue
        for p in linear.parameters():  # weight, bias, learnable scales
            if p.is_floating_point():
                params[id(p)] = p
    return list(params.values())


def finetune(
    model: CausalLM,
    texts: str | Sequence[str] | torch.Tensor | None = None,
    steps: int = 200,
    lr: float | None = None,
    seq_len: int = 256,
    batch_size: int = 8,
    *,
    train: str = "auto",
    adapter: str | None = None,
    precision: str = "fp32",
    gradient_checkpointing: bool = False,
    warmup_steps: int | None = None,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    eval_windows: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``texts``; return the losses, timing and skipped fp16 steps.

    Args:
        model: A float model, a model prepared by :func:`llmspeed.qat.prepare`, or one carrying LoRA
            adapters (float or quantized base: QLoRA).
        texts: Training text(s), or a 1-D tensor of token ids; default ``llmspeed.eval.pydoc_text("train")``.
        steps, lr, seq_len, batch_size: Optimizer steps, peak learning rate (default 2e-4 for an adapter,
            2e-5 for model weights), tokens per window, windows per step.
        train: What learns: ``"auto"``, ``"adapter"``, ``"full"`` or ``"linears"`` (module docstring).
        adapter: ``train="adapter"``: the adapter to train (default: the active one).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: autocast compute with fp32 master weights and
            optimizer state; fp16 with dynamic loss scaling (overflowed steps skipped and counted).
            ``ValueError`` when the device cannot run it, or for 16 bits when trainable parameters are not fp32.
            ``"fp32"`` runs no autocast: parameters train in their own dtype (a model cast to 16 bits, or 16-bit
            adapters, train in 16 bits with optimizer state of that dtype).
        gradient_checkpointing, warmup_steps, weight_decay, max_grad_norm, eval_windows, seed, progress:
            As :func:`llmspeed.lora.finetune`.

    Raises:
        ValueError: on a bad argument, an unsupported precision, or a model that cannot train that way;
            before anything changes.
    """
    model = as_model(model)  # a transformers model is wrapped, as qat.prepare and lora.add_adapter do
    if train not in TRAIN:
        raise ValueError(f"train must be one of {list(TRAIN)}; got {train!r}")
    mode = train
    if mode == "auto":
        mode = "adapter" if adapter_names(model) else "full"  # also when none is active: "full" would refuse
    lr = DEFAULT_LR[mode] if lr is None else lr
    options: dict[str, Any] = dict(
        gradient_checkpointing=gradient_checkpointing,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        eval_windows=eval_windows,
        seed=seed,
        progress=progress,
    )
    if mode == "adapter":
        names = adapter_names(model)
        if adapter is None and active_adapter(model) is None and names:
            raise ValueError(
                f"train={train!r} trains an adapter, but none of the model's adapters {names} is active; "
                f"pass adapter=<name> or call lora.set_adapter(model, name) first"
            )
        if adapter is None and active_adapter(model) is None:  # lora.finetune's error would say full=True
            raise ValueError(
                "train='adapter' needs a LoRA adapter and the model has none; call "
                "lora.add_adapter(model, name, ...) first or use train='full' or 'linears'"
            )
        return lora_finetune(
            model, texts, steps, lr, seq_len, batch_size, adapter=adapter, precision=precision, **options
        )
    if adapter is not None:
        raise ValueError(f"adapter is only used with train='adapter'; got train={train!r}")
    check_arguments(steps, lr, seq_len, batch_size, context=model.spec.max_positions,
                    tokenizer=model.tokenizer is not None, **options)  # fmt: skip
    params = parameters_to_train(model, mode)
    check_precision(precision, model.spec.device, params)
    data = token_stream(model, texts)
    label = f"finetune {mode}" + (f", qat {next(fake_quant_layers(model))[1].fake_format}" if is_prepared(model) else "")
    return run_training(
        model,
        params,
        data,
        steps=steps,
        lr=lr,
        seq_len=seq_len,
        batch_size=batch_size,
        precision=precision,
        label=label,
        adapter=None,
        trained=mode,
        **options,
    )
