"""Model weights in 2 MiB pages (Linux transparent huge pages), for CPU decode steps that stream them.

A decode step reads every weight once. In 4 KiB pages that is a TLB miss every 4 KiB, and on a virtual machine
each miss walks two page tables; in 2 MiB pages a 540 MB model needs 270 TLB entries, which stay cached. What that
buys per format is measured in docs/kernels.md ("Weights in 2 MiB pages"; ``python benchmarks/weight_pages.py``).

Weights loaded from a safetensors file are usually a memory map of that file (4 KiB pages of the page cache);
weights made by ``torch`` (a cast, quantization) are anonymous memory in 4 KiB pages unless the process was started
with ``THP_MEM_ALLOC_ENABLE=1``. :func:`move` copies a module's large parameters and buffers into one anonymous
mapping advised ``MADV_HUGEPAGE`` (the kernel then backs it with 2 MiB pages where it has them), through
``module._apply``, the hook ``.to()`` uses: parameters keep their identity (``param.data`` is re-pointed), values,
dtypes, shapes, strides and sharing (tensors that shared a storage, a tied embedding and output head, share its
copy), and module subclasses that keep derived state (bound kernels) drop it, as after ``.to()``.

The generator moves a CPU model's weights when it is built (:class:`~llmspeed.generation.Generator`,
``weight_pages_status``); ``LLMSPEED_HUGE_PAGES=0`` in the environment leaves them where they are. The cost: the
weights become process memory (a file's pages could be dropped and read again under memory pressure; these are
swapped instead), and the time of the copy (on a virtual machine, mostly the first touch of memory the host has not
backed yet).
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
import weakref
from pathlib import Path

import torch
from torch import nn

ENV = "LLMSPEED_HUGE_PAGES"
PAGE = 2 << 20  # bytes of an x86-64 / arm64 huge page (the kernel's hpage_pmd_size)
MIN_BYTES = 64 << 10  # storages smaller than this stay where they are (norms, biases, small state)
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
ALIGN = 64  # bytes between the copies of two storages: a cache line

_ARENAS: list[tuple[int, int, weakref.ref]] = []  # (start, end, the mapping) of every live arena
_ARENAS_LOCK = threading.Lock()  # generators built in several threads record and prune arenas at once


def why_not() -> str | None:
    """Why :func:`move` would leave weights in place here, or ``None`` when it moves them."""
    setting = os.environ.get(ENV, "").strip().lower()
    if setting in ("0", "false", "off", "no"):
        return f"{ENV}={os.environ[ENV]}"
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return f"transparent huge pages are a Linux feature (this is {sys.platform})"
    try:
        mode = THP_MODE.read_text()
    except OSError:
        return f"this kernel has no transparent huge pages ({THP_MODE} is missing)"
    if "[never]" in mode:
        return f"transparent huge pages are off ({THP_MODE}: {mode.strip()})"
    return None


def _arena_of(ptr: int) -> bool:
    """Whether ``ptr`` lies in a live arena of :func:`move` (dead arenas are dropped from the list)."""
    with _ARENAS_LOCK:
        _ARENAS[:] = [a for a in _ARENAS if a[2]() is not None]
        return any(start <= ptr < end for start, end, _ in _ARENAS)


def _arena(nbytes: int) -> tuple[mmap.mmap, int]:
    """An anonymous mapping of ``nbytes`` from a page boundary, advised for 2 MiB pages before its first touch (so
    the writes that fill it fault in 2 MiB pages), and the offset of that boundary in it."""
    arena = mmap.mmap(-1, nbytes + PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arena.madvise(mmap.MADV_HUGEPAGE)
    base = torch.frombuffer(arena, dtype=torch.uint8, count=1).data_ptr()
    shift = -base % PAGE
    with _ARENAS_LOCK:
        _ARENAS.append((base + shift, base + shift + nbytes, weakref.ref(arena)))
    return arena, shift


def empty(size: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor in memory advised for 2 MiB pages (``torch.empty`` where :func:`why_not` says
    why not), as the weights :func:`move` moved: for measurements that should read memory the way a step does."""
    nbytes = torch.Size(size).numel() * torch.empty(0, dtype=dtype).element_size()
    if why_not() is not None or nbytes == 0:
        return torch.empty(size, dtype=dtype)
    arena, shift = _arena(nbytes)
    return torch.frombuffer(arena, dtype=torch.uint8, count=nbytes, offset=shift).view(dtype).view(size)


def side_by_side(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous copies of the CPU ``tensors``, one after another (:data:`ALIGN` bytes apart) in one mapping advised
    for 2 MiB pages, in their order; ``tensors`` as they are where :func:`why_not` says why not, or where they hold
    less than :data:`MIN_BYTES` in all. Empty tensors stay as they are. For state a step reads in order besides the
    weights (the fused step's LoRA stacks: docs/lora.md measures it)."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    if why_not() is not None or sum(sizes) < MIN_BYTES:
        return list(tensors)
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += -(-n // ALIGN) * ALIGN
    arena, shift = _arena(total)
    out = []
    for t, n, at in zip(tensors, sizes, offsets):
        if n == 0:
            out.append(t)
            continue
        copy = torch.frombuffer(arena, dtype=torch.uint8, count=n, offset=shift + at).view(t.dtype).view(t.shape)
        out.append(copy.copy_(t))
    return out


def _storages(module: nn.Module, grads: bool = True) -> dict[int, torch.Tensor]:
    """``{storage address: a tensor of it}`` for the CPU parameters and buffers of ``module`` (and gradients)."""
    found: dict[int, torch.Tensor] = {}
    for t in (*module.parameters(), *module.buffers()):
        for tensor in (t, t.grad) if grads and isinstance(t, nn.Parameter) else (t,):
            if tensor is not None and tensor.device.type == "cpu" and tensor.layout == torch.strided \
                    and not tensor.is_inference():
                found.setdefault(tensor.untyped_storage().data_ptr(), tensor)
    return found


def held(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers (each storage once) that :func:`move` put in 2 MiB pages."""
    return sum(t.untyped_storage().nbytes() for ptr, t in _storages(module, grads=False).items() if _arena_of(ptr))


def move(module: nn.Module, min_bytes: int = MIN_BYTES) -> int:
    """Copy ``module``'s CPU parameters and buffers of at least ``min_bytes`` (each storage once) into memory
    advised to the kernel for 2 MiB pages; return the bytes moved (0 when :func:`why_not` says why not, when all
    of it is there already, or when less than one page would move).

    Tensors created under ``torch.inference_mode()`` stay (their ``.data`` cannot be re-pointed outside it).
    Call it while nothing runs the module: a step running beside it may read either copy.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: ``min_bytes`` is not a non-negative integer.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
    if isinstance(min_bytes, bool) or not isinstance(min_bytes, int) or min_bytes < 0:
        raise ValueError(f"min_bytes must be a non-negative int; got {min_bytes!r}")
    if why_not() is not None:
        return 0
    todo = {ptr: t for ptr, t in _storages(module).items()
            if t.untyped_storage().nbytes() >= max(min_bytes, 1) and not _arena_of(ptr)}  # fmt: skip
    offsets, total = {}, 0
    for ptr, t in todo.items():
        offsets[ptr] = total
        total += -(-t.untyped_storage().nbytes() // ALIGN) * ALIGN
    if total < PAGE:
        return 0
    arena, shift = _arena(total)
    copies: dict[int, torch.UntypedStorage] = {}

    def relocated(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr() if t.device.type == "cpu" and t.layout == torch.strided and t.numel() else None
        if ptr not in offsets:
            return t
        if ptr not in copies:
            source = t.untyped_storage()
            copy = torch.frombuffer(arena, dtype=torch.uint8, count=source.nbytes(), offset=shift + offsets[ptr])
            copy.copy_(torch.empty(0, dtype=torch.uint8).set_(source))
            copies[ptr] = copy.untyped_storage()
        return torch.empty(0, dtype=t.dtype).set_(copies[ptr], t.storage_offset(), t.size(), t.stride())

    with torch.inference_mode(False), torch.no_grad():  # copies made under inference_mode would be inference tensors
        module._apply(relocated)
    return sum(s.nbytes() for s in copies.values())
