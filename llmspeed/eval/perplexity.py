"""Perplexity over fixed, non-overlapping token windows: reproducible and cheap to compare."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..protocol import CausalLM
from .text import pydoc_text


def _windows(model: CausalLM, text: str | None, window: int, n_windows: int) -> torch.Tensor:
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens; got {window}")
    if n_windows < 1:
        raise ValueError(f"n_windows must be at least 1; got {n_windows}")
    if model.tokenizer is None:
        raise ValueError("model has no tokenizer; wrap it with llmspeed.wrap(hf_model, tokenizer)")
    text = pydoc_text("eval") if text is None else text
    if not isinstance(text, str) or not text:
        raise ValueError(f"text must be a non-empty string; got {type(text).__name__} of length {len(text or '')}")
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
    """Mean next-token cross-entropy (nats, computed in fp32) of each window."""
    windows = _windows(model, text, window, n_windows)  # [n, window]
    device = model.spec.device
    hf = model.module
    losses = []
    for start in tqdm(range(0, n_windows, batch_size), disable=not progress, desc="perplexity"):
        batch = windows[start : start + batch_size].to(device)  # [b, window]
        logits = hf(input_ids=batch, use_cache=False).logits.float()  # [b, window, vocab]
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        ).view(batch.shape[0], -1)  # [b, window-1]
        losses.append(loss.mean(dim=1).cpu())
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
    """
    return math.exp(window_losses(model, text, window, n_windows, batch_size, progress).mean().item())
