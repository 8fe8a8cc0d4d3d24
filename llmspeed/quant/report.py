"""``llmspeed.kernels()``: which quantized matmul paths exist here, and what ``kernel="auto"`` chooses."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch

from ..timing import markdown_table
from .config import QuantConfig
from .kernels import FLOAT_DTYPES, KERNELS, auto_kernel, tuning
from .modules import MODULES


@dataclass(frozen=True)
class KernelReport:
    """What :func:`llmspeed.kernels` returns: every kernel's availability here, and the auto choices.

    Attributes:
        kernels: One dict per registered kernel: name, formats, devices, dtypes, available, reason, description.
        choices: ``{(device, format, dtype, M): kernel name}``: the rule table's guess for a 576 -> 1536
            layer (SmolLM2's MLP) at the format's default group size, before any timing.
        tuned: ``{choice key: {"kernel": name, "ms": {candidate: ms per call}}}``: the choices timed on
            this machine (this thread count and torch version), from memory and the on-disk cache.
        autotune: Whether timing is on (``LLMSPEED_AUTOTUNE`` is not ``0``).
    """

    kernels: tuple[dict, ...]
    choices: dict
    tuned: dict
    autotune: bool

    def __str__(self) -> str:
        avail = markdown_table([{k: v for k, v in row.items() if k != "description"} for row in self.kernels])
        rows: dict[tuple, dict] = {}
        for (dev, fmt, dtype, m), name in self.choices.items():
            rows.setdefault((dev, fmt, dtype), {"device": dev, "format": fmt, "dtype": dtype})[f"M={m}"] = name
        text = f"Kernels on this machine:\n{avail}\n\nThe rule table's guesses:\n{markdown_table(list(rows.values()))}"
        timed = [
            {"layer": key, "kernel": entry.get("kernel", ""),
             "ms per call": ", ".join(f"{k} {v:.3g}" for k, v in sorted(entry.get("ms", {}).items()))}
            for key, entry in sorted(self.tuned.items())
        ]  # fmt: skip
        state = "on" if self.autotune else "off (LLMSPEED_AUTOTUNE=0: the guesses are the choices)"
        return f"{text}\n\nTimed choices on this machine (autotune {state}):\n{markdown_table(timed)}"

    __repr__ = __str__


def kernels(rows: tuple[int, ...] = (1, 4, 16, 64, 512)) -> KernelReport:
    """Which matmul paths exist on this machine, the rule table's guesses per format, dtype and M, and the
    choices ``kernel="auto"`` has timed here.

    ``rows``: the row counts M (tokens per call) to show guesses for, a non-empty tuple of ints >= 1;
    ``ValueError``/``TypeError`` naming ``rows`` otherwise (before any kernel is asked).
    """
    if isinstance(rows, (str, bytes)) or not isinstance(rows, (tuple, list)):
        raise TypeError(f"rows must be a tuple of row counts such as (1, 16, 512); got {type(rows).__name__} {rows!r}")
    if not rows or not all(isinstance(m, numbers.Integral) and not isinstance(m, bool) and m >= 1 for m in rows):
        raise ValueError(f"rows must be a non-empty tuple of ints >= 1 (tokens per call); got {rows!r}")
    table = []
    for k in KERNELS.values():
        reason = k.unavailable()
        table.append(
            {
                "kernel": k.name,
                "formats": ",".join(k.formats),
                "devices": ",".join(k.devices),
                "dtypes": ",".join(str(d).removeprefix("torch.") for d in k.dtypes),
                "available": reason is None,
                "reason": reason or "",
                "description": k.description,
            }
        )
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    choices = {}
    for dev in devices:
        for fmt, cls in MODULES.items():
            module: Any = cls(576, 1536, QuantConfig(fmt), device="meta")  # type: ignore[call-arg]
            for dtype in FLOAT_DTYPES:
                for m in rows:
                    x = torch.empty(m, 576, dtype=dtype, device=dev)
                    choices[(dev, fmt, str(dtype).removeprefix("torch."), m)] = auto_kernel(
                        module, x, probe=False
                    ).name
    store = tuning.store()
    store.get("")  # loads the on-disk choices
    return KernelReport(tuple(table), choices, dict(store.choices), tuning.enabled())
