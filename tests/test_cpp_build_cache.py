"""The kernel cache's gate, key and lock, in process and without a compiler run (``_build_one`` is replaced).

The real builds, tampered libraries and dead builders are in ``test_cpp_build.py`` (slow: one real compile).
"""

from __future__ import annotations

import os
import warnings

import pytest

from llmspeed import cpp_build

SOURCE = "int64_t answer() { return 42; }\n"


@pytest.fixture
def gate(monkeypatch, tmp_path) -> dict:
    """``build`` up to its compile step, in process: a private cache, a source, and ``_build_one`` recording its calls."""
    monkeypatch.setenv("LLMSPEED_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(cpp_build.DISABLE_ENV, raising=False)
    monkeypatch.setattr(cpp_build, "compiler", lambda: "/usr/bin/c++")
    monkeypatch.setattr(cpp_build.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(cpp_build, "_WARNED", set())
    source = tmp_path / "answer.cpp"
    source.write_text(SOURCE)
    calls: list[tuple] = []
    real_build_one = cpp_build._build_one
    monkeypatch.setattr(cpp_build, "_build_one", lambda *args: calls.append(args) or "module")
    return {"source": source, "calls": calls, "tmp": tmp_path, "real_build_one": real_build_one}


def _fake_compiles(monkeypatch, gate, fails) -> list:
    """``build`` with its real ``_build_one`` over a fake compile that records its flags (the returned list), writes a
    library and raises as ``load_inline`` does for a library that does not import when ``fails(compiles, flags)``."""
    monkeypatch.setattr(cpp_build, "_build_one", gate["real_build_one"])
    monkeypatch.setattr(cpp_build, "_compiler_identity", lambda path: "fake c++")
    compiles: list = []

    def compile_(name, text, functions, flags, ldflags, include_dirs, folder):
        compiles.append(flags)
        cpp_build.library_path(folder, name).write_bytes(b"a library")
        if fails(len(compiles), flags):
            raise ImportError("undefined symbol: GOMP_parallel")
        return "module"

    monkeypatch.setattr(cpp_build, "_compile", compile_)
    return compiles


def test_the_cache_key_covers_torch_and_the_included_files(monkeypatch, gate):
    key = cpp_build.cache_key(SOURCE, cpp_build.BASE_FLAGS)
    monkeypatch.setattr(cpp_build.torch, "__version__", "0.0.0+another")
    assert cpp_build.cache_key(SOURCE, cpp_build.BASE_FLAGS) != key
    header = gate["tmp"] / "tile.h"
    header.write_text("// v1")
    assert cpp_build.build("llmspeed_test", gate["source"], ["answer"], [header]) == ("module", None)
    header.write_text("// v2")
    cpp_build.build("llmspeed_test", gate["source"], ["answer"], [header])
    first, second = (call[2] for call in gate["calls"])  # key_text: what names the folder
    assert first != second and "// v2" in second


def test_a_cache_folder_of_another_user_is_refused(monkeypatch, gate):
    from llmspeed import machine

    monkeypatch.setattr(machine.os, "getuid", lambda: os.stat(gate["tmp"]).st_uid + 1)
    with pytest.warns(RuntimeWarning, match="pure-torch path runs"):
        module, reason = cpp_build.build("llmspeed_test", gate["source"], ["answer"])
    assert module is None and gate["calls"] == []
    assert "belongs to user id" in reason and "LLMSPEED_CACHE" in reason


def test_a_missing_source_is_named_not_raised(gate):
    module, reason = cpp_build.build("llmspeed_test", gate["tmp"] / "gone.cpp", ["answer"])
    assert module is None and reason == "the kernel source gone.cpp is missing from this installation"


def test_a_build_that_needs_no_openmp_warns_it_runs_on_one_thread(monkeypatch, gate):
    def openmp_rejected(prefix, text, key_text, functions, flags, *rest):
        if "-fopenmp" in flags:
            raise RuntimeError("c++: error: unrecognized command-line option '-fopenmp'")
        return "module"

    monkeypatch.setattr(cpp_build, "_build_one", openmp_rejected)
    with pytest.warns(RuntimeWarning, match="built without OpenMP .*-fopenmp.*: it runs on one thread"):
        assert cpp_build.build("llmspeed_test", gate["source"], ["answer"]) == ("module", None)


def test_a_library_that_fails_to_load_is_rebuilt_once_then_the_pure_torch_path_runs(monkeypatch, gate):
    """Regression (issue #19): when the rebuild of a library that failed to load failed too, a third build
    without -fopenmp ran, and its single-threaded library was used."""
    compiles = _fake_compiles(monkeypatch, gate, lambda n, flags: n > 1 and "-fopenmp" in flags)
    assert cpp_build.build("llmspeed_test", gate["source"], ["answer"]) == ("module", None)  # built and recorded

    def load_library(folder, name):  # the recorded library's bytes check out, but it does not load
        raise ImportError("undefined symbol: GOMP_parallel")

    monkeypatch.setattr(cpp_build, "load_library", load_library)
    with pytest.warns(RuntimeWarning, match="could not be built or loaded, the pure-torch path runs") as caught:
        module, reason = cpp_build.build("llmspeed_test", gate["source"], ["answer"])
    assert module is None and len(compiles) == 2 and all("-fopenmp" in flags for flags in compiles)
    assert reason == ("the library failed to load (undefined symbol: GOMP_parallel), and its rebuild failed too: "
                      "undefined symbol: GOMP_parallel")  # fmt: skip
    assert len(caught) == 1
    with pytest.warns(RuntimeWarning, match="an earlier build failed"):  # a later process: no one-thread build either
        assert cpp_build.build("llmspeed_test", gate["source"], ["answer"])[0] is None
    assert len(compiles) == 2


def test_a_build_that_compiles_but_does_not_import_is_not_compiled_again_by_later_processes(monkeypatch, gate):
    """Regression: the failed-build note was honoured only where no library was left, so a library that compiled
    but failed to import (load_inline imports it) was compiled again at every process start."""
    compiles = _fake_compiles(monkeypatch, gate, lambda n, flags: True)
    with pytest.warns(RuntimeWarning, match="pure-torch path runs"):
        assert cpp_build.build("llmspeed_test", gate["source"], ["answer"])[0] is None
    assert len(compiles) == 1  # a library that does not load: no build without -fopenmp
    with pytest.warns(RuntimeWarning, match="an earlier build failed"):  # a later process: the note, no compile
        module, reason = cpp_build.build("llmspeed_test", gate["source"], ["answer"])
    assert module is None and len(compiles) == 1 and reason.count("an earlier build failed") == 1


def test_a_new_build_that_compiles_but_does_not_load_is_not_replaced_by_a_one_thread_build(monkeypatch, gate):
    """Regression: a first build with -fopenmp that compiled but failed to import (load_inline imports it) was
    taken for a compiler rejecting -fopenmp: a build without it ran and its single-threaded library was used, in
    this process and (past the failed-build note) in every later one. Only a compile error retries without it."""
    compiles = _fake_compiles(monkeypatch, gate, lambda n, flags: "-fopenmp" in flags)
    for _ in range(2):  # this process, then a later one (which finds the note)
        with pytest.warns(RuntimeWarning, match="could not be built or loaded, the pure-torch path runs") as caught:
            module, reason = cpp_build.build("llmspeed_test", gate["source"], ["answer"])
        assert module is None and len(caught) == 1 and len(compiles) == 1 and "-fopenmp" in compiles[0]
        assert "the library compiled but failed to load: undefined symbol: GOMP_parallel" in reason


def test_a_second_builder_waits_for_the_lock_and_clearing_keeps_it(tmp_path, capsys):
    import threading

    fcntl = pytest.importorskip("fcntl")

    entered, release = threading.Event(), threading.Event()

    def first():
        with cpp_build.builder_lock(tmp_path, "first"):
            (tmp_path / "partial.o").write_text("x")
            cpp_build._clear(tmp_path)  # what a rebuild does while holding the lock
            entered.set()
            release.wait(30)

    holder = threading.Thread(target=first)
    holder.start()
    assert entered.wait(30) and not (tmp_path / "partial.o").exists()
    with open(tmp_path / cpp_build.LOCK, "a") as other:  # clearing kept the lock file the first builder holds
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def waiter():
        with cpp_build.builder_lock(tmp_path, "second"):
            pass

    second = threading.Thread(target=waiter)
    second.start()
    second.join(0.5)
    assert second.is_alive()  # waits while the first holds the lock
    release.set()
    holder.join(30)
    second.join(30)
    assert not second.is_alive()
    assert "waiting for another process that is building second" in capsys.readouterr().err


def test_llmspeed_build_retries_failed_builds_and_amx_is_optional(monkeypatch, capsys):
    from llmspeed import prebuild
    from llmspeed.generation import fused_decode
    from llmspeed.quant.kernels import amx, cpp

    monkeypatch.setattr(cpp_build, "RETRY_FAILED", False)
    retried = lambda: None if cpp_build.RETRY_FAILED else "an earlier build failed"  # noqa: E731
    monkeypatch.setattr(cpp, "unavailable", retried)
    monkeypatch.setattr(fused_decode, "unavailable", retried)
    monkeypatch.setattr(amx, "unavailable", lambda: "this CPU has no AMX-BF16")
    assert prebuild.main([]) == 0
    out = capsys.readouterr().out
    assert "quantized matmul (cpp): ready" in out and "fused decode step: ready" in out
    assert "(amx, optional): unavailable: this CPU has no AMX-BF16" in out


def test_the_reason_is_the_compilers_error_line_and_the_warning_comes_once(gate):
    ninja = "FAILED: answer.o\nanswer.cpp:1:1: error: 'this' does not name a type\nninja: build stopped: subcommand failed."
    assert cpp_build._last_line(RuntimeError(ninja)) == "answer.cpp:1:1: error: 'this' does not name a type"
    assert cpp_build._last_line(RuntimeError("x" * 500 + "\nninja: build stopped")) == "ninja: build stopped"
    assert cpp_build._last_line(RuntimeError("a\n" + "y" * 500)) == "y" * 300
    assert cpp_build._last_line(ImportError()) == "ImportError"
    gate["tmp"].joinpath("cache", "kernels").mkdir(parents=True)
    os.chmod(
        gate["tmp"] / "cache" / "kernels", 0o777
    )  # refused: every call returns the reason, one warning per process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            module, reason = cpp_build.build("llmspeed_test", gate["source"], ["answer"])
            assert module is None and "can be written by other users" in reason
    assert [str(w.message).count("pure-torch path runs") for w in caught] == [1]
