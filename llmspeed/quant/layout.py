"""``QuantLayout``: the geometry of one quantized linear's packed weight, derived once from its config.

Every kernel (C++, Triton, aten), the fused CPU decode step and the modules themselves ask the layout,
never the config, how many codes a group holds, how many groups a row has and how wide a packed row
is, so the rule "per-row groups span the padded width" lives in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import QuantConfig


@dataclass(frozen=True)
class QuantLayout:
    """Shapes of a quantized ``[out, in]`` weight.

    Attributes:
        format: ``"int8"``, ``"int4"`` or ``"nf4"``.
        in_features: Input channels of the layer.
        out_features: Output channels (rows).
        in_padded: ``in_features`` rounded up to a multiple of the group size (4-bit formats are
            zero-padded so every group is whole; int8 is never padded: its last group may be shorter).
        group: Codes sharing one scale: the group size, or the whole padded row for per-row groups.
        groups: Scale groups per output row.
        row_bytes: Bytes of one packed row of ``qweight`` (two 4-bit codes per byte).
        group_scales: Whether ``scales`` is fp16 ``[out, groups]`` (4-bit formats, and int8 with a
            ``group_size``) rather than int8's fp32 ``[out]``.
    """

    format: str
    in_features: int
    out_features: int
    in_padded: int
    group: int
    groups: int
    row_bytes: int
    group_scales: bool = True

    @classmethod
    def of(cls, config: QuantConfig, in_features: int, out_features: int) -> QuantLayout:
        """The layout of an ``[out_features, in_features]`` weight quantized with ``config``."""
        padded = config.padded_in_features(in_features)
        groups = config.num_groups(in_features)
        four_bit = config.format != "int8"
        group = padded if config.group_size is None else config.group_size
        return cls(config.format, in_features, out_features, padded, group, groups,
                   padded // 2 if four_bit else padded, four_bit or config.group_size is not None)  # fmt: skip

    @property
    def four_bit(self) -> bool:
        """Whether codes are packed two per byte (int4, NF4)."""
        return self.format != "int8"

    @property
    def grouped_int8(self) -> bool:
        """Whether this is int8 with fp16 scales per group of input channels (GGUF's ``Q8_0``), not fp32 per row."""
        return self.format == "int8" and self.group_scales

    def tiles_of(self, codes: int) -> bool:
        """Whether a 4-bit group splits into whole tiles of ``codes`` codes (always true for int8)."""
        return not self.four_bit or self.group % codes == 0

    def tile_reason(self, codes: int, who: str) -> str | None:
        """Why ``who`` (a kernel decoding ``codes`` 4-bit codes at a time) cannot read this layout, or ``None``."""
        if self.tiles_of(codes):
            return None
        return f"{who} needs a group size divisible by {codes}; got {self.group}"
