"""Quantization benchmark: perplexity, memory, kernel microbenchmark and decode speed tables.

flock /tmp/llmspeed-cpu.lock python benchmarks/quant.py [--quick] [--device cuda --model llama-1b-random]
    [--tables perplexity memory kernels decode]
"""

from __future__ import annotations

import argparse

from llmspeed.bench.quant import TABLES, run
from llmspeed.timing import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="smollm2", help="smollm2, llama-1b-random or tiny-<arch>")
    parser.add_argument(
        "--quick", action="store_true", help="fewer windows, shapes and tokens (a few minutes)"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--tables", nargs="+", default=None, choices=TABLES,
                        help="which tables (default all; perplexity and memory: smollm2 on the CPU only)")
    args = parser.parse_args()
    rows = run(device=args.device, model=args.model, quick=args.quick, progress=not args.no_progress,
               tables=args.tables)
    for table in dict.fromkeys(r["table"] for r in rows):
        print(f"\n## {table}\n")
        print(markdown_table([r for r in rows if r["table"] == table]))


if __name__ == "__main__":
    main()
