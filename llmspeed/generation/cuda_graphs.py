"""CUDA graphs for decode-only steps (GPU only; the CPU path never imports torch.cuda graph APIs).

A decode step of ``n`` sequences runs the same kernels every time, only the data changes, so it can
be captured once and replayed: this removes the per-kernel launch overhead that dominates a batch-1
decode step of a 1B model on a GPU. Graphs are captured lazily per bucket (batch size rounded up to a
power of two, context width in blocks rounded up to a power of two); padded rows write their keys and
values into a reserved scratch block and attend only to it, so they never touch a live sequence.
If capture fails (a model whose forward syncs with the host, say), the generator warns once and
falls back to eager steps.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .kv_cache import DecodeKernel, PagedAttention, PagedKVCache, block_tables

if TYPE_CHECKING:
    from .runner import StepInput


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= ``max(n, minimum)``."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


def capture(body: Callable[[], torch.Tensor], pool: Any, device: torch.device) -> tuple[Any, torch.Tensor]:
    """``body`` warmed up twice on a side stream, then captured: the graph and its output. Streams and capture are
    ``device``'s (the model's), not the current device's: a model on ``cuda:1`` while ``cuda:0`` is current would
    otherwise run its warm-up off the side stream and capture nothing of its own."""
    with torch.cuda.device(device):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(2):
                body()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
            out = body()
    return graph, out


class _Graph:
    """One captured decode step with its static input buffers."""

    def __init__(
        self, model: Any, cache: PagedKVCache, rows: int, width: int, pad_block: int, pool: Any,
        decode_kernel: DecodeKernel | None = None,
    ):  # fmt: skip
        dev = cache.key.device
        bs = self.block_size = cache.block_size
        self.ids = torch.zeros(rows, dtype=torch.long, device=dev)  # [n]
        self.pos = torch.zeros(rows, dtype=torch.long, device=dev)  # [n]
        self.slots = torch.full((rows,), pad_block * bs, dtype=torch.long, device=dev)  # [n]
        self.blocks = torch.full((rows * width,), pad_block, dtype=torch.long, device=dev)  # [n * W]
        self.lens = torch.ones(rows, dtype=torch.long, device=dev)  # [n]
        self.arange = torch.arange(width * bs, device=dev)  # [W * BS]
        mask = None
        if decode_kernel is None:  # the kernel reads lens itself; gather + SDPA needs the mask
            mask = torch.ones(rows, 1, 1, width * bs, dtype=torch.bool, device=dev)  # [n, 1, 1, W * BS]
        self.rows = torch.arange(rows, device=dev)  # [n]
        attention = PagedAttention.static_decode(cache, self.slots, self.blocks, self.lens, mask, decode_kernel)

        def body() -> torch.Tensor:
            if mask is not None:
                mask.copy_((self.arange[None, :] < self.lens[:, None])[:, None, None, :])
            return model.forward_batch(self.ids, self.pos, attention, self.rows)  # [n, V]

        self.graph, self.logits = capture(body, pool, dev)

    def replay(self, ids, pos, slots, tables: Sequence[Sequence[int]], lens, width: int, pad_block: int,
               device_ids: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Logits ``[n, V]`` (a view of the graph's output, overwritten by its next replay). ``device_ids`` (``[n]``
        on the GPU) replace ``ids``: copied on the stream, so the host never waits for them."""
        n = len(ids)
        rows = self.ids.shape[0]
        pad = rows - n
        pad_slot = pad_block * self.block_size
        host = torch.tensor(
            [list(ids) + [0] * pad, list(pos) + [0] * pad, list(slots) + [pad_slot] * pad, list(lens) + [1] * pad],
            dtype=torch.long,
        )  # [4, rows]
        blocks = block_tables([*tables, *[()] * pad], width, torch.device("cpu"), pad=pad_block)  # [rows, W]
        host = host.to(self.ids.device, non_blocking=True)
        self.ids.copy_(host[0])
        self.pos.copy_(host[1])
        self.slots.copy_(host[2])
        self.lens.copy_(host[3])
        self.blocks.copy_(blocks.flatten().to(self.ids.device, non_blocking=True))
        if device_ids is not None:
            self.ids[:n].copy_(device_ids)
        self.graph.replay()
        return self.logits[:n]


class DecodeGraphs:
    """Captures and replays decode-only steps.

    Args:
        model: The model (its ``forward_batch`` is captured).
        cache: The paged cache; block ``pad_block`` must never be handed to a sequence.
        pad_block: The scratch block for padded rows.
        max_batch: Largest decode batch to capture (bigger batches run eagerly).
        max_width: Largest context, in blocks, to capture.
        decode_kernel: The attention kernel for the decode rows (see :class:`~.kv_cache.PagedAttention`).
    """

    def __init__(
        self, model: Any, cache: PagedKVCache, pad_block: int, max_batch: int = 256, max_width: int = 512,
        decode_kernel: DecodeKernel | None = None,
    ):  # fmt: skip
        self.model = model
        self.cache = cache
        self.pad_block = pad_block
        self.max_batch = max_batch
        self.max_width = max_width
        self.decode_kernel = decode_kernel
        # gather + SDPA pays for every padded block, so widths are bucketed from 4 blocks; the kernel
        # stops at each sequence's length, so one wide graph per batch size serves all shorter contexts
        self.min_width = 4 if decode_kernel is None else min(32, max_width)
        self.enabled = True
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool: Any = None  # torch.cuda.graph_pool_handle(), made at the first capture

    def key(self, rows: int, context: int) -> tuple[int, int]:
        """The ``(rows, width in blocks)`` of the graph that runs ``rows`` sequences of up to ``context`` tokens."""
        return bucket(rows), bucket(-(-context // self.cache.block_size), self.min_width)

    def capture(self, rows: int, context: int) -> bool:
        """Capture (if not yet captured) the graph for ``rows`` sequences of up to ``context`` tokens; False if off."""
        key = self.key(rows, context)
        if not self.enabled or key[0] > bucket(self.max_batch) or key[1] > self.max_width:
            return False
        if key in self._graphs:
            return True
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = _Graph(self.model, self.cache, key[0], key[1], self.pad_block, self._pool, self.decode_kernel)
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly
            warnings.warn(f"CUDA graph capture failed, decode steps run eagerly: {exc}", stacklevel=2)
            self.enabled = False
            return False
        self._graphs[key] = graph
        return True

    @property
    def num_graphs(self) -> int:
        """How many decode graphs are captured."""
        return len(self._graphs)

    def run(self, step: StepInput, ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Logits ``[n, V]`` of a decode-only :class:`~.runner.StepInput`; ``None`` = run it eagerly. ``ids``
        (``[n]`` on the GPU): the step's token ids, in place of ``step.ids``."""
        n = len(step.ids)
        context = max(step.positions) + 1
        if n > self.max_batch:
            return None
        key = self.key(n, context)
        if key not in self._graphs:
            wider = [k for k in self._graphs if k[0] == key[0] and k[1] > key[1]]
            if wider:
                key = min(wider)  # a captured graph with more blocks also serves: padding is cheaper than a capture
            elif not self.capture(n, context):
                return None
        graph, width = self._graphs[key], key[1]
        return graph.replay(
            step.ids, step.positions, step.slots,
            [t for t, _, _ in step.chunks], [pos + 1 for pos in step.positions], width, self.pad_block, ids,
        )
