"""Command line: ``python -m llmspeed demo``, ``bench ...``, ``serve ...`` and ``build`` (compile the C++ kernels ahead of time)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the demo or the benchmark suites."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m llmspeed", description=__doc__)
    parser.add_argument(
        "command", choices=["demo", "bench", "serve", "build"],
        help="demo: the main job on SmolLM2; bench: suites; serve: an OpenAI-compatible server; "
        "build: compile the C++ kernels now (they are otherwise built on first use)",
    )
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    if args.command == "build":
        from .prebuild import main as build_main

        return build_main(argv[1:])
    if args.command == "serve":
        from .serving.cli import main as serve_main

        return serve_main(argv[1:])
    from .bench.cli import main as bench_main

    return bench_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
