"""int4 perplexity against llama.cpp's Q4_0 on the embedded SmolLM2 and on reorderings of it that compute the same function.

flock /tmp/llmspeed-cpu.lock python benchmarks/q4_grid.py [--quick] [--seeds 0 1 2 ...]
"""

from __future__ import annotations

import argparse

from llmspeed.bench.q4_grid import SEEDS, run
from llmspeed.timing import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seeds 0 and 1, 2 perplexity windows")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help=f"0: the embedded model; n > 0: reordering n (default 0 and {SEEDS[0]}-{SEEDS[-1]})")
    args = parser.parse_args()
    print(markdown_table(run(quick=args.quick, seeds=args.seeds)))


if __name__ == "__main__":
    main()
