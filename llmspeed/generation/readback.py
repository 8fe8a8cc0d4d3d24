"""A step's token ids on their way from the device to the host, without the host waiting for them.

A CUDA step's sampled ids are copied into pinned host memory behind the step on its stream, and an event marks
the copy; the host waits on that event only when it needs the ids. A burst of decode steps (:mod:`.greedy_burst`) queues
all its steps this way and then turns each step's tokens into events while the GPU runs the next ones. Off CUDA
the ids are read when asked for.
"""

from __future__ import annotations

import time

import torch


class Readback:
    """One step's token ids ``[n]`` (int64, on the model's device), read back by :meth:`get`."""

    def __init__(self, ids: torch.Tensor):
        self._event = None
        self._host = ids
        if ids.device.type == "cuda":
            self._host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)  # [n]
            self._host.copy_(ids, non_blocking=True)
            self._event = torch.cuda.Event()
            # on the stream the copy ran on, the ids' device's: the current device's (cuda:0 for a model on cuda:1)
            # would let get() read the buffer before the copy
            self._event.record(torch.cuda.current_stream(ids.device))

    def get(self) -> tuple[list[int], float]:
        """The ids, and the ``time.perf_counter()`` at which the host had them (waits for the step if needed)."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist(), time.perf_counter()


__all__ = ["Readback"]
