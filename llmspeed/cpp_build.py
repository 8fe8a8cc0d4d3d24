"""Build llmspeed's C++ kernels on first use and cache them on disk.

Each kernel source is compiled with ``torch.utils.cpp_extension.load_inline`` into
``$LLMSPEED_CACHE/kernels`` (else ``~/.cache/llmspeed/kernels``), in a folder whose name carries a
hash of the source, the flags and the torch version: later processes load the built library in
milliseconds and a changed source rebuilds.

Threads: the sources split work with ``at::parallel_for``. In a torch build that uses OpenMP, that
function is an inline template around ``#pragma omp parallel``, so an extension compiled without
``-fopenmp`` runs it on **one** thread. Sources are therefore built with ``-fopenmp``; the
resulting library asks for ``libgomp.so.1``, which resolves to the copy torch already loaded, so
there is one OpenMP runtime and one thread pool. Where the compiler rejects ``-fopenmp`` the build
is retried without it (correct, single-threaded).

Without a compiler, without ninja, or with ``LLMSPEED_DISABLE_CPP=1``, :func:`build` returns the
reason instead of a module and callers fall back to pure-torch paths.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

BASE_FLAGS = ["-O3", "-march=native", "-std=c++17"]
OPENMP_FLAGS = ["-fopenmp"]
DISABLE_ENV = "LLMSPEED_DISABLE_CPP"


def build_dir() -> Path:
    """Where compiled kernels live: ``$LLMSPEED_CACHE/kernels`` or ``~/.cache/llmspeed/kernels``."""
    root = Path(os.environ.get("LLMSPEED_CACHE") or Path.home() / ".cache" / "llmspeed")
    return root / "kernels"


def compiler() -> str | None:
    """Path of the C++ compiler torch would use (``$CXX`` or ``c++``), or ``None``."""
    return shutil.which(os.environ.get("CXX", "c++"))


def _last_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[-1][:200] if text else type(err).__name__


def build(
    prefix: str, source: Path, functions: list[str], includes: Sequence[Path] = ()
) -> tuple[ModuleType | None, str | None]:
    """Compile ``source`` exposing ``functions``; return ``(module, None)`` or ``(None, reason)``.

    Args:
        prefix: Start of the extension's name (the folder under :func:`build_dir`).
        source: The C++ file.
        functions: Names of the functions pybind exposes.
        includes: Files ``source`` includes by name: their folders go on the include path and their
            text into the cache key, so changing them rebuilds.
    """
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None, f"disabled by {DISABLE_ENV}"
    if compiler() is None:
        return None, f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH"
    if shutil.which("ninja") is None:
        return None, "ninja is not installed (pip install ninja)"
    missing = [p.name for p in (source, *includes) if not p.is_file()]
    if missing:
        return None, f"the kernel source {', '.join(missing)} is missing from this installation"
    from torch.utils.cpp_extension import load_inline

    text = source.read_text()
    key = text + "".join(p.read_text() for p in includes)
    error = "no build attempted"
    for extra in (OPENMP_FLAGS, []):
        flags = BASE_FLAGS + extra
        digest = hashlib.sha1((key + " ".join(flags) + torch.__version__).encode()).hexdigest()[:12]
        name = f"{prefix}_{digest}"
        folder = build_dir() / name
        folder.mkdir(parents=True, exist_ok=True)
        try:
            module = load_inline(
                name=name, cpp_sources=[text], functions=functions, extra_cflags=flags,
                extra_ldflags=extra, extra_include_paths=sorted({str(p.parent) for p in includes}),
                build_directory=str(folder), verbose=False,
            )  # fmt: skip
        except Exception as err:  # a failed build must leave the pure-torch paths working
            error = f"build failed: {_last_line(err)}"
            continue
        return module, None
    return None, error
