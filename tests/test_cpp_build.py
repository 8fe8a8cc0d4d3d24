"""The kernel cache can be trusted: tampered libraries are never loaded, dead builders never block, folders are private.

One real compile of a tiny extension (in a subprocess, into a private cache); every tampering case then
runs in a fresh interpreter against a copy of that cache, with the compile step replaced by a copy of
the pristine library (so a rebuild is observable, and costs no compiler time). Subprocesses also keep a
regression that loads a truncated library (SIGBUS) from killing the test run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from llmspeed import cpp_build

pytestmark = pytest.mark.slow  # one real compile (about a minute on 2 cores) and a fresh interpreter per case

SOURCE = """
#include <torch/extension.h>
int64_t answer() { return 42; }
"""

# Run in a fresh interpreter: build the tiny extension from the cache at $LLMSPEED_CACHE and print the result.
# With FAKE_COMPILE=<pristine .so>, "compiling" copies that library in and counts the call in COMPILES;
# with FAKE_COMPILE=fail, it fails as a compiler error would.
SCRIPT = textwrap.dedent(
    """
    import json, os, shutil, sys, types, warnings
    from pathlib import Path
    from llmspeed import cpp_build

    pristine = os.environ.get("FAKE_COMPILE")
    cpp_build.RETRY_FAILED = os.environ.get("RETRY_FAILED") == "1"
    calls = []
    if pristine == "fail":  # a compiler that fails at once, as the real one does on the broken source (15 s a try)
        def fake(name, text, functions, flags, ldflags, include_dirs, folder):
            calls.append(flags)
            raise RuntimeError("main.cpp:3:1: error: 'this' does not name a type")
        cpp_build._compile = fake
    elif pristine == "real-once":  # the real compiler for the first try, then one that fails at once
        real = cpp_build._compile
        def fake(name, text, functions, flags, ldflags, include_dirs, folder):
            calls.append(flags)
            if len(calls) == 1:
                return real(name, text, functions, flags, ldflags, include_dirs, folder)
            raise RuntimeError("main.cpp:3:1: error: 'this' does not name a type")
        cpp_build._compile = fake
    elif pristine:
        def fake(name, text, functions, flags, ldflags, include_dirs, folder):
            calls.append(flags)
            shutil.copyfile(pristine, cpp_build.library_path(folder, name))
            if name == Path(pristine).stem:
                return cpp_build.load_library(folder, name)
            return types.SimpleNamespace(answer=lambda: 42)  # a build with other flags: another module name
        cpp_build._compile = fake
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        functions = os.environ.get("FUNCTIONS", "answer").split(",")
        module, reason = cpp_build.build("llmspeed_test", Path(sys.argv[1]), functions)
    print(json.dumps({
        "answer": module.answer() if module is not None else None,
        "reason": reason,
        "compiles": calls,
        "warnings": [str(w.message) for w in caught],
    }))
    """
)


def _run(source: Path, cache: Path, fake: Path | str | None = None, timeout: float = 600, umask: int | None = None,
         functions: str = "answer", retry: bool = False) -> dict:  # fmt: skip
    env = {**os.environ, "LLMSPEED_CACHE": str(cache), "FUNCTIONS": functions, "RETRY_FAILED": "1" if retry else ""}
    env.pop("LLMSPEED_DISABLE_CPP", None)
    if fake is not None:
        env["FAKE_COMPILE"] = str(fake)
    script = SCRIPT if umask is None else f"import os; os.umask({umask})\n" + SCRIPT
    done = subprocess.run([sys.executable, "-c", script, str(source)], env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["stderr"] = done.stderr
    return result


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> dict:
    """A real build into a fresh cache created under umask 000: paths, the first run's output, the library."""
    if cpp_build.compiler() is None or shutil.which("ninja") is None:
        pytest.skip("no C++ compiler or ninja here: nothing is ever built, so there is no cache to trust")
    base = tmp_path_factory.mktemp("kernel-cache")
    source = base / "answer.cpp"
    source.write_text(SOURCE)
    cache = base / "cache"
    first = _run(source, cache, umask=0)
    (folder,) = (cache / "kernels").iterdir()
    lib = next(folder.glob("*.so"))
    pristine = base / lib.name
    shutil.copyfile(lib, pristine)
    return {"source": source, "cache": cache, "folder": folder, "lib": lib, "pristine": pristine, "first": first}


@pytest.fixture
def cache_copy(built, tmp_path) -> dict:
    """A private copy of the built cache for one test to tamper with."""
    cache = tmp_path / "cache"
    shutil.copytree(built["cache"], cache)
    folder = cache / "kernels" / built["folder"].name
    return {**built, "cache": cache, "folder": folder, "lib": folder / built["lib"].name}


def test_first_build_says_what_it_compiles_and_creates_private_folders(built):
    first = built["first"]
    assert first["answer"] == 42 and first["reason"] is None
    assert "compiling llmspeed_test for this CPU, once (about" in first["stderr"]
    for folder in (built["cache"], built["cache"] / "kernels", built["folder"]):  # made under umask 000
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    manifest = json.loads((built["folder"] / cpp_build.MANIFEST).read_text())
    assert manifest["library"] == built["lib"].name
    assert manifest["sha256"] == cpp_build._sha256(built["lib"])


def test_a_verified_library_loads_without_compiling(cache_copy):
    result = _run(cache_copy["source"], cache_copy["cache"], fake=cache_copy["pristine"])
    assert result["answer"] == 42 and result["compiles"] == []
    assert "compiling" not in result["stderr"]


@pytest.mark.parametrize(
    "tamper",
    ["replaced", "truncated", "corrupt", "unrecorded"],
)
def test_a_tampered_library_is_rebuilt_not_loaded(cache_copy, tamper):
    lib = cache_copy["lib"]
    data = lib.read_bytes()
    if tamper == "replaced":  # another valid-looking library: the original plus a payload
        lib.write_bytes(data + b"\x00payload")
    elif tamper == "truncated":  # loading this one would die with SIGBUS
        lib.write_bytes(data[: len(data) // 3])
    elif tamper == "corrupt":  # same size, garbage inside: used to fall back to a single-threaded build
        lib.write_bytes(data[:64] + bytes(len(data) - 64))
    else:  # no hash on record (a cache written by an older llmspeed, or a half-finished build)
        (cache_copy["folder"] / cpp_build.MANIFEST).unlink()
    result = _run(cache_copy["source"], cache_copy["cache"], fake=cache_copy["pristine"])
    assert result["answer"] == 42, result
    assert len(result["compiles"]) == 1 and "-fopenmp" in result["compiles"][0]  # rebuilt once, with OpenMP
    assert f"rebuilding llmspeed_test in {cache_copy['folder']}" in result["stderr"]
    assert lib.read_bytes() == cache_copy["pristine"].read_bytes()
    assert cpp_build.verify(cache_copy["folder"], lib.stem) is None


def test_a_recorded_library_that_fails_to_load_is_rebuilt_once(cache_copy):
    lib = cache_copy["lib"]
    lib.write_bytes(b"not an ELF file at all")
    cpp_build.record(cache_copy["folder"], lib.stem)  # its hash matches: only loading can tell
    result = _run(cache_copy["source"], cache_copy["cache"], fake=cache_copy["pristine"])
    assert result["answer"] == 42 and len(result["compiles"]) == 1
    assert "failed to load" in result["stderr"]


def test_a_build_killed_mid_compile_does_not_block_later_processes(cache_copy):
    folder = cache_copy["folder"]
    (folder / cpp_build.MANIFEST).unlink()
    holder = textwrap.dedent(
        f"""
        import fcntl, time
        handle = open({str(folder / cpp_build.LOCK)!r}, "a")
        fcntl.flock(handle, fcntl.LOCK_EX)
        open({str(folder / cpp_build.TORCH_LOCK)!r}, "w").close()  # torch's baton, as a build in progress leaves it
        print("locked", flush=True)
        time.sleep(600)
        """
    )
    builder = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert builder.stdout is not None and builder.stdout.readline().strip() == "locked"
        os.kill(builder.pid, signal.SIGKILL)  # dies holding both locks
        builder.wait(timeout=30)
        start = time.monotonic()
        result = _run(cache_copy["source"], cache_copy["cache"], fake=cache_copy["pristine"], timeout=120)
    finally:
        if builder.poll() is None:
            builder.kill()
    assert result["answer"] == 42 and time.monotonic() - start < 120
    assert "taking over the build lock" in result["stderr"]
    assert not (folder / cpp_build.TORCH_LOCK).exists()


def test_a_cache_other_users_can_write_is_refused(cache_copy):
    root = cache_copy["cache"] / "kernels"
    os.chmod(root, 0o777)
    result = _run(cache_copy["source"], cache_copy["cache"], fake=cache_copy["pristine"])
    assert result["answer"] is None and result["compiles"] == []
    assert "can be written by other users" in result["reason"] and "chmod 700" in result["reason"]
    assert any("pure-torch path runs" in w for w in result["warnings"])


def test_a_failed_build_warns_once_and_leaves_the_pure_torch_path(cache_copy, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++")
    # the real compiler with -fopenmp (its error parsed from ninja's output), then a quick failure without it
    result = _run(broken, cache_copy["cache"], fake="real-once")
    assert len(result["compiles"]) == 2 and "-fopenmp" in result["compiles"][0]
    assert result["answer"] is None and "build with OpenMP failed" in result["reason"]
    assert "error:" in result["reason"].split("build without OpenMP failed")[0], result["reason"]
    assert sum("could not be built or loaded" in w for w in result["warnings"]) == 1
    # regression: every later process compiled the failing source again (the compile time at each start)
    again = _run(broken, cache_copy["cache"])
    assert again["answer"] is None and again["reason"].count("an earlier build failed") == 2
    assert "python -m llmspeed build" in again["reason"] and "compiling" not in again["stderr"]
    # what `python -m llmspeed build` does: try again (a compiler that fails at once: the real one was run above)
    retried = _run(broken, cache_copy["cache"], fake="fail", retry=True)
    assert len(retried["compiles"]) == 2  # with and without OpenMP, both tried again
    assert "an earlier build failed" not in retried["reason"] and "build with OpenMP failed" in retried["reason"]
    assert "does not name a type" in retried["reason"]


def test_a_library_built_with_other_bindings_is_not_loaded(cache_copy):
    """Regression: a process with an older function list cached a library under the new source's key, and
    the next process, asking for a new binding, loaded it and failed with AttributeError."""
    same = _run(cache_copy["source"], cache_copy["cache"], fake=cache_copy["pristine"])
    assert same["compiles"] == [] and same["answer"] == 42
    more = _run(cache_copy["source"], cache_copy["cache"], fake=cache_copy["pristine"], functions="answer,other")
    assert len(more["compiles"]) == 1  # another key: built, not loaded from the "answer"-only folder
    assert len(list((cache_copy["cache"] / "kernels").iterdir())) == 2


def test_the_cache_key_covers_the_cpu_and_the_flags(monkeypatch):
    key = cpp_build.cache_key(SOURCE, cpp_build.BASE_FLAGS)
    assert cpp_build.cache_key(SOURCE, cpp_build.BASE_FLAGS) == key
    assert cpp_build.cache_key(SOURCE, cpp_build.BASE_FLAGS + ["-fopenmp"]) != key
    monkeypatch.setattr(cpp_build, "cpu_identity", lambda: "x86_64|another CPU|isa:avx2-only")
    assert cpp_build.cache_key(SOURCE, cpp_build.BASE_FLAGS) != key  # an AVX512 build is never reused on AVX2


def test_the_cache_key_covers_the_python_version(monkeypatch):
    """Regression: the key left Python out, so two interpreters with the same torch version (two venvs, nox
    sessions) shared a folder: each failed to load the other's module and rebuilt it, about 40 s, every switch."""
    import sysconfig

    key = cpp_build.cache_key(SOURCE, cpp_build.BASE_FLAGS)
    real = sysconfig.get_config_var
    other = ".cpython-399-x86_64-linux-gnu.so"
    monkeypatch.setattr(sysconfig, "get_config_var", lambda name: other if name == "EXT_SUFFIX" else real(name))
    assert cpp_build.cache_key(SOURCE, cpp_build.BASE_FLAGS) != key


def test_the_cache_key_tells_a_compiler_wrapper_from_the_compiler(monkeypatch, tmp_path):
    """Regression: the key held the compiler's version line only, so ``CXX`` naming a wrapper script that adds flags
    (an AVX2-only build, say) shared its libraries with the plain compiler, which prints the same version."""
    import shutil

    real = shutil.which("c++") or shutil.which("g++")
    if real is None:
        pytest.skip("no C++ compiler on PATH")
    monkeypatch.setenv("CXX", real)
    key = cpp_build.cache_key(SOURCE, cpp_build.BASE_FLAGS)
    wrapper = tmp_path / "cxx-avx2"
    wrapper.write_text(f'#!/bin/sh\nexec {real} -mno-avx512f "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CXX", str(wrapper))
    assert cpp_build._compiler_version(str(wrapper)) == cpp_build._compiler_version(real)  # same version line
    wrapped = cpp_build.cache_key(SOURCE, cpp_build.BASE_FLAGS)
    assert wrapped != key
    wrapper.write_text(f'#!/bin/sh\nexec {real} -mno-avx2 "$@"\n')  # the wrapper's flags changed
    cpp_build._compiler_identity.cache_clear()
    assert cpp_build.cache_key(SOURCE, cpp_build.BASE_FLAGS) not in (key, wrapped)


def test_llmspeed_build_compiles_ahead_of_time(tmp_path):
    # with the C++ kernels disabled the command still runs, reports why, and fails
    env = {**os.environ, "LLMSPEED_CACHE": str(tmp_path), "LLMSPEED_DISABLE_CPP": "1"}
    done = subprocess.run([sys.executable, "-m", "llmspeed", "build"], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 1
    assert "quantized matmul (cpp): unavailable: disabled by LLMSPEED_DISABLE_CPP" in done.stdout
    assert "fused decode step: unavailable" in done.stdout
    assert "(amx, optional): unavailable: disabled by LLMSPEED_DISABLE_CPP" in done.stdout


def test_a_file_where_a_cache_folder_should_be_is_named(tmp_path):
    """Regression: with a file in the cache path (``LLMSPEED_CACHE=~/notes.txt/llmspeed``) creating the folders
    failed with a bare ``NotADirectoryError``; it is the cache's own clear error, naming the file."""
    from llmspeed.machine import UnsafeCacheError, private_dir

    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder")
    with pytest.raises(UnsafeCacheError, match=r"notes.txt is a file, not a folder; set LLMSPEED_CACHE"):
        private_dir(blocker / "llmspeed" / "kernels")
    assert blocker.read_text() == "not a folder"
    with pytest.raises(UnsafeCacheError, match="is not a folder"):
        private_dir(blocker)  # the path itself a file: refused as before


@pytest.mark.parametrize("below", ["", "llmspeed/kernels"])
def test_a_dangling_symlink_in_the_cache_path_is_named(tmp_path, below):
    """Regression: a symbolic link to nothing at the cache path made mkdir skip it as existing, then chmod
    followed it and failed with a bare ``FileNotFoundError``."""
    from llmspeed.machine import UnsafeCacheError, private_dir

    link = tmp_path / "cache"
    link.symlink_to(tmp_path / "gone" / "cache")
    with pytest.raises(UnsafeCacheError, match=rf"{link} is a symbolic link to {tmp_path / 'gone' / 'cache'}, which "
                                               r"does not exist; remove the link"):  # fmt: skip
        private_dir(link / below)
    assert link.is_symlink() and not (tmp_path / "gone").exists()
    (tmp_path / "gone" / "cache").mkdir(parents=True, mode=0o700)  # a link to a folder of one's own: followed
    os.chmod(tmp_path / "gone" / "cache", 0o700)
    assert private_dir(link / below) == link / below and (tmp_path / "gone" / "cache" / below).is_dir()


@pytest.mark.parametrize("setting", ["", "0", "false", "No", " off "])
def test_the_disable_variable_set_to_an_off_value_does_not_disable(monkeypatch, tmp_path, setting):
    """Regression: any value but "" and "0" disabled the C++ kernels, so ``LLMSPEED_DISABLE_CPP=false`` (or
    ``no``, ``off``: what ``LLMSPEED_AUTOTUNE`` reads as off) silently ran the pure-torch paths."""
    if cpp_build.compiler() is None or shutil.which("ninja") is None:
        pytest.skip("no C++ compiler or ninja here: nothing is built whatever the variable says")
    source = tmp_path / "answer.cpp"
    source.write_text(SOURCE)
    built = object()
    monkeypatch.setenv("LLMSPEED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpp_build, "_build_one", lambda *args: built)  # no compiler run: only the gate is tested
    monkeypatch.setenv(cpp_build.DISABLE_ENV, setting)
    assert cpp_build.build("llmspeed_test", source, ["answer"]) == (built, None)
    monkeypatch.setenv(cpp_build.DISABLE_ENV, "yes")
    assert cpp_build.build("llmspeed_test", source, ["answer"]) == (None, "disabled by LLMSPEED_DISABLE_CPP='yes'")


def test_a_cache_variable_starting_with_a_tilde_is_under_the_home_folder(monkeypatch, tmp_path):
    """Regression: ``LLMSPEED_CACHE="~/llm"`` set where no shell expands it (a ``.env`` file, a quoted value)
    made a folder literally named ``~`` in the working directory: another cache, rebuilt, per directory."""
    from llmspeed.machine import cache_root
    from llmspeed.models.embedded import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMSPEED_CACHE", "~/llm")
    assert cache_root() == cache_dir() == tmp_path / "home" / "llm"
    assert cpp_build.build_dir() == tmp_path / "home" / "llm" / "kernels"
