"""Perplexity over fixed, non-overlapping token windows: reproducible and cheap to compare."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..model import as_model
from ..protocol import CausalLM, training_modes
from .text import pydoc_text


def _check_count(value: object, arg: str, least: int, unit: str = "") -> None:
    """``TypeError`` unless ``value`` is an int (not a bool), ``ValueError`` below ``least``; both name ``arg``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{arg} must be an int; got {type(value).__name__} {value!r}")
    if value < least:
        raise ValueError(f"{arg} must be at least {least}{unit}; got {value}")


def _windows(model: CausalLM, text: str | None, window: int, n_windows: int) -> torch.Tensor:
    _check_count(window, "window", 2, " tokens")
    limit = model.spec.max_positions  # config.json's max_position_embeddings
    if window > limit:  # rotary models run past it without complaint, on positions they never saw in training
        raise ValueError(
            f"window must be at most the model's max_position_embeddings ({limit} tokens, model.spec.max_positions); "
            f"got window={window}: longer windows score positions the model does not support, so the perplexity "
            f"means nothing; pass window <= {limit} (and more n_windows for more text)"
        )
    _check_count(n_windows, "n_windows", 1)
    if model.tokenizer is None:
        raise ValueError("model has no tokenizer; wrap it with llmspeed.wrap(hf_model, tokenizer)")
    text = pydoc_text("eval") if text is None else text
    if not isinstance(text, str):
        raise TypeError(f"text must be a non-empty string; got {type(text).__name__}")
    if not text:
        raise ValueError("text must be a non-empty string; got an empty one")
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    need = window * n_windows
    if len(ids) < need:
        raise ValueError(
            f"text is too short: {len(ids)} tokens, but window={window} x n_windows={n_windows} needs {need}; "
            f"pass a longer text or fewer windows"
        )
    return torch.tensor(ids[:need], dtype=torch.long).view(n_windows, window)  # [n_windows, window]


@torch.no_grad()
def window_losses(
    model: CausalLM,
    text: str | None = None,
    window: int = 512,
    n_windows: int = 16,
    batch_size: int = 4,
    progress: bool = False,
) -> torch.Tensor:  # [n_windows]
    """Mean next-token cross-entropy (nats, computed in fp32) of each window.

    ``model`` is an :class:`llmspeed.Model` with a tokenizer (a transformers model is wrapped, and then
    needs ``llmspeed.wrap(hf_model, tokenizer)``). The arguments are those of :func:`perplexity`;
    the model runs in evaluation mode, as there.
    """
    model = as_model(model)
    _check_count(batch_size, "batch_size", 1)
    if not isinstance(progress, bool):  # "no" is truthy: a bar where none was asked for (finetune refuses it too)
        raise TypeError(f"progress must be True or False; got {progress!r}")
    windows = _windows(model, text, window, n_windows)  # [n, window]
    device = model.spec.device
    hf = model.module
    restore_modes = training_modes(hf)  # each module's own: a caller may have switched off some dropout
    hf.eval()  # dropout off: a model left in training mode would score differently on every call
    losses = []
    try:
        for start in tqdm(range(0, n_windows, batch_size), disable=not progress, desc="perplexity"):
            batch = windows[start : start + batch_size].to(device)  # [b, window]
            logits = hf(input_ids=batch, use_cache=False).logits.float()  # [b, window, vocab]
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
            ).view(batch.shape[0], -1)  # [b, window-1]
            losses.append(loss.mean(dim=1).cpu())
    finally:
        restore_modes()
    return torch.cat(losses)


def perplexity(
    model: CausalLM,
    text: str | None = None,
    window: int = 512,
    n_windows: int = 16,
    batch_size: int = 4,
    progress: bool = False,
) -> float:
    """Perplexity of ``model`` on ``text`` (default: the evaluation half of the pydoc text).

    The first ``window * n_windows`` tokens are cut into non-overlapping windows; each window is
    scored independently (no context carried over), and the result is ``exp`` of the mean loss.
    The model runs in evaluation mode (dropout off); each module's training mode is put back after.

    Raises:
        ValueError: ``window`` below 2 or beyond the model's ``max_position_embeddings`` (rotary models would
            extrapolate silently), ``n_windows`` or ``batch_size`` below 1, no tokenizer, an empty ``text`` or one
            shorter than ``window * n_windows`` tokens; before the model runs.
        TypeError: ``window``, ``n_windows`` or ``batch_size`` not an int, ``text`` not a string.
    """
    return math.exp(window_losses(model, text, window, n_windows, batch_size, progress).mean().item())
