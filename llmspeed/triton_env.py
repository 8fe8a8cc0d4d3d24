"""Whether Triton kernels can run here: shared by the quantization GEMV and the paged attention kernels.

Triton ships with CUDA builds of torch. Its kernels run on CUDA devices, or on the CPU through Triton's
interpreter (``TRITON_INTERPRET=1``), which is how the tests check them on machines without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch

_TRUE = ("1", "true", "on", "yes", "y")  # what Triton's getenv_bool takes as set (any case); anything else is off


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``), read as Triton reads it."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRUE


def unavailable(device: torch.device | str = "cuda") -> str | None:
    """Why a Triton kernel cannot run on ``device``, or ``None``."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (it ships with CUDA builds of torch)"
    if interpreted():
        return None
    if torch.device(device).type != "cuda":
        return f"the Triton kernels run on CUDA devices; got {torch.device(device).type}"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


__all__ = ["interpreted", "unavailable"]
