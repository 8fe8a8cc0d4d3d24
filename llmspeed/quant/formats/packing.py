"""int32 words of 4- and 8-bit codes, as compressed-tensors and GPTQ store them (pure functions on tensors).

Both formats put element ``i`` of a packed run at bits ``i * bits`` of little-endian int32 words. For
4 bits the bytes of such a run are exactly llmspeed's nibble packing (:func:`~llmspeed.quant.primitives.pack_nibbles`:
even element in the low nibble), so reading is a byte view; these helpers also hold on big-endian hosts.
"""

from __future__ import annotations

import sys

import torch

from .. import primitives as P


def little_endian_bytes(words: torch.Tensor) -> torch.Tensor:  # [r, 4 * w] uint8
    """The bytes of int32 ``words`` [r, w] in little-endian order (whatever the host's order)."""
    b = words.contiguous().view(torch.uint8).view(words.shape[0], -1, 4)  # [r, w, 4]
    if sys.byteorder == "big":
        b = b.flip(-1)
    return b.reshape(words.shape[0], -1)


def words_of(data: torch.Tensor) -> torch.Tensor:  # [r, n / 4] int32
    """int32 words whose little-endian bytes are ``data`` uint8 [r, n], ``n`` a multiple of 4."""
    b = data.contiguous().view(data.shape[0], -1, 4)  # [r, w, 4]
    if sys.byteorder == "big":
        b = b.flip(-1).contiguous()
    return b.view(torch.int32).reshape(data.shape[0], -1)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:  # [r, ceil(n / 8)] int32
    """``weight_packed`` of unsigned 4-bit ``codes`` uint8 [r, n] in [0, 15] (``q + 8``); pads with code 0."""
    n = codes.shape[1]
    padded = P.pad_columns(codes, -(-n // 8) * 8)  # [r, 8 * words]
    return words_of(P.pack_nibbles(padded))


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:  # [r, n] uint8
    """Unsigned 4-bit codes ``q + 8`` of the first ``n`` elements of each row of ``packed`` int32."""
    return P.unpack_nibbles(little_endian_bytes(packed))[:, :n]


def pack_int8(codes: torch.Tensor) -> torch.Tensor:  # [r, ceil(n / 4)] int32
    """``weight_packed`` of signed int8 ``codes`` [r, n]: bytes ``q + 128``, four per word."""
    n = codes.shape[1]
    unsigned = (codes.to(torch.int16) + 128).to(torch.uint8)  # [r, n]
    return words_of(P.pad_columns(unsigned, -(-n // 4) * 4))


def unpack_int8(packed: torch.Tensor, n: int) -> torch.Tensor:  # [r, n] int8
    """Signed int8 codes of the first ``n`` elements of each row of ``packed`` int32."""
    return (little_endian_bytes(packed)[:, :n].to(torch.int16) - 128).to(torch.int8)
