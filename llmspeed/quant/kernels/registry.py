"""The kernel registry: each entry multiplies activations by one quantized module's weight.

A kernel is a function ``run(module, x [M, in]) -> y [M, out]`` (same dtype as ``x``, no bias) plus
what it supports: formats, device types, activation dtypes, a check of whether it exists on this
machine (a compiler, a CUDA build, an aten op) and a check of the module's shape constraints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _always() -> str | None:
    return None


def _any_shape(module, x) -> str | None:
    return None


@dataclass(frozen=True)
class Kernel:
    """One matmul path for quantized weights.

    Attributes:
        name: Registry key, what ``kernel=`` accepts.
        formats: Quantization formats it handles.
        devices: Device types (``"cpu"``, ``"cuda"``).
        dtypes: Activation dtypes.
        run: ``run(module, x [M, in]) -> [M, out]`` in ``x.dtype``.
        description: One line for :func:`llmspeed.kernels`.
        unavailable: Returns why the kernel cannot run on this machine, or ``None`` when it can.
        unsupported: ``unsupported(module, x)`` returns why it cannot run this module/input, or ``None``.
        exact: False for kernels that also quantize activations (looser tolerance, never chosen by ``auto``).
        binder: Optional ``binder(module) -> fn(x) -> y``, a fast path with the module's tensors bound
            once (modules cache it per dtype/device/M bucket); default ``partial(run, module)``.
        any_leading_dims: The bound function also takes ``x [..., in]`` and returns ``[..., out]``.
        auto: Whether ``kernel="auto"`` may pick it (False for a kernel that keeps a second copy of the
            weight, which would undo part of the memory saving: it runs only when named).
        int8_groups: Whether it takes group-wise int8 (fp16 scales per group of input channels, GGUF's
            ``Q8_0``) as well as int8 with one scale per row.
    """

    name: str
    formats: tuple[str, ...]
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    run: Callable[..., torch.Tensor]
    description: str
    unavailable: Callable[[], str | None] = field(default=_always)
    unsupported: Callable[..., str | None] = field(default=_any_shape)
    exact: bool = True
    binder: Callable[..., Callable[[torch.Tensor], torch.Tensor]] | None = None
    any_leading_dims: bool = False
    auto: bool = True
    int8_groups: bool = False

    def bind(self, module) -> Callable[[torch.Tensor], torch.Tensor]:
        """``fn(x [M, in]) -> [M, out]`` for ``module``, valid until its buffers move or are reloaded."""
        return self.binder(module) if self.binder is not None else partial(self.run, module)

    def why_not(self, module, x: torch.Tensor) -> str | None:
        """``None`` when this kernel can multiply ``x`` by ``module``'s weight, else the reason."""
        if module.quant_format not in self.formats:
            return f"kernel {self.name!r} handles {list(self.formats)}, not {module.quant_format}"
        if x.device.type not in self.devices:
            return f"kernel {self.name!r} runs on {list(self.devices)}, not {x.device.type}"
        if x.dtype not in self.dtypes:
            names = [str(d).removeprefix("torch.") for d in self.dtypes]
            return (
                f"kernel {self.name!r} takes {names} activations, not {str(x.dtype).removeprefix('torch.')}"
            )
        if module.quant_format == "int8" and module.layout.grouped_int8 and not self.int8_groups:
            return f"kernel {self.name!r} takes int8 with one scale per row, not per group of {module.layout.group}"
        return self.unavailable() or self.unsupported(module, x)


KERNELS: dict[str, Kernel] = {}


def register_kernel(kernel: Kernel) -> Kernel:
    """Add ``kernel`` to the registry (replacing one of the same name) and return it."""
    KERNELS[kernel.name] = kernel
    return kernel


def get_kernel(name: str) -> Kernel:
    """The registered kernel ``name``; ``ValueError`` listing the registered names otherwise."""
    if name not in KERNELS:
        raise ValueError(f"kernel must be 'auto' or one of {sorted(KERNELS)}; got {name!r}")
    return KERNELS[name]


def kernel_names(fmt: str) -> list[str]:
    """What ``kernel=`` accepts for format ``fmt``: ``"auto"`` and the registered kernels handling it."""
    return ["auto", *(k for k, v in KERNELS.items() if fmt in v.formats)]


def check_kernel_name(name: str, fmt: str) -> None:
    """``ValueError`` unless ``name`` is ``"auto"`` or a registered kernel handling ``fmt``."""
    names = kernel_names(fmt)
    if name not in names:
        raise ValueError(f"kernel for {fmt} must be one of {names}; got {name!r}")


def usable_kernels(module, x: torch.Tensor) -> list[str]:
    """Names of the kernels that can multiply ``x`` by ``module``'s weight on this machine."""
    return [k.name for k in KERNELS.values() if k.why_not(module, x) is None]


def check_kernel(name: str, fmt: str, device: torch.device | str) -> None:
    """``ValueError`` when kernel ``name`` does not exist for ``fmt`` on ``device`` (before anything changes)."""
    if name == "auto":
        return
    kernel = get_kernel(name)
    dev = torch.device(device).type
    if fmt not in kernel.formats or dev not in kernel.devices:
        raise ValueError(
            f"kernel={name!r} does not handle {fmt} on {dev} (it handles {list(kernel.formats)} on "
            f"{list(kernel.devices)}); use kernel='auto' or one of "
            f"{[k.name for k in KERNELS.values() if fmt in k.formats and dev in k.devices and k.unavailable() is None]}"
        )
    reason = kernel.unavailable()
    if reason is not None:
        raise ValueError(f"kernel={name!r} is not available on this machine: {reason}; use kernel='auto'")
