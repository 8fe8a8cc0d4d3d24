"""A GGUF file's metadata and tensor table, read without turning its vocabulary into Python objects.

``gguf.GGUFReader`` builds numpy views for every part of every field: 4 s for SmolLM2's 49,152-token vocabulary on
this project's 2-core host, where loading needs a few numbers, some names and the tensors. :func:`read` walks the
header with ``struct`` (version 2 and 3 files, little-endian, as llama.cpp writes them), keeps scalar and string
fields, records array fields by their length only, and maps the tensor data read-only.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# value type -> struct format of one scalar (GGUF's gguf_type enum); 8 is a string, 9 an array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class ArrayField:
    """An array field, by its element type and length (its values are not read)."""

    element_type: int
    length: int


@dataclass(frozen=True)
class Tensor:
    """One tensor: its name, ggml type, dimensions innermost first (as GGUF lists them) and data.

    ``data`` is as ``gguf.GGUFReader`` gives it: F32 and F16 as typed arrays in transformers' shape, every other type
    as uint8 rows ``[..., bytes per row]``.
    """

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: np.ndarray
    data: np.ndarray


class _Cursor:
    """Sequential little-endian reads from a buffer; a read past its end is a ``ValueError``."""

    def __init__(self, buffer: Any):
        self.buffer, self.at = buffer, 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buffer, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.at + n > len(self.buffer):
            raise ValueError(f"a string of {n} bytes runs past the end of the file")
        self.at += n
        return bytes(self.buffer[self.at - n : self.at]).decode("utf-8")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            return self.scalar(_SCALARS[kind])
        element, n = self.scalar("<I"), self.scalar("<Q")
        if element == _STRING:  # variable length: step over each
            for _ in range(n):
                length = self.scalar("<Q")  # (not `self.at += self.scalar(...)`: that reads self.at before the call)
                self.at += length
            if self.at > len(self.buffer):
                raise ValueError("an array of strings runs past the end of the file")
        elif element in _SCALARS:
            self.at += n * struct.calcsize(_SCALARS[element])
        else:
            raise ValueError(f"an array of element type {element} (nested arrays are not read)")
        return ArrayField(element, n)


def read(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(fields, tensors)`` of the GGUF file ``path``; a malformed or truncated file is a ``ValueError``."""
    import gguf

    with open(path, "rb") as f:
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cursor = _Cursor(buffer)
    try:
        if cursor.scalar("<I") != 0x46554747:  # b"GGUF" little-endian
            raise ValueError("it does not start with GGUF's magic bytes")
        version = cursor.scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}; llmspeed reads versions 2 and 3")
        n_tensors, n_fields = cursor.scalar("<Q"), cursor.scalar("<Q")
        fields = {}
        for _ in range(n_fields):
            key = cursor.string()
            fields[key] = cursor.value(cursor.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cursor.string()
            dims = [cursor.scalar("<Q") for _ in range(cursor.scalar("<I"))]
            infos.append((name, dims, gguf.GGMLQuantizationType(cursor.scalar("<I")), cursor.scalar("<Q")))
    except (struct.error, KeyError, UnicodeDecodeError) as err:
        raise ValueError(f"its header is malformed or truncated ({type(err).__name__}: {err})") from err
    alignment = fields.get("general.alignment", 32)
    start = -(-cursor.at // alignment) * alignment
    tensors = {}
    for name, dims, kind, offset in infos:
        block, size = gguf.GGML_QUANT_SIZES[kind]
        count = int(np.prod(dims))
        nbytes = count // block * size
        if start + offset + nbytes > len(buffer):
            raise ValueError(f"tensor {name!r} runs past the end of the file (truncated)")
        raw = np.frombuffer(buffer, np.uint8, nbytes, start + offset)
        rows = list(reversed(dims))  # transformers' order: outermost first
        if kind.name in ("F32", "F16"):
            data = raw.view(np.float32 if kind.name == "F32" else np.float16).reshape(rows)
        else:
            data = raw.reshape(*rows[:-1], dims[0] // block * size)
        tensors[name] = Tensor(name, kind, np.array(dims), data)
    return fields, tensors
