"""GGUF export in llama.cpp: llmspeed's files scored by llama.cpp beside llmspeed, and beside llama.cpp's own quantizer.

Needs llama-cpp-python (see docs/kernels.md for the build this machine needs).

flock /tmp/llmspeed-cpu.lock python benchmarks/gguf_export.py [--quick] [--model smollm2]
"""

from __future__ import annotations

from llmspeed.bench.gguf_export import run
from llmspeed.bench.script import main

if __name__ == "__main__":
    main(run, __doc__)
