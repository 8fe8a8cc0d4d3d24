"""Symmetric int4 scale rules (GPTQ's absmax / 7.5, llmspeed's, llama.cpp's signed Q4_0) by perplexity, round to nearest.

flock /tmp/llmspeed-cpu.lock python benchmarks/symmetric_grid.py [--quick] [--model smollm2]
"""

from __future__ import annotations

from llmspeed.bench.script import main
from llmspeed.bench.symmetric_grid import run

if __name__ == "__main__":
    main(run, __doc__)
