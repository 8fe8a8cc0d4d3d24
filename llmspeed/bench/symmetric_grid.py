"""Symmetric int4 scale rules, round to nearest: the perplexity each gives the same model at each group size.

Three ways to choose a group's step on the signed grid ``[-8, 7]`` (zero point 8):

* ``absmax / 7.5``: GPTQ's reference quantizer (``sym=True``), llmspeed's rule before 2026-12-07; the group's
  largest weight lands half a step from any code, whichever its sign;
* ``max(-min / 8, max / 7)``: llmspeed's rule (:func:`llmspeed.quant.primitives.choose_qparams_int4_symmetric`),
  the finest positive step that holds the group, so the weight that sets it lands on a code;
* ``max / -8`` (signed): llama.cpp's ``Q4_0``; a negative step when the largest weight is positive, which
  llmspeed's layout (positive scales) cannot store: for comparison only.

llmspeed's row runs ``llmspeed.quantize(..., symmetric=True)`` itself, GPTQ's rule goes through llmspeed's own
int4 primitives (:func:`llmspeed.quant.primitives.choose_qparams_int4_symmetric_absmax`, exactly what a layer
packed with it computes), llama.cpp's replaces each weight with its ``Q4_0`` value (checked against the ``gguf``
package's port of ggml's quantizer). The output head stays float in every row, and asymmetric int4 is the last row
of each group size.

A second table does the same for the calibrated methods: GPTQ (and the GPTQ step of ``awq+gptq``) keeps
``absmax / 7.5`` (:func:`llmspeed.quant.primitives.choose_qparams_int4_symmetric_absmax`), AWQ's rounding the exact
fit; each row swaps the other rule in for comparison.
"""

from __future__ import annotations

import contextlib
from typing import Any
from unittest import mock

import torch

import llmspeed

from ..eval.text import pydoc_text
from ..quant import primitives
from .models import load_model

GROUPS = (32, 64, 128)
FIT = "larger of -min / 8 and max / 7"
CALIBRATED = (("gptq", 32), ("gptq", 128), ("awq", 32), ("awq", 128))  # (method, group size)


def gptq_reference(w: torch.Tensor, group: int) -> torch.Tensor:  # [out, in_pad] -> same
    """``w`` through llmspeed's int4 under ``absmax / 7.5`` (GPTQ's ``sym=True``; what GPTQ packs)."""
    scales, zeros = primitives.choose_qparams_int4_symmetric_absmax(w, group)
    return primitives.dequantize_int4(primitives.quantize_int4(w, scales, zeros, group), scales, zeros, group)


def llama_cpp_q4_0(w: torch.Tensor, group: int) -> torch.Tensor:  # [out, in_pad] -> same
    """``w`` through llama.cpp's ``Q4_0`` at ``group`` channels a step (signed step ``max / -8``, codes
    ``x / d + 8.5`` floored; the step in fp16 as stored)."""
    g = w.reshape(w.shape[0], -1, group)  # [out, groups, group]
    top = g.gather(-1, g.abs().argmax(-1, keepdim=True))  # the signed value of largest magnitude
    d = (top / -8).half().float()
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    return (g * inv + 8.5).floor().clamp(0, 15).sub(8).mul(d).reshape(w.shape)


def _emulated(model: Any, rule, group: int) -> None:
    """Replace every linear weight but the head's with its value through ``rule`` at ``group``."""
    with torch.no_grad():
        for name, module in model.linear_layers():
            if name == "lm_head":
                continue
            w = module.weight  # [out, in]
            padded = torch.nn.functional.pad(w.float(), (0, -w.shape[1] % group))  # [out, in_pad]
            module.weight.copy_(rule(padded, group)[:, : w.shape[1]])


def run(model: str = "smollm2", quick: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """The table described in the module docstring (``quick``: two 256-token windows instead of eight of 512)."""
    from tqdm.auto import tqdm

    window, n_windows = (256, 2) if quick else (512, 8)
    text = pydoc_text("eval")
    rows: list[dict[str, Any]] = []
    baseline = llmspeed.eval.perplexity(load_model(model, progress=False), text, window, n_windows)
    rules = ["absmax / 7.5 (GPTQ reference)", f"llmspeed: {FIT}", "max / -8 signed (llama.cpp Q4_0)",
             "asymmetric (min / max)"]  # fmt: skip
    for group in tqdm(GROUPS, disable=not progress, desc="groups"):
        for rule in rules:
            m = load_model(model, progress=False)
            if rule.startswith("absmax"):
                _emulated(m, gptq_reference, group)
            elif rule.startswith("max / -8"):
                _emulated(m, llama_cpp_q4_0, group)
            else:
                llmspeed.quantize(m, "int4", group_size=group, symmetric=rule.startswith("llmspeed"), lm_head=None)
            ppl = llmspeed.eval.perplexity(m, text, window, n_windows)
            rows.append({"group": group, "scale rule": rule, "perplexity": round(ppl, 3),
                         "vs float": f"{ppl / baseline - 1:+.1%}"})  # fmt: skip
    if not quick:
        rows += calibrated(model, text, window, n_windows, baseline, progress)
    return rows


def calibrated(model: str, text: str, window: int, n_windows: int, baseline: float, progress: bool) -> list[dict]:
    """GPTQ and AWQ, symmetric, with the rule each uses and with the other one swapped in."""
    from tqdm.auto import tqdm

    fit, absmax = primitives.choose_qparams_int4_symmetric, primitives.choose_qparams_int4_symmetric_absmax
    swaps = {"absmax / 7.5": ("choose_qparams_int4_symmetric", absmax),  # AWQ's rounding takes GPTQ's rule
             FIT: ("choose_qparams_int4_symmetric_absmax", fit)}  # GPTQ takes the exact fit  # fmt: skip
    rows = []
    for method, group in tqdm(CALIBRATED, disable=not progress, desc="calibrated"):
        ours = "absmax / 7.5" if method == "gptq" else FIT
        for rule in ("absmax / 7.5", FIT):
            m = load_model(model, progress=False)
            with contextlib.nullcontext() if rule == ours else mock.patch.object(primitives, *swaps[rule]):
                llmspeed.quantize(m, "int4", group_size=group, symmetric=True, method=method, lm_head=None)
            ppl = llmspeed.eval.perplexity(m, text, window, n_windows)
            rows.append({"table": "calibrated", "method": method, "group": group,
                         "scale rule": rule + (" (llmspeed)" if rule == ours else ""), "perplexity": round(ppl, 3),
                         "vs float": f"{ppl / baseline - 1:+.1%}"})  # fmt: skip
    return rows
