"""Matmul kernels for quantized linears, and ``kernel="auto"``: the fastest correct path per shape.

``select(module, x)`` returns the kernel a module uses for activations like ``x``: the one named in
``module.config.kernel``, or for ``"auto"`` the first usable entry of :data:`AUTO_RULES` for the
device type and format whose row limit covers ``M = x.shape[0]``. The rules are a table backed by the
measurements in docs/kernels.md (``python benchmarks/quant.py`` re-measures them on any machine);
``reference`` is the last resort everywhere. :func:`kernels` reports what exists here and what is chosen.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from . import aten, cpp, reference, triton_dequant, triton_gemv  # noqa: F401  (register the kernels)
from .registry import FLOAT_DTYPES, KERNELS, Kernel, register_kernel

# (device type, format) -> ordered [(max rows M or None for any, activation dtypes or None for any, kernel)].
# The first rule whose kernel is usable wins. CPU (2-core AVX2 Zen 1, docs/kernels.md, `python benchmarks/quant.py`
# on a quiet machine): the fused C++ kernel, multi-threaded since it is built with -fopenmp, beats dequantize + MKL
# up to M = 128 on the 4096x4096 layer (at M = 128 on SmolLM2's 576x1536 layer they are within 7%); for prefill,
# dequantizing once and using MKL's fp32 GEMM wins. It also beats aten::_weight_int8pack_mm with bf16 activations
# at M = 4-64 (1.4x) and on SmolLM2's shapes at M = 1; at 4096x4096 M = 1 the two trade places between runs
# (2.5 vs 2.1 ms in one sweep, 1.94 vs 2.17 ms in the full run), so bf16 activations go to it too. The aten
# int8/int4 CPU kernels are 4x-80x slower than fp32 F.linear with fp32 activations. (_weight_int4pack_mm_for_cpu needs a second converted copy of the weight, which would undo part
# of int4's memory saving: auto leaves it to those who name it.)
AUTO_RULES: dict[tuple[str, str], list[tuple[int | None, tuple[torch.dtype, ...] | None, str]]] = {
    ("cpu", "int8"): [(128, None, "cpp"), (None, None, "dequant_fp32")],
    ("cpu", "int4"): [(128, None, "cpp"), (None, None, "dequant_fp32")],
    ("cpu", "nf4"): [(128, None, "cpp"), (None, None, "dequant_fp32")],
    ("cuda", "int8"): [(None, None, "aten_int8"), (16, None, "triton"), (None, None, "triton_dequant"),
                       (None, None, "reference")],
    ("cuda", "int4"): [(None, (torch.bfloat16,), "tinygemm"), (16, None, "triton"), (None, None, "triton_dequant"),
                       (None, None, "reference")],
    ("cuda", "nf4"): [(16, None, "triton"), (None, None, "triton_dequant"), (None, None, "reference")],
}
# On accelerators every usable rule is a candidate and the fastest, timed once per shape bucket, wins
# (no table measured on one GPU fits every GPU); on CPU the first usable rule wins.
_TIMED: dict[tuple, str] = {}


def get_kernel(name: str) -> Kernel:
    """The registered kernel ``name``; ``ValueError`` listing the registered names otherwise."""
    if name not in KERNELS:
        raise ValueError(f"kernel must be 'auto' or one of {sorted(KERNELS)}; got {name!r}")
    return KERNELS[name]


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


def _device_ms(fn, calls: int = 5) -> float:
    """Milliseconds of device time for ``calls`` calls of ``fn``, replayed from one CUDA graph.

    Timing eager calls would measure the host's dispatch whenever a kernel is shorter than it: on an
    H100 a 4096x14336 int8 layer at M = 1 took 102 us eager in the Triton GEMV and 117 us in
    ``triton_dequant``, but 30 us and 112 us replayed from a graph, which is how decode steps run. A
    kernel that cannot be captured is timed eagerly.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up off the capture: autotuning, lazy weight conversion, kernel state
    torch.cuda.current_stream().wait_stream(side)
    run, per_run = fn, 1
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        run, per_run = graph.replay, calls
    except RuntimeError:
        torch.cuda.synchronize()
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls // per_run):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _fastest(candidates: list[Kernel], module, x: torch.Tensor) -> Kernel:
    """The fastest of ``candidates`` on ``x``'s accelerator, timed once per (format, dtype, M bucket, shape)."""
    m = x.shape[0]
    key = (x.device.type, module.quant_format, x.dtype, 1 << max(0, m - 1).bit_length(),
           module.in_features, module.out_features, tuple(k.name for k in candidates))
    if key not in _TIMED:
        if torch.cuda.is_current_stream_capturing():  # nothing can be timed inside a graph capture
            return candidates[0]
        with torch.cuda.device(x.device):
            times = {kernel.name: _device_ms(lambda kernel=kernel: kernel.run(module, x)) for kernel in candidates}
        _TIMED[key] = min(times, key=times.__getitem__)
    return KERNELS[_TIMED[key]]


def auto_kernel(module, x: torch.Tensor, probe: bool = True) -> Kernel:
    """The kernel ``kernel="auto"`` picks for ``module`` and activations ``x`` [M, in] (``probe``: try accelerator kernels once)."""
    m = x.shape[0]
    candidates: list[Kernel] = []
    for max_rows, dtypes, name in AUTO_RULES.get((x.device.type, module.quant_format), []):
        if (max_rows is not None and m > max_rows) or (dtypes is not None and x.dtype not in dtypes):
            continue
        kernel = KERNELS.get(name)
        if (
            kernel is not None
            and kernel.why_not(module, x) is None
            and (not probe or _works(kernel, module, x))
        ):
            candidates.append(kernel)
            if x.device.type != "cuda" or not probe:
                break
    if not candidates:
        return KERNELS["reference"]
    if len(candidates) == 1:
        return candidates[0]
    return _fastest(candidates, module, x)


def select(module, x: torch.Tensor) -> Kernel:
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


def usable_kernels(module, x: torch.Tensor) -> list[str]:
    """Names of the kernels that can multiply ``x`` by ``module``'s weight on this machine."""
    return [k.name for k in KERNELS.values() if k.why_not(module, x) is None]


def check_kernel(name: str, fmt: str, device: torch.device | str) -> None:
    """``ValueError`` when kernel ``name`` does not exist for ``fmt`` on ``device`` (before anything changes)."""
    if name == "auto":
        return
    kernel = get_kernel(name)
    dev = torch.device(device).type
    if fmt not in kernel.formats or dev not in kernel.devices:
        raise ValueError(
            f"kernel={name!r} does not handle {fmt} on {dev} (it handles {list(kernel.formats)} on "
            f"{list(kernel.devices)}); use kernel='auto' or one of "
            f"{[k.name for k in KERNELS.values() if fmt in k.formats and dev in k.devices and k.unavailable() is None]}"
        )
    reason = kernel.unavailable()
    if reason is not None:
        raise ValueError(f"kernel={name!r} is not available on this machine: {reason}; use kernel='auto'")


@dataclass(frozen=True)
class KernelReport:
    """What :func:`llmspeed.kernels` returns: every kernel's availability here, and the auto choices.

    Attributes:
        kernels: One dict per registered kernel: name, formats, devices, dtypes, available, reason, description.
        choices: ``{(device, format, dtype, M): kernel name}`` that ``kernel="auto"`` picks for a
            576 -> 1536 layer (SmolLM2's MLP) at the format's default group size.
    """

    kernels: tuple[dict, ...]
    choices: dict

    def __str__(self) -> str:
        from ...bench.timing import markdown_table

        avail = markdown_table([{k: v for k, v in row.items() if k != "description"} for row in self.kernels])
        rows = {}
        for (dev, fmt, dtype, m), name in self.choices.items():
            rows.setdefault((dev, fmt, dtype), {"device": dev, "format": fmt, "dtype": dtype})[f"M={m}"] = (
                name
            )
        return f"Kernels on this machine:\n{avail}\n\nkernel='auto' picks:\n{markdown_table(list(rows.values()))}"

    __repr__ = __str__


def kernels(rows: tuple[int, ...] = (1, 4, 16, 64, 512)) -> KernelReport:
    """Which matmul paths exist on this machine, and which ``kernel="auto"`` chooses per format, dtype and M."""
    from ..config import QuantConfig
    from ..modules import MODULES

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
            module = cls(576, 1536, QuantConfig(fmt), device="meta")
            for dtype in FLOAT_DTYPES:
                for m in rows:
                    x = torch.empty(m, 576, dtype=dtype, device=dev)
                    choices[(dev, fmt, str(dtype).removeprefix("torch."), m)] = auto_kernel(
                        module, x, probe=False
                    ).name
    return KernelReport(tuple(table), choices)


__all__ = [
    "KERNELS",
    "Kernel",
    "register_kernel",
    "get_kernel",
    "select",
    "auto_kernel",
    "check_kernel",
    "kernels",
    "AUTO_RULES",
    "KernelReport",
]
