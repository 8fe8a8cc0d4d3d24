"""Calibration data for calibrated quantization: text (or token ids) -> ``[n_sequences, seq_len]`` token windows
(:func:`calibration_tokens`, sized by :class:`CalibrationConfig`).

The default text is :func:`llmspeed.eval.calibration_mix` (pydoc's ``"train"`` half, stdlib docstrings,
comments and code, interleaved), which never overlaps the evaluation texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..protocol import CausalLM


@dataclass(frozen=True)
class CalibrationConfig:
    """How much calibration data to use.

    Attributes:
        n_sequences: Token windows to use (at most; fewer if the text is shorter, at least one).
        seq_len: Tokens per window. Short windows keep calibration fast on a CPU: cost grows with
            ``n_sequences * seq_len``, and so does memory (each decoder layer runs over all windows
            in one pass, see :func:`quantize_sequentially`).
    """

    n_sequences: int = 128
    seq_len: int = 128

    def __post_init__(self) -> None:
        for name in ("n_sequences", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")


def default_calibration_text() -> str:
    """The calibration text used when none is given: four registers of text Python ships, interleaved
    (:func:`llmspeed.eval.calibration_mix`: pydoc prose, docstrings, comments, code), never the
    evaluation texts."""
    from ..eval.registers import calibration_mix

    return calibration_mix()


def calibration_tokens(model: CausalLM, calibration: Any, config: CalibrationConfig) -> torch.Tensor:
    """Token windows ``[n, config.seq_len]`` (int64) from ``calibration``; ``ValueError`` on bad input.

    ``calibration`` may be ``None`` (the default text), a string, a list of strings (joined with
    blank lines, then tokenized once) or an int64 tensor of token ids ``[n, T]`` or ``[T]``. The
    tokens are cut into consecutive non-overlapping windows, of which the first
    ``config.n_sequences`` are used. ``config.seq_len`` may not pass the model's context
    (``model.spec.max_positions``), as ``perplexity``'s window and ``finetune``'s ``seq_len`` may not.
    """
    limit = model.spec.max_positions
    if limit is not None and config.seq_len > limit:  # rotary models would run on, at positions never trained
        raise ValueError(f"seq_len must be at most the model's context of {limit} tokens (model.spec.max_positions); "
                         f"got seq_len={config.seq_len}: calibrate on shorter windows (more n_sequences)")  # fmt: skip
    if calibration is None:
        calibration = default_calibration_text()
    if isinstance(calibration, torch.Tensor):
        if calibration.dtype not in (torch.int32, torch.int64) or calibration.dim() not in (1, 2):
            raise ValueError(
                f"calibration tensor must hold token ids, int64 [n, T] or [T]; got {calibration.dtype} "
                f"{tuple(calibration.shape)}"
            )
        ids = calibration.reshape(-1).long()
    else:
        if isinstance(calibration, str):
            calibration = [calibration]
        if not isinstance(calibration, Sequence) or not all(isinstance(t, str) for t in calibration):
            raise ValueError(
                f"calibration must be None, a string, a list of strings or a tensor of token ids; "
                f"got {type(calibration).__name__}"
            )
        text = "\n\n".join(t for t in calibration if t)
        if not text.strip():
            raise ValueError(
                "calibration text is empty: pass non-empty strings, or None for the default text"
            )
        if model.tokenizer is None:
            raise ValueError("calibration text needs a tokenizer: wrap the model with one, or pass token ids")
        ids = torch.tensor(model.tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
    n = min(config.n_sequences, ids.numel() // config.seq_len)
    if n < 1:
        raise ValueError(
            f"calibration is shorter than one window: {ids.numel()} tokens < seq_len={config.seq_len}; "
            f"pass more text or a smaller seq_len"
        )
    vocab = model.spec.vocab_size
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise ValueError(
            f"calibration token ids must lie in [0, {vocab}); got [{int(ids.min())}, {int(ids.max())}]"
        )
    return ids[: n * config.seq_len].view(n, config.seq_len)  # [n, seq_len]
