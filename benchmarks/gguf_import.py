"""GGUF files run by llmspeed.load and by llama.cpp: the same weights, perplexity and decode speed side by side.

Needs llama-cpp-python (see docs/kernels.md for the build this machine needs).

flock /tmp/llmspeed-cpu.lock python benchmarks/gguf_import.py [--quick]
"""

from __future__ import annotations

from llmspeed.bench.gguf_import import run
from llmspeed.bench.script import main

if __name__ == "__main__":
    main(run, __doc__)
