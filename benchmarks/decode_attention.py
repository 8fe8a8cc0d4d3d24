"""Decode attention over the paged KV cache on the CPU (the C++ kernel against SDPA), by sequences and context.

flock /tmp/llmspeed-cpu.lock python benchmarks/decode_attention.py [--quick] [--model tiny-llama]
"""

from __future__ import annotations

from llmspeed.bench.decode_attention import run
from llmspeed.bench.script import main

if __name__ == "__main__":
    main(run, __doc__)
