"""Calibrated 4-bit: fp32 vs RTN / HQQ / GPTQ / AWQ / AWQ+GPTQ perplexity on three text domains (two never calibrated on), with calibration time.

    flock /tmp/llmspeed-cpu.lock python benchmarks/calibration.py [--quick] [--groups 64] [--methods gptq,awq+gptq] [--options "-,no refit"] [--device cuda]

The same suite is ``llmspeed.bench.calibration.run``; see docs/calibration.md for the numbers.
"""

from __future__ import annotations

import argparse

from llmspeed.bench.calibration import run
from llmspeed.timing import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="smollm2", choices=["smollm2"])
    parser.add_argument(
        "--quick", action="store_true", help="fp32 and int4 g64 only, 32 calibration sequences, 4 windows per domain"
    )
    parser.add_argument(
        "--formats", default="int4,nf4,int8", help="comma-separated quantized formats to measure"
    )
    parser.add_argument("--groups", default="64,128", help="comma-separated int4 group sizes to measure")
    parser.add_argument("--methods", default="", help="comma-separated methods to measure (default: all)")
    parser.add_argument(
        "--options",
        default="",
        help="comma-separated row options to measure, e.g. '-,no refit' (default: all)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    formats = tuple(f for f in args.formats.split(",") if f)
    groups = tuple(int(g) for g in args.groups.split(",") if g)
    rows = run(
        device=args.device,
        model=args.model,
        quick=args.quick,
        progress=not args.no_progress,
        formats=formats,
        groups=groups,
        methods=tuple(m for m in args.methods.split(",") if m) or None,
        options=tuple(o for o in args.options.split(",") if o) or None,
    )
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
