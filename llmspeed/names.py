"""The spellings users type for dtypes and weight formats, normalised in one place.

Users bring names from transformers (``torch_dtype="bfloat16"``), PyTorch (``torch.half``,
``"float"``), vLLM and torchao (``"INT4"``, ``"Int8"``, ``"int4_weight_only"`` is *not* one of
them). Every verb that takes a dtype or a format (``cast``, ``quantize``, ``qat.prepare``,
``finetune(precision=...)``, ``models.from_pretrained``) normalises through these two functions,
so a spelling accepted by one is accepted by all.

Only case, surrounding blanks, a ``torch.`` prefix and the dtype aliases below are normalised;
anything else is passed on unchanged for the caller to reject with its list of accepted values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar, overload

import torch

_T = TypeVar("_T")

#: Every accepted dtype spelling (lower case) and its canonical short name.
DTYPE_ALIASES: dict[str, str] = {
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "bf16": "bf16",
    "bfloat16": "bf16",
}

#: The canonical short dtype names and their torch dtypes.
CANONICAL_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_name(value: object) -> object:
    """``"fp32"``, ``"fp16"`` or ``"bf16"`` for any accepted spelling or torch dtype; other values unchanged.

    >>> dtype_name("BFloat16"), dtype_name(torch.half), dtype_name("torch.float32")
    ('bf16', 'fp16', 'fp32')
    """
    if isinstance(value, torch.dtype):
        for name, dtype in CANONICAL_DTYPES.items():
            if dtype == value:
                return name
        return value
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        return DTYPE_ALIASES.get(key, value)
    return value


@overload
def format_name(value: str) -> str: ...
@overload
def format_name(value: _T) -> _T: ...
def format_name(value: object) -> object:
    """A weight-format name in the lower case llmspeed uses (``"INT4"`` -> ``"int4"``); non-strings unchanged."""
    if isinstance(value, str):
        return value.strip().lower()
    return value


def shown(value: object, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error quotes what was given, not a whole long prompt or schema."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_device(device: object, arg: str = "device") -> torch.device:
    """``device`` as a ``torch.device``; ``ValueError`` saying what to do when it cannot be used here.

    PyTorch itself answers ``device="cuda"`` on a CPU-only build with a bare ``AssertionError`` deep in a
    ``.to()`` call; this says so before anything is read.
    """
    try:
        dev = torch.device(device)  # type: ignore[call-overload]  # anything else is refused below
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{arg} must be a torch device such as 'cpu' or 'cuda'; got {device!r}") from err
    if dev.type == "meta":
        raise ValueError(f"{arg}='meta' holds no data: the weights would be dropped; use {arg}='cpu' or 'cuda'")
    backend = getattr(torch, dev.type, None)
    if dev.type not in ("cpu", "cuda") and not (backend is not None and backend.is_available()):
        raise ValueError(f"{arg}={device!r}: this torch build has no usable {dev.type} backend; use {arg}='cpu'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"{arg}={device!r}, but CUDA is not available here (torch {torch.__version__}: "
            f"{'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); use {arg}='cpu'"
        )
    return dev


def folder_path(path: object, arg: str, write: bool = False) -> Path:
    """``path`` (a ``str`` or ``os.PathLike``) as a ``Path``; ``TypeError`` naming ``arg`` for anything else.

    ``write``: the folder is about to be created if needed, so ``ValueError`` when it, or the nearest part
    of it that exists, is a file (``mkdir`` would answer with a bare ``FileExistsError``/``NotADirectoryError``).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{arg} must be a folder path (a str or pathlib.Path); got {path!r}")
    folder = Path(path)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None) if write else None
    if existing is not None and not existing.is_dir():
        raise ValueError(f"{arg} must be a folder (created if needed); got {str(folder)!r}, but {str(existing)!r} is a file")
    return folder
