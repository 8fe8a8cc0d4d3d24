"""Weights in 2 MiB pages against 4 KiB pages: decode steps (one and eight sequences) and a prompt per format (fp32,
bf16, int8, int4), and the fused step's fp32 GEMV over 96 MiB in each.

flock /tmp/llmspeed-cpu.lock python benchmarks/weight_pages.py [--quick] [--model tiny-llama]
"""

from __future__ import annotations

from llmspeed.bench.script import main
from llmspeed.bench.weight_pages import run

if __name__ == "__main__":
    main(run, __doc__)
