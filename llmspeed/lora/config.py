"""``LoraConfig``: the frozen description of one adapter (rank, scaling, targets, init).

The field names follow PEFT's ``LoraConfig`` (``r``, ``lora_alpha`` is ``alpha`` here,
``lora_dropout`` is ``dropout``, ``use_rslora``) so that :mod:`llmspeed.lora.io` can write
and read PEFT's ``adapter_config.json`` without a translation table beyond three names.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ..names import CANONICAL_DTYPES, dtype_name

INITS = ("zeros", "random")
ALL_LINEAR = "all-linear"
#: The dtypes adapter matrices may have (float8 types cannot be initialised or multiplied by the layers).
ADAPTER_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def adapter_dtype(dtype: object) -> torch.dtype:
    """The torch dtype of adapter matrices for ``dtype``: one of :data:`ADAPTER_DTYPES` or any spelling of
    fp32/fp16/bf16 that :mod:`llmspeed.names` knows (``"bf16"``, ``"float16"``, ``"half"``); else ``ValueError``."""
    name = dtype_name(dtype)
    resolved = CANONICAL_DTYPES.get(name) if isinstance(name, str) else dtype
    if resolved not in ADAPTER_DTYPES:
        accepted = ", ".join(str(d) for d in ADAPTER_DTYPES)
        raise ValueError(f"dtype must be a floating-point dtype for adapter matrices ({accepted}, or a name such as "
                         f"'bf16' or 'float16'); got {dtype!r}")  # fmt: skip
    return resolved  # type: ignore[return-value]


def real_number(value: object) -> int | float | None:
    """``value`` as a plain Python ``int`` or ``float`` if it is a real number: a Python or NumPy number or a 0-dim
    torch tensor of a numeric dtype (bools refused); else ``None``. Configs loaded with NumPy give such scalars."""
    if isinstance(value, torch.Tensor):
        if value.ndim != 0 or value.dtype == torch.bool or value.is_complex():
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # NumPy registers its numbers, not bool_
        return None
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _finite(number: int | float) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an int beyond a float's range (10**400): no scale can be made of it
        return False


def check_adapter_args(r: object, dropout: object, init: object, **named: object) -> dict[str, int | float]:
    """``ValueError`` naming the first bad argument of an adapter: ``r`` a positive integer, each of ``named``
    (``alpha``, ``scale``) a finite real number, ``dropout`` a number in ``[0, 1)``, ``init`` one of :data:`INITS`.

    Returns ``r``, ``dropout`` and ``named`` as plain Python numbers (see :func:`real_number`), by name.
    """
    rank = real_number(r)
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"r must be a positive integer (the adapter rank); got {r!r}")
    plain: dict[str, int | float] = {"r": rank}
    for name, value in named.items():
        number = real_number(value)
        if number is None or not _finite(number):
            raise ValueError(f"{name} must be a finite number; got {value!r}")
        plain[name] = number
    rate = real_number(dropout)
    if rate is None or not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1); got {dropout!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}; got {init!r}")
    return plain | {"dropout": rate}


@dataclass(frozen=True)
class LoraConfig:
    """One LoRA adapter: ``W x + scale * B (A (dropout(x)))`` at every targeted linear.

    Attributes:
        r: Rank of ``A`` (``[r, in]``) and ``B`` (``[out, r]``); positive.
        alpha: Scaling numerator: ``scale = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).
        targets: ``"all-linear"`` (every linear but the output head), a regex matched against the
            full module name, or a tuple of module-name suffixes (``("q_proj", "v_proj")``).
        dropout: Dropout probability on the adapter's input while training, in ``[0, 1)``.
        init: ``"zeros"`` (``B = 0``: the model is unchanged until trained) or ``"random"``
            (both matrices random, for tests and merge checks).
        use_rslora: Rank-stabilised scaling ``alpha / sqrt(r)`` (Kalajdzievski 2023), which keeps
            the update's size independent of the rank.
    """

    r: int = 8
    alpha: float = 16.0
    targets: str | tuple[str, ...] = ALL_LINEAR
    dropout: float = 0.0
    init: str = "zeros"
    use_rslora: bool = False

    def __post_init__(self) -> None:
        for field, value in check_adapter_args(self.r, self.dropout, self.init, alpha=self.alpha).items():
            object.__setattr__(self, field, value)  # plain Python numbers, as saved to adapter_config.json
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora must be a bool; got {self.use_rslora!r}")
        targets = self.targets
        if isinstance(targets, list):
            object.__setattr__(self, "targets", tuple(targets))
            targets = self.targets
        if isinstance(targets, tuple):
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(f"targets must be a non-empty list of module-name suffixes; got {targets!r}")
        elif not isinstance(targets, str) or not targets:
            raise ValueError(
                f"targets must be 'all-linear', a regex string or a list of module-name suffixes; got {targets!r}"
            )

    @property
    def scale(self) -> float:
        """The factor on ``B A x``: ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
