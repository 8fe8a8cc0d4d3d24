"""ggml's quantized blocks, as GGUF files store them, built from llmspeed's codes and scales and read back into them.

Every type here covers 32 consecutive input channels of one row (``QK = 32``) and stores its scale as fp16:

* ``Q4_0`` (18 bytes): ``d``, then 16 bytes of nibbles; ``w = d * (q - 8)``: llmspeed's symmetric int4
  (zero point 8) with the scale as ``d``, bit for bit.
* ``Q4_1`` (20 bytes): ``d``, ``m``, then 16 bytes of nibbles; ``w = d * q + m``: llmspeed's asymmetric int4
  ``(q - z) * s`` with ``d = s`` and ``m = -z * s`` rounded to fp16.
* ``Q8_0`` (34 bytes): ``d``, then 32 signed bytes; ``w = d * q``: llmspeed's int8 codes with the row scale
  rounded to fp16 as every block's ``d``.

The nibbles of a 4-bit block are not llmspeed's pairs: byte ``j`` holds element ``j`` in its low nibble and
element ``j + 16`` in its high nibble. A group of ``group_size`` channels (a multiple of 32) is
``group_size / 32`` blocks sharing the group's scale and zero point, so any such group size is written exactly.
Multi-byte fields are little-endian, as GGUF files written by llama.cpp on every platform it ships for.
"""

from __future__ import annotations

import numpy as np
import torch

QK = 32  # input channels of one block
QK_K = 256  # input channels of one K-quant super-block
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "Q4_K": 144, "Q6_K": 210}
Q6_K_GROUP = 16  # input channels sharing one of a Q6_K super-block's 16 scales


def _half_bytes(t: torch.Tensor) -> torch.Tensor:  # [rows, blocks, 2] uint8
    """fp16 values of ``t`` [rows, blocks] as their little-endian bytes."""
    h = t.to(torch.float16).contiguous()
    if not bool(torch.isfinite(h).all()):
        raise ValueError("a scale or offset does not fit fp16 (GGUF blocks store them in fp16)")
    return h.view(torch.uint8).reshape(*t.shape, 2)


def block_values(per_group: torch.Tensor, group_size: int | None, width: int) -> torch.Tensor:  # [rows, width/32]
    """One value per 32-channel block from one per group (``group_size`` a multiple of 32) or per row (``None``)."""
    blocks = width // QK
    if group_size is None:
        return per_group.reshape(-1, 1).expand(-1, blocks)
    return per_group.repeat_interleave(group_size // QK, dim=1)[:, :blocks]


def _nibbles(codes: torch.Tensor) -> torch.Tensor:  # [rows, blocks, 16] uint8
    rows, width = codes.shape
    c = codes.to(torch.uint8).reshape(rows, width // QK, QK)
    return c[..., : QK // 2] | (c[..., QK // 2 :] << 4)


def _rows(parts: list[torch.Tensor]) -> np.ndarray:  # [rows, blocks * block bytes] uint8
    blocks = torch.cat(parts, dim=-1)  # [rows, blocks, block bytes]
    return blocks.reshape(blocks.shape[0], -1).numpy()


def q4_0(codes: torch.Tensor, d: torch.Tensor) -> np.ndarray:  # [rows, width / 32 * 18] uint8
    """``Q4_0`` rows from codes [rows, width] in ``[0, 15]`` (zero point 8) and block scales ``d`` [rows, width/32]."""
    return _rows([_half_bytes(d), _nibbles(codes)])


def q4_1(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> np.ndarray:  # [rows, width / 32 * 20] uint8
    """``Q4_1`` rows from codes [rows, width] in ``[0, 15]``, block scales ``d`` and offsets ``m`` [rows, width/32]."""
    return _rows([_half_bytes(d), _half_bytes(m), _nibbles(codes)])


def q8_0(codes: torch.Tensor, d: torch.Tensor) -> np.ndarray:  # [rows, width / 32 * 34] uint8
    """``Q8_0`` rows from int8 codes [rows, width] and block scales ``d`` [rows, width/32]."""
    rows, width = codes.shape
    q = codes.to(torch.int8).contiguous().view(torch.uint8).reshape(rows, width // QK, QK)
    return _rows([_half_bytes(d), q])


# --- reading: a tensor's raw rows [rows, blocks * block bytes] uint8 back to codes and per-block values ---------
def _blocks(raw: np.ndarray, kind: str) -> torch.Tensor:  # [rows, blocks, block bytes] uint8
    t = torch.from_numpy(np.array(raw, dtype=np.uint8))  # a copy: the reader's arrays map the file read-only
    if t.dim() != 2 or t.shape[1] % BLOCK_BYTES[kind]:
        raise ValueError(f"{kind} data must be rows of {BLOCK_BYTES[kind]}-byte blocks; got shape {tuple(t.shape)}")
    return t.reshape(t.shape[0], -1, BLOCK_BYTES[kind])


def _halves(b: torch.Tensor) -> torch.Tensor:  # [rows, blocks] fp32
    """The fp16 values whose little-endian bytes are ``b`` [rows, blocks, 2]."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _unnibble(nib: torch.Tensor) -> torch.Tensor:  # [rows, blocks * 32] uint8
    """Codes of 4-bit blocks' 16 bytes each [rows, blocks, 16]: element ``j`` low, ``j + 16`` high."""
    return torch.cat([nib & 15, nib >> 4], dim=-1).reshape(nib.shape[0], -1)


def read_q4_0(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q4_0`` rows -> codes [rows, width] uint8 in ``[0, 15]`` (zero point 8) and block scales ``d`` [rows, width/32]."""
    b = _blocks(raw, "Q4_0")
    return _unnibble(b[..., 2:]), _halves(b[..., :2])


def read_q4_1(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``Q4_1`` rows -> codes [rows, width] uint8, block scales ``d`` and offsets ``m`` [rows, width/32]."""
    b = _blocks(raw, "Q4_1")
    return _unnibble(b[..., 4:]), _halves(b[..., :2]), _halves(b[..., 2:4])


def read_q4_k(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``Q4_K`` rows -> codes [rows, width] uint8 and each 32-channel sub-block's scale ``d * sc`` and offset
    ``-dmin * m`` [rows, width/32] (fp32 products), so ``w = scale * q + offset`` as for ``Q4_1``.

    A super-block of 256 channels (144 bytes): fp16 ``d`` and ``dmin``, 12 bytes holding eight 6-bit scales ``sc``
    and mins ``m`` (sub-blocks 0-3 in the low 6 bits of bytes 0-3 and 4-7; 4-7 in the nibbles of bytes 8-11 with
    their top 2 bits in the top bits of bytes 0-3 and 4-7), then 128 bytes: four runs of 32, whose low nibbles are
    sub-block ``2 c`` and high nibbles sub-block ``2 c + 1``.
    """
    b = _blocks(raw, "Q4_K")
    rows, n = b.shape[:2]
    s = b[..., 4:16].long()  # [rows, n, 12]
    sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], dim=-1)  # [rows, n, 8]
    mn = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], dim=-1)  # [rows, n, 8]
    qs = b[..., 16:].reshape(rows, n, 4, 1, 32)  # [rows, n, run, 1, 32]
    codes = torch.cat([qs & 15, qs >> 4], dim=3).reshape(rows, -1)  # [rows, n * 256]: runs of (low, high)
    d, dmin = _halves(b[..., :2]), _halves(b[..., 2:4])  # [rows, n]
    return codes, (d[..., None] * sc).reshape(rows, -1), (-dmin[..., None] * mn).reshape(rows, -1)


def read_q8_0(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q8_0`` rows -> codes [rows, width] int8 and block scales ``d`` [rows, width/32]."""
    b = _blocks(raw, "Q8_0")
    return b[..., 2:].contiguous().view(torch.int8).reshape(b.shape[0], -1), _halves(b[..., :2])


def read_q6_k(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q6_K`` rows -> signed codes [rows, width] int8 in ``[-32, 31]`` and each 16-channel group's scale
    ``d * sc`` [rows, width/16] (fp32 products, signed as the file's), so ``w = scale * q``.

    A super-block of 256 channels (210 bytes): 128 bytes ``ql`` of low nibbles, 64 bytes ``qh`` of 2-bit high parts,
    16 signed bytes ``sc``, fp16 ``d``. Each half of 128 channels reads 64 bytes of ``ql`` and 32 of ``qh``: channel
    ``l + 32 j`` (``l < 32``, ``j < 4``) has its low nibble in ``ql[l + 32 (j % 2)]`` (the low nibble for ``j < 2``,
    the high one after) and its high bits at bit ``2 j`` of ``qh[l]``; the code is that 6-bit value minus 32.
    """
    b = _blocks(raw, "Q6_K")
    rows, n = b.shape[:2]
    ql = b[..., :128].reshape(rows, n, 2, 2, 32)  # [rows, n, half, j % 2, l]
    qh = b[..., 128:192].reshape(rows, n, 2, 1, 32)  # [rows, n, half, 1, l]
    low = torch.cat([ql & 15, ql >> 4], dim=3)  # [rows, n, half, j, l]: j = 0, 1 low nibbles, 2, 3 high
    high = torch.cat([(qh >> (2 * j)) & 3 for j in range(4)], dim=3)  # [rows, n, half, j, l]
    codes = ((low | (high << 4)).to(torch.int16) - 32).to(torch.int8).reshape(rows, -1)  # [rows, n * 256]
    sc = b[..., 192:208].contiguous().view(torch.int8).float()  # [rows, n, 16]
    d = _halves(b[..., 208:210])  # [rows, n]
    return codes, (d[..., None] * sc).reshape(rows, -1)


def shared_group(per_block: list[torch.Tensor], width: int, sizes: tuple[int, ...] = (128, 64)) -> int:
    """The largest group size in ``sizes`` (each a multiple of 32 dividing ``width``) over whose blocks every tensor
    of ``per_block`` ([rows, width/32] each) is constant, else 32: a file llmspeed wrote at group 64 reads back at 64."""
    for g in sizes:
        if width % g:
            continue
        n = g // QK
        if all(bool((v.reshape(v.shape[0], -1, n) == v[:, ::n, None]).all()) for v in per_block):
            return g
    return QK
