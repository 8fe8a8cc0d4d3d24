"""Mixed-precision training benchmark: bf16 and fp16 step time, peak memory and loss curves against fp32.

    python benchmarks/training.py [--device cpu|cuda] [--model smollm2] [--quick]

A thin alias of ``python -m llmspeed bench training ...`` (same options, including ``--out`` for JSON and plots).
"""

from __future__ import annotations

import sys

from llmspeed.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["training", *sys.argv[1:]]))
