"""Checkpoint formats benchmark: compressed-tensors and GPTQ round trips, quantize-while-loading memory, load time.

flock /tmp/llmspeed-cpu.lock python benchmarks/formats.py [--quick] [--model tiny-llama]
"""

from __future__ import annotations

from llmspeed.bench.formats import run
from llmspeed.bench.script import main

if __name__ == "__main__":
    main(run, __doc__)
