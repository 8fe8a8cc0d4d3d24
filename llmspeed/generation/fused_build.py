"""The fused decode step's C++ extension (``decode_cpu.cpp`` and its headers): building it once per machine, and
the machine facts its loops follow (weight prefetching, the rows from which a matrix is a GEMM, AMX tiles, integer
dot products), for :mod:`.fused_decode`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch

from .. import cpp_build, huge_pages

SOURCE = Path(__file__).with_name("decode_cpu.cpp")
Q4_HEADER = Path(__file__).parent.parent / "quant" / "kernels" / "q4_tiles.h"  # the shared 4-bit tiles
AMX_HEADER = Q4_HEADER.with_name("amx_tiles.h")  # the shared AMX tile matmul
INT8_HEADER = Q4_HEADER.with_name("q4_int8.h")  # int8 activations and the int4 / int8 x int8 dot products (VNNI, AVX2)
PANELS_HEADER = Q4_HEADER.with_name("q4_panels.h")  # int4 x int8 activations for prompt-sized steps (AVX2, VNNI)
Q8_PANELS_HEADER = Q4_HEADER.with_name("q8_panels.h")  # int8 x int8 activations for prompt-sized steps (VNNI)
DEQUANT_HEADER = Q4_HEADER.with_name("dequant_rows.h")  # packed rows widened to fp32 for prompt-sized GEMMs
INT8_GROUPS_HEADER = Q4_HEADER.with_name("int8_groups.h")  # group-wise int8 rows (GGUF's Q8_0)
VEC_HEADER = SOURCE.with_name("cpu_vec.h")  # widening loads to fp32 registers
ATTENTION_HEADER = SOURCE.with_name("paged_attention.h")  # decode attention over the paged KV cache
TEAM_HEADER = SOURCE.with_name("step_team.h")  # the threads held for one decode step
STEP_HEADERS = [SOURCE.with_name(name) for name in  # the step's own parts (decode_cpu.cpp says which is which)
                ("gemv_rows.h", "gemv_group.h", "step_ops.h", "lora_deltas.h", "held_weights.h")]


@lru_cache(maxsize=1)
def _build() -> tuple[ModuleType | None, str | None]:
    functions = ["decode_step", "hold", "release", "held_current", "gemv", "paged_decode", "amx_usable", "vnni_usable",
                 "float_prefetch", "upcast_bf16", "gemm_rows", "step_team", "greedy_steps"]
    headers = [Q4_HEADER, AMX_HEADER, INT8_HEADER, PANELS_HEADER, Q8_PANELS_HEADER, DEQUANT_HEADER, INT8_GROUPS_HEADER, VEC_HEADER,
               ATTENTION_HEADER, TEAM_HEADER,
               *STEP_HEADERS]  # fmt: skip
    return cpp_build.build("llmspeed_decode_cpu", SOURCE, functions, includes=headers)


def extension() -> ModuleType | None:
    """The compiled decode extension (built on first call), or ``None`` when it cannot be built."""
    return _build()[0]


def unavailable() -> str | None:
    """Why the C++ decode kernel cannot run here, or ``None`` (builds it on first call)."""
    return _build()[1]


PREFETCH_KEY = "cpu|fused step|float weight prefetch|k{k}{pages}"  # its entry in the kernel choices of this machine
PREFETCH_PROBE_MB = 96  # fp32 weight the measurement streams: more than the last-level cache of the CPUs measured


def float_prefetch(k: int = 1024) -> bool:
    """Whether the fused step's float row loop (fp32, bf16, widened int8 weights) prefetches rows ahead here,
    for weight rows of ``k`` inputs (the model's hidden size); sets it in the extension and returns it.

    Prefetching 4 KiB ahead helped on the CPUs the step was written on and costs 4-8% of a decode step on
    others (a 2-core Zen 3, where it costs 13% of a GEMV over rows of 576 and 0.5-7% at 1024-4096: docs/kernels.md).
    So it is measured once per machine and width, the first time a fused step is built: a GEMV over
    ``PREFETCH_PROBE_MB`` of fp32 weight both ways, timed round-robin (about 0.1 s), the choice kept with the
    kernel choices (:mod:`llmspeed.quant.kernels.tuning`, key :data:`PREFETCH_KEY`). With timing off
    (``LLMSPEED_AUTOTUNE=0``) and nothing stored, it prefetches.
    """
    ext = extension()
    if ext is None:
        return True
    on = _prefetch_choice(k)
    ext.float_prefetch(on)
    return on


def prefetch_key(k: int) -> str:
    """The kernel-choice key of :func:`float_prefetch` for rows of ``k`` inputs: in 2 MiB pages where the generator
    moves weights into them (:mod:`llmspeed.huge_pages`; the probe weight is put there too), else in 4 KiB pages."""
    return PREFETCH_KEY.format(k=k, pages="|2M pages" if huge_pages.why_not() is None else "")


@lru_cache(maxsize=8)
def _prefetch_choice(k: int) -> bool:
    """:func:`float_prefetch`'s choice for rows of ``k`` inputs: stored, else measured (timing on), else on."""
    from ..quant.kernels import tuning

    ext = extension()
    store, candidates, key = tuning.store(), {"prefetch", "stream"}, prefetch_key(k)
    choice = store.get(key, candidates)
    if choice is None and tuning.enabled() and ext is not None:
        w = huge_pages.empty((PREFETCH_PROBE_MB * 2**20 // (4 * k), k), torch.float32).fill_(1.0)  # [n, k]
        x, none = torch.ones(1, k), torch.empty(0)  # [1, k]

        def gemv(on: bool):
            def run() -> None:
                ext.float_prefetch(on)
                ext.gemv(x, w, none, none, 0, False)

            return run

        times = tuning.time_candidates({"prefetch": gemv(True), "stream": gemv(False)})
        if times:
            choice = tuning.pick(times, "prefetch")
            store.put(key, choice, times, "prefetch", candidates)
    return choice != "stream"


def gemm_rows() -> int:
    """Rows from which the fused step runs a matrix as a GEMM instead of its row loop (``TORCH_GEMM_ROWS`` of
    ``decode_cpu.cpp``; 64), where AMX tiles do not run it; 0 without the extension."""
    ext = extension()
    return 0 if ext is None else int(ext.gemm_rows())


def amx_available() -> bool:
    """Whether the fused step can run its matrices on AMX tiles here (see :attr:`FusedDecode.amx_rows`)."""
    ext = extension()
    return ext is not None and bool(ext.amx_usable())


def int8_dot_available() -> bool:
    """Whether layers with int8 activations (``quantize(..., activations="int8")``: int8 weights, and int4 with
    groups of whole 32-code blocks) multiply integer codes in the fused step here (AVX-512 VNNI, or AVX2's
    byte multiply-adds); elsewhere they compute on ``q * d`` in fp32."""
    ext = extension()
    return ext is not None and bool(ext.vnni_usable())
