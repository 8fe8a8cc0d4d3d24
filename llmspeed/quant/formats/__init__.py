"""Checkpoint folders other than llmspeed's own, both ways.

* :mod:`.packing`: int32 words of 4- and 8-bit codes as both formats store them;
* :mod:`.files`: which safetensors files a folder holds (one file or an index of shards) and reading
  them, with or without memory-mapping;
* :mod:`.skeleton`: an architecture built on ``meta`` with quantized skeletons at the quantized
  positions, filled tensor by tensor with every dtype and shape checked (no float weight is allocated
  for a quantized layer);
* :mod:`.compressed_tensors`: the ``pack-quantized`` format of compressed-tensors (what
  ``transformers`` and vLLM load), written by ``llmspeed.save(..., format="compressed-tensors")`` and read
  by ``llmspeed.load`` (:mod:`.ct_load`, which :mod:`.compressed_tensors` re-exports; an int8 output head,
  written in float, comes back int8 through :mod:`.ct_head`);
* :mod:`.gptq`: GPTQ folders (``qweight``/``qzeros``/``scales``/``g_idx``, checkpoint formats v1 and v2,
  ``desc_act``), read by ``llmspeed.load``;
* :mod:`.awq`: AutoAWQ's GEMM folders (``qweight``/``qzeros``/``scales`` packed along the output), read by
  ``llmspeed.load``.

:func:`detect` tells which of them a folder is; :mod:`llmspeed.quant.serialize` dispatches on it.
"""

from __future__ import annotations

from .files import detect

__all__ = ["detect"]
