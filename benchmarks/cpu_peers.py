"""CPU inference against llama.cpp (llama-cpp-python), format by format, on the same SmolLM2 weights.

flock /tmp/llmspeed-cpu.lock python benchmarks/cpu_peers.py [--quick] [--formats int4 "int4, awq+gptq, ..."]
"""

from __future__ import annotations

import argparse

from llmspeed.bench.cpu_peers import FORMATS, run
from llmspeed.timing import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 decode steps and 2 perplexity windows")
    parser.add_argument("--formats", nargs="+", default=None, choices=list(FORMATS), metavar="FORMAT",
                        help="rows to run (default all; a variant brings its anchor): " + "; ".join(FORMATS))
    args = parser.parse_args()
    rows = run(quick=args.quick, formats=args.formats)
    print(markdown_table([{k: v for k, v in r.items() if k != "table"} for r in rows]))


if __name__ == "__main__":
    main()
