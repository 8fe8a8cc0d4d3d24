"""Serving: the Engine under Poisson load vs transformers' continuous batching, prefix caching, repeated calls, soak.

    python benchmarks/serving.py [--quick] [--parts online prefix repeated soak] [--rates 0.5 1 2] [--requests 40]
"""

from __future__ import annotations

import argparse

from llmspeed.bench.serving import run
from llmspeed.timing import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and rates (a few minutes)")
    parser.add_argument("--parts", nargs="+", default=["online", "prefix", "repeated", "soak"],
                        choices=["online", "prefix", "repeated", "soak"])
    parser.add_argument("--rates", nargs="+", type=float, default=None, help="offered request rates (req/s)")
    parser.add_argument("--requests", type=int, default=None, help="online part: Poisson arrivals per rate (default 40)")
    args = parser.parse_args()
    rows = run(quick=args.quick, parts=tuple(args.parts), rates=tuple(args.rates) if args.rates else None,
               requests=args.requests)
    for table in dict.fromkeys(r["table"] for r in rows):
        print(f"\n### {table}\n")
        print(markdown_table([{k: v for k, v in r.items() if k != "table"} for r in rows if r["table"] == table]))


if __name__ == "__main__":
    main()
