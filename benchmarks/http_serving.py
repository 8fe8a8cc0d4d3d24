"""HTTP serving: `llmspeed serve` (fp32 and int8) vs `transformers serve --continuous-batching`, same Poisson schedule.

    python benchmarks/http_serving.py [--quick] [--rates 0.25 0.5 1 2 4] [--requests 24] [--servers ...] [--rounds 3]
"""

from __future__ import annotations

import argparse

from llmspeed.bench.http_serving import run
from llmspeed.timing import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 requests and two rates")
    parser.add_argument("--rates", nargs="+", type=float, default=None, help="offered request rates (req/s)")
    parser.add_argument("--servers", nargs="+", default=["transformers", "llmspeed", "llmspeed int8"])
    parser.add_argument("--requests", type=int, default=None, help="requests per rate (default 24; 10 with --quick)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="start the servers together and take turns rate by rate, this many times (drift hits all alike)")
    args = parser.parse_args()
    rows = run(quick=args.quick, rates=tuple(args.rates) if args.rates else None, servers=tuple(args.servers),
               requests=args.requests, rounds=args.rounds)
    for table in dict.fromkeys(r["table"] for r in rows):
        print(f"\n### {table}\n")
        print(markdown_table([{k: v for k, v in r.items() if k != "table"} for r in rows if r["table"] == table]))


if __name__ == "__main__":
    main()
