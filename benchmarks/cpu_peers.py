"""CPU inference against llama.cpp (llama-cpp-python), format by format, on the same SmolLM2 weights.

flock /tmp/llmspeed-cpu.lock python benchmarks/cpu_peers.py [--quick] [--rounds N] [--interleave BLOCKS] [--formats int4 "int4, awq+gptq, ..."]
"""

from __future__ import annotations

import argparse

from llmspeed.bench.cpu_peers import FORMATS, MAX_BLOCKS, run
from llmspeed.timing import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 decode steps and 2 perplexity windows")
    parser.add_argument("--formats", nargs="+", default=None, choices=list(FORMATS), metavar="FORMAT",
                        help="rows to run (default all; a variant brings its anchor): " + "; ".join(FORMATS))
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate each format's llmspeed and llama.cpp measurements this many times; "
                             "report medians and the median of the rounds' ratios (a shared host's drift)")
    parser.add_argument("--interleave", type=int, default=None,
                        help="blocks of the one-sequence decode column timed between llama.cpp's blocks "
                             f"(default 12, 4 with --quick; 0: none; at most {MAX_BLOCKS})")
    args = parser.parse_args()
    rows = run(quick=args.quick, formats=args.formats, rounds=args.rounds, interleave=args.interleave)
    print(markdown_table([{k: v for k, v in r.items() if k != "table"} for r in rows]))


if __name__ == "__main__":
    main()
