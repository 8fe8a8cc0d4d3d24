"""Precision benchmark: fp32 vs bf16 vs fp16 (and bf16 autocast) on one model, plus a matmul microbenchmark.

    python benchmarks/precision.py [--device cpu|cuda] [--model smollm2] [--quick]

A thin alias of ``python -m llmspeed bench precision ...`` (same options, including ``--out`` for JSON and plots).
"""

from __future__ import annotations

import sys

from llmspeed.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["precision", *sys.argv[1:]]))
