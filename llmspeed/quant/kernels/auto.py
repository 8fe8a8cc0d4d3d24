"""``kernel="auto"``: the fastest correct matmul path for a quantized module, per shape, on this machine.

:func:`select` returns the kernel a module uses for activations ``x`` ``[M, in]``: the one named in
``module.config.kernel``, or for ``"auto"``:

* the rule table :data:`AUTO_RULES` gives the starting guess: the first usable rule for the device
  type and format whose row limit covers ``M`` (docs/kernels.md shows the measurements behind it);
* then the correct candidates are timed once per (format, group, layer shape, rows bucket, activation
  dtype) and the fastest wins (:mod:`.tuning`; the guess keeps its place unless another kernel is more
  than 3% faster). On CUDA every usable rule is a candidate (probed once against the reference path);
  on the CPU every exact kernel that handles the module, with the choices cached on disk per machine.

``LLMSPEED_AUTOTUNE=0`` skips the timing: the guess is the choice. ``reference`` is the last resort.
"""

from __future__ import annotations

import warnings
from functools import partial

import torch

from ...protocol import QuantizedLinear, is_quantized
from ...timing import device_ms
from . import tuning
from .registry import KERNELS, Kernel, get_kernel, usable_kernels

# (device type, format) -> ordered [(max rows M or None for any, activation dtypes or None for any, kernel)].
# The first usable rule is the guess; on CUDA every usable rule is also a timed candidate (triton_mm, not yet measured
# on a GPU, is never the guess).
AUTO_RULES: dict[tuple[str, str], list[tuple[int | None, tuple[torch.dtype, ...] | None, str]]] = {
    ("cpu", "int8"): [(8, None, "cpp"), (None, None, "amx"), (None, None, "cpp_panels"), (128, None, "cpp"),
                      (None, None, "dequant_fp32")],
    ("cpu", "int4"): [(8, None, "cpp"), (None, None, "amx"), (None, None, "cpp_panels"), (128, None, "cpp"),
                      (None, None, "dequant_fp32")],
    ("cpu", "nf4"): [(8, None, "cpp"), (None, None, "amx"), (128, None, "cpp"), (None, None, "dequant_fp32")],
    ("cuda", "int8"): [(None, None, "aten_int8"), (16, None, "triton"), (None, None, "triton_dequant"),
                       (None, None, "triton_mm"), (None, None, "reference")],
    ("cuda", "int4"): [(None, (torch.bfloat16,), "tinygemm"), (16, None, "triton"), (None, None, "triton_dequant"),
                       (None, None, "triton_mm"), (None, None, "reference")],
    ("cuda", "nf4"): [(16, None, "triton"), (None, None, "triton_dequant"), (None, None, "triton_mm"),
                      (None, None, "reference")],
}
_CUDA_TIMED: dict[str, str] = {}  # choice key -> kernel name (GPU timings are not kept on disk)


_PROBES: dict[tuple, bool] = {}


# Largest relative error a probe accepts (gross errors only: a wrong layout or a broken build, not rounding).
_PROBE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}


def probe(kernel: Kernel, module, x: torch.Tensor) -> str | None:
    """Run ``kernel`` on one row of ``x`` and compare it with the ``reference`` path.

    Returns ``None`` when it runs and agrees, else why not: an op may exist but lack this device's code,
    a Triton kernel may fail to compile for this GPU, or a kernel may run and be wrong.
    """
    row = x[:1]
    try:
        out = kernel.run(module, row).float()
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable here"
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"
    ref = KERNELS["reference"].run(module, row).float()
    rel = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    tol = _PROBE_TOLERANCE.get(x.dtype, 5e-2)
    if not rel <= tol:  # also catches NaN
        return f"relative error {rel:.3g} against the reference path (tolerance {tol:g})"
    return None


def _works(kernel: Kernel, module, x: torch.Tensor) -> bool:
    """Whether ``kernel`` really runs here, probed once per (kernel, device type, dtype, format) on accelerators.

    CPU kernels are covered by the test suite, so they are trusted without a call. A failed probe warns
    once and leaves the kernel out of ``auto``'s candidates.
    """
    if x.device.type == "cpu" or x.device.type == "meta":
        return True
    key = (kernel.name, x.device.type, x.dtype, module.quant_format)
    if key not in _PROBES:
        reason = probe(kernel, module, x)
        if reason is not None:
            warnings.warn(
                f"llmspeed: kernel {kernel.name!r} is left out of kernel='auto' for {module.quant_format} "
                f"{str(x.dtype).removeprefix('torch.')} on {x.device.type}: {reason}",
                RuntimeWarning,
                stacklevel=3,
            )
        _PROBES[key] = reason is None
    return _PROBES[key]


def rule_candidates(module: QuantizedLinear, x: torch.Tensor, probe: bool = True) -> list[Kernel]:
    """The usable rules of :data:`AUTO_RULES` for ``module`` and ``x`` [M, in], in table order."""
    m = x.shape[0]
    candidates: list[Kernel] = []
    for max_rows, dtypes, name in AUTO_RULES.get((x.device.type, module.quant_format), []):
        if (max_rows is not None and m > max_rows) or (dtypes is not None and x.dtype not in dtypes):
            continue
        kernel = KERNELS.get(name)
        if kernel is not None and kernel.why_not(module, x) is None and (not probe or _works(kernel, module, x)):
            candidates.append(kernel)
    return candidates


def cpu_candidates(module: QuantizedLinear, x: torch.Tensor) -> list[Kernel]:
    """Every exact CPU kernel that ``auto`` may pick for ``module`` and ``x`` (what the CPU tuner times)."""
    return [k for k in KERNELS.values() if k.auto and k.exact and "cpu" in k.devices and k.why_not(module, x) is None]


def _timed(module: QuantizedLinear, x: torch.Tensor, guess: Kernel, candidates: list[Kernel]) -> Kernel:
    """The fastest of ``candidates`` (``guess`` unless beaten by more than the margin), timed once per key."""
    key = tuning.choice_key(module, x)
    on_cpu = x.device.type == "cpu"
    names = {k.name for k in candidates}
    known = tuning.store().get(key, names) if on_cpu else _CUDA_TIMED.get(key)
    if known in names:
        return KERNELS[known]
    if not on_cpu and torch.cuda.is_current_stream_capturing():  # nothing can be timed inside a capture
        return guess
    xt = x[: tuning.TIMED_ROWS]
    calls = {k.name: partial(k.run, module, xt) for k in candidates}
    with torch.no_grad():
        if on_cpu:
            times = tuning.time_candidates(calls)
        else:
            with torch.cuda.device(x.device):
                times = tuning.time_candidates(calls, device_ms)
    if not times:
        return guess
    name = tuning.pick(times, guess.name)
    if on_cpu:
        tuning.store().put(key, name, times, guess.name, names)
    else:
        _CUDA_TIMED[key] = name
    return KERNELS[name]


def auto_kernel(module: QuantizedLinear, x: torch.Tensor, probe: bool = True) -> Kernel:
    """The kernel ``kernel="auto"`` picks for ``module`` and activations ``x`` [M, in].

    ``probe=False`` runs nothing (no probe, no timing): the rule table's guess, as for a ``meta`` input.
    """
    rules = rule_candidates(module, x, probe)
    guess = rules[0] if rules else KERNELS["reference"]
    if not probe or not tuning.enabled() or x.device.type not in ("cpu", "cuda") or x.numel() == 0:
        return guess  # an empty input times nothing worth keeping (it would be stored as the one-row choice)
    candidates = cpu_candidates(module, x) if x.device.type == "cpu" else rules
    if guess not in candidates:
        candidates = [guess, *candidates]
    if len(candidates) == 1:
        return guess
    return _timed(module, x, guess, candidates)


def select(module: QuantizedLinear, x: torch.Tensor) -> Kernel:
    """The kernel ``module`` uses for ``x`` [M, in]: its configured one (checked) or the auto choice."""
    name = module.config.kernel
    if name == "auto":
        return auto_kernel(module, x)
    kernel = get_kernel(name)
    reason = kernel.why_not(module, x)
    if reason is not None:
        raise ValueError(
            f"kernel={name!r} cannot run here: {reason}; use kernel='auto' or one of {usable_kernels(module, x)}"
        )
    return kernel


def tune_model(layers, max_rows: int = 512, dtype: torch.dtype | None = None) -> int:
    """Time ``kernel="auto"``'s choices now for every rows bucket up to ``max_rows``; return how many are known.

    ``layers``: the model's quantized linears (any iterable of modules; others are skipped). Without this,
    each (shape, rows bucket) is timed the first time a step of that size runs, inside the caller's
    request: tens to hundreds of milliseconds per choice, seconds for a large output head. A server
    calls it before it listens. ``dtype``: the activation dtype (default: each layer's scales' float
    dtype, fp32). Choices already on disk are only looked up.
    """
    seen: set[str] = set()
    top = max(1, max_rows)
    buckets = sorted({tuning.rows_bucket(min(1 << i, top)) for i in range(top.bit_length() + 1)})
    for module in layers:
        if not is_quantized(module) or module.config.kernel != "auto":
            continue
        device = module.qweight.device
        for m in buckets:
            x = torch.empty(m, module.in_features, dtype=dtype or torch.float32, device=device)  # [bucket, in]
            key = tuning.choice_key(module, x)  # shape and dtype only: filled below when it is timed
            if key not in seen:
                seen.add(key)
                auto_kernel(module, x.normal_())
    return len(seen)
