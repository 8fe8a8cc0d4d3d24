"""The default calibration text: registers of text every CPython ships, interleaved.

Calibrating on one narrow domain fits the quantized model to it (docs/calibration.md measures the
cost on text of other kinds). The default mix takes four registers, all from the running Python, so it
is the same on every machine with the same CPython version and needs no download:

* ``pydoc``: reference prose with code examples, the ``"train"`` half of :func:`~.text.pydoc_text`
  without its paragraphs that also occur in the ``"eval"`` half (pydoc topics repeat each other: 17%
  of the ``"eval"`` half, and about a third of its first 16 perplexity windows, occur word for word
  in the ``"train"`` half);
* ``docstrings``: API prose, the module, class and function docstrings of :data:`MODULES`;
* ``comments``: terse informal notes, the ``#`` comment blocks of the same files;
* ``code``: the Python source of the same files, docstrings and comments included.

Each register is cut into chunks of about :data:`CHUNK_CHARS` characters at line ends, and the chunks
are interleaved round-robin (pydoc, docstrings, comments, code, pydoc, ...), so any prefix, and so any
number of calibration windows, holds all four in about equal shares (a register with fewer chunks, as
``comments`` has, runs out first: the last rounds hold the other three).

Kept out, because llmspeed evaluates on them: the pydoc ``"eval"`` half, ``LICENSE.txt``
(:func:`~.text.license_text`) and everything under ``idlelib`` (:func:`~.text.news_text`).
:data:`MODULES` are public, hand-picked standard-library modules; none is under ``idlelib``,
``test`` or ``pydoc_data``, and none carries the license text.
"""

from __future__ import annotations

import ast
import io
import os
import sysconfig
import tokenize
from functools import lru_cache

from .text import pydoc_text

# Public standard-library modules (paths relative to the stdlib folder, without ".py").
MODULES = (
    "argparse", "bisect", "calendar", "collections/__init__", "contextlib", "csv", "dataclasses",
    "datetime", "difflib", "enum", "fractions", "functools", "heapq", "inspect", "json/decoder",
    "json/encoder", "logging/__init__", "pathlib", "pprint", "queue", "random", "shlex", "shutil",
    "statistics", "string", "subprocess", "tempfile", "textwrap", "threading", "typing",
    "urllib/parse", "zipfile",
)  # fmt: skip
REGISTERS = ("pydoc", "docstrings", "comments", "code")
CHUNK_CHARS = 2000  # about 500 tokens: several 128-token windows per chunk, every register in a few chunks
REGISTER_CHARS = 64_000  # per register: 4 x 64k characters is about 70k tokens, 4x the default 128 x 128


def _sources() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for name in MODULES:
        path = os.path.join(root, *name.split("/")) + ".py"
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                out.append(f.read())
    if not out:
        raise ValueError(f"no standard-library source found under {root}; pass calibration=... explicitly")
    return out


def docstrings(source: str) -> list[str]:
    """The docstrings of a module's source (module, classes, functions), in source order."""
    tree = ast.parse(source)
    nodes = [tree] + [
        n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    return [d for n in nodes if (d := ast.get_docstring(n, clean=True))]


def comment_blocks(source: str) -> list[str]:
    """Runs of ``#`` comments on consecutive lines, without the ``#``; shebangs and runs of two words or fewer
    dropped."""
    blocks: list[list[str]] = []
    last = -2
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT or tok.string.startswith("#!"):
            continue
        text = tok.string.lstrip("#").strip()
        line = tok.start[0]
        if line != last + 1 or not blocks:
            blocks.append([])
        blocks[-1].append(text)
        last = line
    return [" ".join(b).strip() for b in blocks if len(" ".join(b).split()) > 2]


def _chunks(text: str, limit: int) -> list[str]:
    """``text[:limit]`` cut into pieces of about :data:`CHUNK_CHARS` characters at line ends."""
    text = text[:limit]
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + CHUNK_CHARS)
        end = len(text) if end < 0 else end
        pieces.append(text[start:end].strip("\n"))
        start = end + 1
    return [p for p in pieces if p.strip()]


def pydoc_unseen_train() -> str:
    """The pydoc ``"train"`` half without the paragraphs (blank-line separated) that occur in the ``"eval"`` half."""
    held = " ".join(pydoc_text("eval").split())
    paragraphs = pydoc_text("train").split("\n\n")
    return "\n\n".join(p for p in paragraphs if len(p.strip()) < 40 or " ".join(p.split()) not in held)


@lru_cache(maxsize=1)
def register_texts() -> dict[str, str]:
    """Each register of the mix as one text (the first :data:`REGISTER_CHARS` of it are used)."""
    sources = _sources()
    return {
        "pydoc": pydoc_unseen_train(),
        "docstrings": "\n\n".join(d for s in sources for d in docstrings(s)),
        "comments": "\n".join(c for s in sources for c in comment_blocks(s)),
        "code": "\n\n".join(sources),
    }


@lru_cache(maxsize=1)
def calibration_mix() -> str:
    """The default calibration text: the four registers' chunks interleaved round-robin (see the module docstring)."""
    texts = register_texts()
    chunks = [_chunks(texts[r], REGISTER_CHARS) for r in REGISTERS]
    out: list[str] = []
    for i in range(max(len(c) for c in chunks)):
        out.extend(c[i] for c in chunks if i < len(c))
    return "\n\n".join(out)
