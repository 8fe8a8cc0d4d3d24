"""Precision benchmark: fp32 vs bf16 vs fp16 (and bf16 autocast) on one model, plus a matmul microbenchmark.

    python benchmarks/precision.py [--device cpu|cuda] [--model smollm2] [--quick]

The same suite runs as ``python -m llmspeed bench precision`` (which also saves JSON and plots).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from llmspeed.bench import markdown_table, precision
from llmspeed.bench.plots import group_rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    rows = precision.run(device=args.device, model=args.model, quick=args.quick)
    print(f"`python benchmarks/precision.py {shlex.join(argv)}`\n")
    for table, table_rows in group_rows(rows, "precision").items():
        print(f"### {table}\n\n{markdown_table(table_rows)}\n")


if __name__ == "__main__":
    main()
