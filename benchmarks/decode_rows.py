"""Decode steps by number of running rows: the fused C++ step against the per-layer path (fp32, int8, int4 g64,
int4 g64 with int8 activations).

flock /tmp/llmspeed-cpu.lock python benchmarks/decode_rows.py [--quick] [--model tiny-llama | smollm2-shape-phi3]
"""

from __future__ import annotations

from llmspeed.bench.decode_rows import run
from llmspeed.bench.script import main

if __name__ == "__main__":
    main(run, __doc__)
