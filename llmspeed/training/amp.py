"""Mixed-precision training: autocast over fp32 master weights, dynamic loss scaling for fp16.

``precision="bf16"`` or ``"fp16"`` runs the forward pass (and so the backward matmuls) under
``torch.autocast`` on the model's device type, while the parameters, their gradients and the optimizer
state stay fp32 (the "master weights" of Micikevicius et al. 2018). fp16 has a small range, so its loss
is multiplied by a dynamic scale (``torch.amp.GradScaler``): a step whose gradients overflow is skipped
and the scale halved; after 2000 clean steps it doubles. bf16 has fp32's range and needs no scaling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field

import torch

from ..names import dtype_name
from . import cpu_autocast

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def unsupported_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why autocast to ``dtype`` cannot train on ``device`` here, or ``None`` when it can."""
    if dtype == torch.float32:
        return None
    if not torch.amp.is_autocast_available(device.type):
        return f"torch {torch.__version__} has no autocast for device type {device.type!r}"
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return f"this GPU ({torch.cuda.get_device_name(device)}) does not support bf16"
    if device.type not in ("cpu", "cuda") and dtype == torch.float16:
        return f"fp16 loss scaling (GradScaler) is only wired for cpu and cuda, not {device.type!r}"
    return None


def check_precision(precision: object, device: torch.device, params: Sequence[torch.Tensor]) -> torch.dtype:
    """The compute dtype of ``precision``; ``ValueError`` for an unknown name, an unsupported device or
    trainable parameters that are not fp32 master weights."""
    given, precision = precision, dtype_name(precision)  # "bfloat16", "half", torch.bfloat16, ...
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}; got {given!r}")
    dtype = PRECISIONS[precision]
    reason = unsupported_reason(device, dtype)
    if reason is not None:
        raise ValueError(f"precision={precision!r} is not supported on {device}: {reason}; use 'fp32'")
    if dtype != torch.float32:
        other = sorted({str(p.dtype) for p in params if p.dtype != torch.float32})
        if other:
            raise ValueError(
                f"precision={precision!r} keeps fp32 master weights, but trainable parameters are {other}; "
                f"train an fp32 model (or fp32 adapters) and let autocast do the 16-bit compute"
            )
    return dtype


@dataclass
class MixedPrecision:
    """One training run's autocast and loss scaling: ``with mp.autocast(): loss = ...``,
    ``mp.backward(loss)``, ``took = mp.step(optimizer, params, max_grad_norm)``.

    Attributes:
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        device_type: ``"cpu"`` or ``"cuda"`` (the model's device type).
        init_scale: fp16 only: the first loss scale (GradScaler's default, 2**16).
        skipped_steps: Steps whose gradients overflowed (fp16), so the optimizer did not update.
        cpu_matmul: ``"auto"``: on a CPU without fast 16-bit GEMM, the linear layers multiply in fp32 over
            operands rounded as autocast rounds them (:mod:`.cpu_autocast`); ``"native"``: autocast's own
            16-bit kernels everywhere.
    """

    precision: str
    device_type: str
    init_scale: float = 2.0**16
    cpu_matmul: str = "auto"
    skipped_steps: int = 0
    scaler: torch.amp.GradScaler | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        given, self.precision = self.precision, dtype_name(self.precision)  # type: ignore[assignment]
        if not isinstance(self.precision, str) or self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}; got {given!r}")
        self.dtype = PRECISIONS[self.precision]
        try:  # torch.autocast refuses an unknown device type only when entered, also for fp32 (autocast off)
            known = isinstance(self.device_type, str) and torch.amp.is_autocast_available(self.device_type)
        except RuntimeError:  # not a device type at all ("gpu")
            known = False
        if not known:
            raise ValueError(f"device_type must be a device type torch can autocast on ('cpu', 'cuda', ...); "
                             f"got {self.device_type!r}")  # fmt: skip
        scale = self.init_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            # 0 skips every step (0 * inf = NaN when unscaled) and lets the scale fall no further; NaN the same
            raise ValueError(f"init_scale must be a finite number > 0; got {scale!r}")
        if self.cpu_matmul not in ("auto", "native"):
            raise ValueError(f"cpu_matmul must be 'auto' or 'native'; got {self.cpu_matmul!r}")
        self.fast_linears = self.cpu_matmul == "auto" and cpu_autocast.wanted(self.device_type, self.dtype)
        if self.dtype == torch.float16:
            if self.device_type not in ("cpu", "cuda"):  # what unsupported_reason says GradScaler is wired for
                raise ValueError(f"device_type must be 'cpu' or 'cuda' for fp16 loss scaling; got {self.device_type!r}")
            self.scaler = torch.amp.GradScaler(self.device_type, init_scale=self.init_scale)

    def autocast(self) -> AbstractContextManager:
        """The forward-pass context: autocast to the compute dtype (a no-op for fp32), with the fp32-product
        linear layers of :mod:`.cpu_autocast` where they apply."""
        stack = ExitStack()
        stack.enter_context(torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype != torch.float32))
        if self.fast_linears:
            stack.enter_context(cpu_autocast.FastLinears())
        return stack

    @property
    def recompute_context(self) -> Callable[[], AbstractContextManager] | None:
        """For activation checkpointing: the context its recomputed forward passes need to compute as the
        first ran (``None`` when :meth:`autocast` adds nothing that checkpointing does not restore itself)."""
        return cpu_autocast.FastLinears if self.fast_linears else None

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` (scaled first for fp16)."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], max_grad_norm: float) -> bool:
        """Unscale, clip and apply the gradients; False (and counted) when fp16 gradients overflowed."""
        if self.scaler is None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            return True
        self.scaler.unscale_(optimizer)  # records inf/NaN before clipping touches them
        # the unscaled gradients' norm is finite exactly when scaler.step will take the step (it skips on the inf/NaN
        # it recorded); not whether the scale fell, which stops once it has halved to 0 (after 166 overflowed steps
        # in a row from 2**16; a forward pass that overflows every step gets there)
        took = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(params, max_grad_norm)))
        self.scaler.step(optimizer)  # skips optimizer.step() on inf/NaN gradients
        self.scaler.update()
        self.skipped_steps += not took
        return took

    @property
    def loss_scale(self) -> float:
        """The current fp16 loss scale (1.0 without scaling)."""
        return 1.0 if self.scaler is None else float(self.scaler.get_scale())
