"""Build llmspeed's C++ kernels on first use, cache them on disk, and load only what was built here.

Each kernel source is compiled with ``torch.utils.cpp_extension.load_inline`` into a folder of
``$LLMSPEED_CACHE/kernels`` (else ``~/.cache/llmspeed/kernels``) named by a hash of the source, the
files it includes, the flags, the compiler, torch's and Python's versions and the CPU (model and
instruction-set flags: the code is built with ``-march=native``, so a cache shared with another kind of
CPU must not be reused there). Later processes load the built library in milliseconds.

The cache is trusted only as far as it can be:

* folders are created private (0700) and refused, with a message, when another user owns them or
  can write them (:func:`llmspeed.machine.private_dir`);
* each built library is recorded with the SHA-256 of its bytes and verified before it is loaded; a
  library that does not match (replaced, truncated, corrupted) is never loaded: it is rebuilt;
* a library that fails to load is rebuilt once; if that fails too (or a new build compiles but does not
  load), the caller's pure-torch path runs and one warning says why;
* builders take an OS file lock (released by the kernel if a builder dies), so a build killed
  mid-compile cannot make later processes wait forever on torch's own lock file: its leftover is
  detected and taken over with a message;
* the first build prints one line saying what is compiled and roughly how long it takes;
* a build that fails leaves a note in its folder, so later processes do not spend the compile time failing
  again (a CPU whose compiler rejects ``-fopenmp`` went through that failing build at every start); the
  note's message says how to try again (``python -m llmspeed build`` does).

Threads: the sources split work with ``at::parallel_for``. In a torch build that uses OpenMP, that
function is an inline template around ``#pragma omp parallel``, so an extension compiled without
``-fopenmp`` runs it on **one** thread. Sources are therefore built with ``-fopenmp``; the resulting
library asks for ``libgomp.so.1``, which resolves to the copy torch already loaded, so there is one
OpenMP runtime and one thread pool. Only where the compiler rejects ``-fopenmp`` is the build retried
without it (correct, single-threaded, with a warning).

Without a compiler, without ninja, or with ``LLMSPEED_DISABLE_CPP=1`` (any value but ``0``, ``false``,
``no``, ``off`` or empty), :func:`build` returns the reason instead of a module and callers fall back to
pure-torch paths. ``python -m llmspeed build`` compiles every kernel ahead of time (for container images
and CI).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import warnings
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch

from .machine import UnsafeCacheError, cache_root, cpu_identity, private_dir, switched_off

try:
    import fcntl
except ImportError:  # not on POSIX: no cross-process build lock
    fcntl = None  # type: ignore[assignment]

BASE_FLAGS = ["-O3", "-march=native", "-std=c++17"]
OPENMP_FLAGS = ["-fopenmp"]
DISABLE_ENV = "LLMSPEED_DISABLE_CPP"
RETRY_FAILED = False  # True: build again where an earlier build failed (``python -m llmspeed build`` sets it)
MANIFEST = "llmspeed-manifest.json"  # {"library": file name, "sha256": hex digest of its bytes}
LOCK = "llmspeed-build.lock"  # flock'ed by the process building in the folder
TORCH_LOCK = "lock"  # torch's FileBaton: left behind when a build is killed, it blocks torch forever
FAILED = "llmspeed-build-failed.txt"  # the compiler's error, left by a build that failed (retried on request)
BUILD_SECONDS = "15-60 s"  # what the first build's message announces (2-core CPUs; more cores are faster)


def build_dir() -> Path:
    """Where compiled kernels live: ``$LLMSPEED_CACHE/kernels`` or ``~/.cache/llmspeed/kernels``."""
    return cache_root() / "kernels"


def compiler() -> str | None:
    """Path of the C++ compiler torch would use (``$CXX`` or ``c++``), or ``None``."""
    return shutil.which(os.environ.get("CXX", "c++"))


@lru_cache(maxsize=4)
def _compiler_version(path: str) -> str:
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
        return done.stdout.splitlines()[0] if done.stdout else path
    except (OSError, subprocess.SubprocessError):
        return path


@lru_cache(maxsize=4)
def _compiler_identity(path: str) -> str:
    """The compiler's version line, its real path and, for a small file (a wrapper script that adds flags, as
    ``CXX`` often names), a hash of its text: two compilers that print the same version still key apart."""
    real = os.path.realpath(path)
    try:
        small = os.path.getsize(real) < 65536
        digest = hashlib.sha1(Path(real).read_bytes()).hexdigest()[:12] if small else ""
    except OSError:
        digest = ""
    return f"{_compiler_version(path)}|{real}|{digest}"


def _last_line(err: BaseException) -> str:
    """The compiler's first ``error:`` line if the message has one (ninja's last line only says it stopped)."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    lines = text.splitlines()
    errors = [line.strip() for line in lines if "error:" in line]
    return (errors[0] if errors else lines[-1])[:300]


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _say(message: str) -> None:
    print(f"llmspeed: {message}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def library_path(folder: Path, name: str) -> Path:
    """The shared library torch's build writes for extension ``name`` in ``folder``."""
    return folder / f"{name}.so"


def verify(folder: Path, name: str) -> str | None:
    """``None`` when ``folder`` holds a library recorded by :func:`record` with the same bytes, else why not."""
    lib = library_path(folder, name)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return "not built yet" if not lib.exists() else "no record of the library's hash"
    if not lib.is_file():
        return "the library is missing"
    if not isinstance(manifest, dict) or manifest.get("library") != lib.name:
        return "the record names another library"
    actual = _sha256(lib)
    if actual != manifest.get("sha256"):
        return f"the library's bytes changed since it was built (sha256 {actual[:12]}, recorded {str(manifest.get('sha256'))[:12]})"
    return None


def record(folder: Path, name: str) -> None:
    """Write the manifest: the SHA-256 of the library just built (atomically)."""
    lib = library_path(folder, name)
    tmp = folder / f"{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"library": lib.name, "sha256": _sha256(lib)}))
    os.replace(tmp, folder / MANIFEST)


def load_library(folder: Path, name: str) -> ModuleType:
    """Import the extension module ``name`` from ``folder`` (call :func:`verify` first)."""
    spec = importlib.util.spec_from_file_location(name, library_path(folder, name))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {library_path(folder, name)}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def builder_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold the folder's build lock (an ``flock``: the kernel releases it if this process dies)."""
    if fcntl is None:
        yield
        return
    with open(folder / LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process that is building {what} in {folder}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _clear(folder: Path) -> None:
    """Remove a folder's build products (keeping the lock file this process holds)."""
    for entry in folder.iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _compile(name: str, text: str, functions: list[str], flags: list[str], ldflags: list[str],
             include_dirs: list[str], folder: Path) -> ModuleType:  # fmt: skip
    """Compile and import one extension with torch's ``load_inline`` (the slow step: seconds to a minute)."""
    from torch.utils.cpp_extension import load_inline

    return load_inline(
        name=name, cpp_sources=[text], functions=functions, extra_cflags=flags, extra_ldflags=ldflags,
        extra_include_paths=include_dirs, build_directory=str(folder), verbose=False,
    )  # fmt: skip


def cache_key(text: str, flags: Sequence[str]) -> str:
    """What a built library depends on: sources, flags, compiler (version, path, and a wrapper script's text), torch,
    Python and the CPU it was built for.

    Python's extension suffix (``.cpython-311-x86_64-linux-gnu.so``) names the interpreter the module is
    linked for: another Python version (a second venv, a nox session) cannot load it and would rebuild it
    in place, and each would rebuild after the other.
    """
    cxx = compiler() or ""
    python = sysconfig.get_config_var("EXT_SUFFIX") or sys.implementation.cache_tag
    parts = [text, " ".join(flags), _compiler_identity(cxx) if cxx else "", torch.__version__, python, cpu_identity()]
    return hashlib.sha1("\x00".join(parts).encode()).hexdigest()[:12]


class _LoadFailed(RuntimeError):
    """A library failed to load: a cached one whose rebuild failed too, or a new build that compiled but did not
    import. No other build is tried (the build without ``-fopenmp`` is for a compiler that rejects the flag)."""


_LOAD_NOTE = "the library "  # how the failed-build note of a _LoadFailed begins (a compiler's error line does not)


def _build_one(
    prefix: str, text: str, key_text: str, functions: list[str], flags: list[str], ldflags: list[str],
    include_dirs: list[str], root: Path,
) -> ModuleType:  # fmt: skip
    """Load the verified library for these flags, or (re)build it once: raises when building or loading fails.

    ``text`` is compiled; ``key_text`` (the source and the files it includes) names the folder.
    """
    name = f"{prefix}_{cache_key(key_text, flags)}"
    folder = private_dir(root / name)
    with builder_lock(folder, prefix):
        problem = verify(folder, name)
        if problem is None:
            try:
                return load_library(folder, name)
            except (ImportError, OSError) as err:
                problem = f"it failed to load ({_last_line(err)})"
        failed = folder / FAILED
        # the note outlives only failed builds (a build clears the folder first), even one that left an
        # unrecorded library behind (compiled, then failed to import)
        if problem in ("not built yet", "no record of the library's hash") and failed.exists() and not RETRY_FAILED:
            note = failed.read_text().strip()
            raise (_LoadFailed if note.startswith(_LOAD_NOTE) else RuntimeError)(
                f"an earlier build failed ({note[:300]}); to try again, run `python -m llmspeed build` or delete "
                f"{failed}")  # fmt: skip
        if problem != "not built yet":
            _say(f"rebuilding {prefix} in {folder}: {problem}")
        if (folder / TORCH_LOCK).exists():
            _say(f"taking over the build lock {folder / TORCH_LOCK} left by a build that did not finish")
        _clear(folder)
        _say(f"compiling {prefix} for this CPU, once (about {BUILD_SECONDS}); cached in {folder}")
        start = time.perf_counter()
        try:
            module = _compile(name, text, functions, flags, ldflags, include_dirs, folder)
        except Exception as err:
            if problem.startswith("it failed to load"):
                why = f"{_LOAD_NOTE}{problem.removeprefix('it ')}, and its rebuild failed too: {_last_line(err)}"
            elif isinstance(err, ImportError):  # load_inline imports what it compiled: that failed, not the compiler
                why = f"{_LOAD_NOTE}compiled but failed to load: {_last_line(err)}"
            else:
                failed.write_text(_last_line(err) + "\n")
                raise
            failed.write_text(why + "\n")
            raise _LoadFailed(why) from err
        record(folder, name)
        _say(f"built {prefix} in {time.perf_counter() - start:.0f} s")
        return module


def build(
    prefix: str, source: Path, functions: list[str], includes: Sequence[Path] = ()
) -> tuple[ModuleType | None, str | None]:
    """Load or compile ``source`` exposing ``functions``; return ``(module, None)`` or ``(None, reason)``.

    Args:
        prefix: Start of the extension's name (the folder under :func:`build_dir`).
        source: The C++ file.
        functions: Names of the functions pybind exposes.
        includes: Files ``source`` includes by name: their folders go on the include path and their
            text into the cache key, so changing them rebuilds.

    The cache key also holds ``functions``: an extension built with other bindings is never loaded for
    this list (a process with an older list could otherwise cache a library that lacks a new function).
    """
    setting = os.environ.get(DISABLE_ENV, "")
    if setting.strip() and not switched_off(setting):  # empty or an off value: not disabled
        return None, f"disabled by {DISABLE_ENV}={setting!r}"
    if compiler() is None:
        return None, f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH"
    if shutil.which("ninja") is None:
        return None, "ninja is not installed (pip install ninja)"
    missing = [p.name for p in (source, *includes) if not p.is_file()]
    if missing:
        return None, f"the kernel source {', '.join(missing)} is missing from this installation"
    try:
        root = private_dir(build_dir())
    except (UnsafeCacheError, OSError) as err:
        reason = f"the kernel cache is not safe to use: {err}"
        _warn_once(f"llmspeed: {prefix} is not loaded and the pure-torch path runs: {reason}")
        return None, reason
    text = source.read_text()
    key_text = text + "".join(p.read_text() for p in includes) + "\n// bindings: " + ",".join(functions)
    include_dirs = sorted({str(p.parent) for p in includes})
    errors: list[str] = []
    for extra in (OPENMP_FLAGS, []):  # without -fopenmp only when the build with it fails
        flags = BASE_FLAGS + extra
        try:
            module = _build_one(prefix, text, key_text, functions, flags, list(extra), include_dirs, root)
        except (UnsafeCacheError, OSError) as err:
            errors.append(f"cache: {_last_line(err)}")
            break
        except _LoadFailed as err:  # a library that does not load: the pure-torch path, not a one-thread build
            errors.append(str(err))
            break
        except Exception as err:  # a failed build must leave the pure-torch paths working
            errors.append(f"build {'with' if extra else 'without'} OpenMP failed: {_last_line(err)}")
            continue
        if not extra:
            _warn_once(f"llmspeed: {prefix} was built without OpenMP ({errors[-1]}): it runs on one thread")
        return module, None
    reason = "; ".join(errors)
    _warn_once(f"llmspeed: {prefix} could not be built or loaded, the pure-torch path runs: {reason}")
    return None, reason
