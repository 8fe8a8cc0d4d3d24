"""``QuantConfig``: the frozen, validated, JSON-serializable description of how one linear layer is quantized.

Plain data: it imports nothing from the rest of the package. Its own fields are validated here; the
``method`` and ``kernel`` names are checked against their registries by the quantized modules and by
:func:`llmspeed.quantize`, which sit above both registries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

FORMATS = ("int8", "int4", "nf4")
# group_size used when the caller does not pass one; None means one group per output row.
DEFAULT_GROUP_SIZE: dict[str, int | None] = {"int8": None, "int4": 64, "nf4": 64}
DQ_BLOCK = 256  # NF4 double quantization: scales per block of second-level quantization
ACTIVATIONS = ("float", "int8")
ACT_BLOCK = 32  # int8 activations: input channels per activation scale


def refuse_default_marker(group_size: object) -> None:
    """``ValueError`` for a verb's ``group_size=-1``: QuantConfig's own "format default" marker, which a user
    meaning AutoGPTQ's -1 (one group per output row: llmspeed's ``None``) would otherwise get silently."""
    if group_size == -1 and not isinstance(group_size, bool):
        raise ValueError(
            "group_size must be a positive even integer, or None for one group per output row (AutoGPTQ's -1); got -1"
        )


@dataclass(frozen=True)
class QuantConfig:
    """How a linear layer's weight is quantized. Validated on construction; ``to_dict``/``from_dict`` round-trip.

    Attributes:
        format: ``"int8"`` (symmetric, per output channel or group-wise), ``"int4"`` (group-wise, asymmetric unless
            ``symmetric``) or ``"nf4"`` (group-wise absmax over the NormalFloat-4 codebook).
        group_size: Input channels sharing one scale (and zero point). ``None`` means one group per
            output row (int8's default). Must be even; for 4-bit formats ``in_features`` is zero-padded up
            to a multiple of it (see docs/quantization.md). int8 takes ``None`` or a multiple of 16 (GGUF's
            ``Q8_0`` is group 32): its codes are never padded, a row's last group may be shorter, and its
            group scales are stored in fp16 as the 4-bit formats' are.
        double_quant: NF4 only: quantize the per-group scales again to 8 bits (QLoRA's double quantization).
        method: How codes are chosen: ``"rtn"`` (round to nearest) or a registered calibrated method.
        kernel: Matmul path: ``"auto"`` or a kernel name from :func:`llmspeed.kernels`.
        symmetric: int4 only: ``True`` stores every zero point as 8 and the scale as ``max(-min / 8, max / 7)`` of each group (GPTQ: ``absmax / 7.5``)
            (the signed ``[-8, 7]`` grid of GPTQ's ``sym=True`` and compressed-tensors'
            ``symmetric: true``, which vLLM's fastest 4-bit kernels take). ``None``: the format's
            default (``False`` for int4; int8 and nf4 are always symmetric).
        act_order: int4 only: the packed input columns are a permutation of the layer's (a GPTQ
            ``desc_act`` checkpoint whose ``g_idx`` groups columns out of order); the module holds
            ``perm`` int64 ``[in]`` and gathers its input through it before the kernel.
        hadamard: int4 only: the packed weight is the layer's with every group of input columns
            multiplied by the group's Hadamard matrix (:mod:`llmspeed.quant.hadamard`), and forward
            rotates its input the same way before the kernel: the same function, quantized in a basis where
            no input channel stands alone in its group. Needs a power-of-two ``group_size`` dividing
            ``in_features``; not with ``act_order``.
        activations: ``"float"`` (default): the layer multiplies its input as given. ``"int8"``: dynamic
            int8 activations, as llama.cpp's Q8_0 activations and torchao's dynamic-activation configs:
            every block of :data:`ACT_BLOCK` input channels of each row is rounded to 255 levels of its
            absmax before the matmul (``primitives.quantize_activations``), so CPU kernels can multiply
            integer codes (AVX-512 VNNI, or AVX2's byte multiply-adds); accuracy cost in docs/quantization.md.
    """

    format: str
    group_size: int | None = field(default=-1)  # -1: the format's default, resolved in __post_init__
    double_quant: bool = False
    method: str = "rtn"
    kernel: str = "auto"
    symmetric: bool | None = None
    act_order: bool = False
    activations: str = "float"
    hadamard: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {list(FORMATS)}; got {self.format!r}")
        if self.group_size == -1:
            object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE[self.format])
        g = self.group_size
        if self.format == "int8" and g is not None and (isinstance(g, bool) or not isinstance(g, int) or g <= 0 or g % 16):
            raise ValueError(  # first: the 4-bit rules below would name the wrong remedy
                f"group_size for int8 must be None (one scale per output channel) or a positive multiple of 16 "
                f"(llama.cpp's Q8_0 blocks are 32, Q6_K's 16); got {g!r}"
            )
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g <= 0):
            raise ValueError(f"group_size must be a positive even integer or None; got {g!r}")
        if g is not None and g % 2:
            raise ValueError(f"group_size must be even (two 4-bit codes share a byte); got {g}")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant must be a bool; got {self.double_quant!r}")
        if self.double_quant and self.format != "nf4":
            raise ValueError(f"double_quant is only defined for nf4; got format={self.format!r}")
        fixed = {"int8": True, "nf4": True}.get(self.format)
        if self.symmetric is None:
            object.__setattr__(self, "symmetric", fixed if fixed is not None else False)
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be a bool or None; got {self.symmetric!r}")
        if fixed is not None and self.symmetric != fixed:
            raise ValueError(
                f"symmetric=False is not available for {self.format}, which is always symmetric; "
                f"use format='int4' for asymmetric zero points"
            )
        if not isinstance(self.act_order, bool):
            raise ValueError(f"act_order must be a bool; got {self.act_order!r}")
        if self.act_order and self.format != "int4":
            raise ValueError(f"act_order (permuted input columns) is only defined for int4; got {self.format!r}")
        if not isinstance(self.hadamard, bool):
            raise ValueError(f"hadamard must be a bool; got {self.hadamard!r}")
        if self.hadamard and (self.format != "int4" or self.act_order or g is None or g & (g - 1)):
            raise ValueError(
                "hadamard (inputs rotated within each group) needs format='int4' with a power-of-two group_size "
                f"and no act_order; got format={self.format!r}, group_size={g}, act_order={self.act_order}"
            )
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {list(ACTIVATIONS)}; got {self.activations!r}")
        for name in ("method", "kernel"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a name (str); got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (what safetensors metadata stores); ``hadamard`` only when set, so files
        without it read as before in older versions."""
        out = asdict(self)
        if not self.hadamard:
            del out["hadamard"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        """Rebuild a config from :meth:`to_dict` output; unknown keys raise ``ValueError``."""
        if not isinstance(data, dict):
            raise ValueError(f"quantization config must be a dict; got {type(data).__name__}")
        known = {"format", "group_size", "double_quant", "method", "kernel", "symmetric", "act_order", "activations",
                 "hadamard"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"quantization config has unknown keys {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**data)

    def padded_in_features(self, in_features: int) -> int:
        """``in_features`` rounded up to a multiple of the group size (4-bit formats, even for per-row groups);
        int8 codes are never padded."""
        if self.format == "int8":
            return in_features
        g = self.group_size if self.group_size is not None else 2
        return -(-in_features // g) * g

    def num_groups(self, in_features: int) -> int:
        """Scale groups per output row (int8's last group may be shorter than ``group_size``)."""
        if self.group_size is None:
            return 1
        return -(-in_features // self.group_size)
