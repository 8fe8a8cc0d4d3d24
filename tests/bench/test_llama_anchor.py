"""The llama.cpp anchor's child processes and GGUF cache, without llama.cpp (a fake module or child)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from llmspeed.bench import llama_anchor


def test_interleaved_llama_child_that_dies_is_a_reported_crash(tmp_path):
    answer = "import sys, json; sys.stdin.readline(); print('[]', flush=True); n = int(sys.stdin.readline()); "
    ok = llama_anchor.LlamaBlocks(tmp_path, [1, 2], 2, True, command=[sys.executable, "-c", answer + "print(json.dumps([1.5] * n), flush=True)"])
    assert ok.block(3) == [1.5, 1.5, 1.5]
    ok.close()
    assert ok.child.returncode == 0
    dies = llama_anchor.LlamaBlocks(tmp_path, [1, 2], 2, True, command=[sys.executable, "-c", answer + "sys.exit(3)"])
    with pytest.raises(RuntimeError, match=r"llama.cpp crashed \(exit 3\) in the interleaved decode steps"):
        dies.block(3)
    dies.close()
    silent = llama_anchor.LlamaBlocks(tmp_path, [1, 2], 2, True, timeout=0.5,
                                    command=[sys.executable, "-c", answer + "import time; time.sleep(30)"])  # fmt: skip
    with pytest.raises(RuntimeError, match="llama.cpp crashed"):
        silent.block(3)  # killed after 0.5 s of silence, not 30 s
    silent.close()


def test_perplexity_scoring_that_crashes_is_retried_without_extra_buffer_types(monkeypatch, tmp_path):
    import subprocess

    calls = []

    def fake_run(cmd, input, **kwargs):  # noqa: A002 - subprocess.run's own argument name
        calls.append(json.loads(input)["plain"])
        if len(calls) == 1:
            return subprocess.CompletedProcess(cmd, -11, "", "")  # the AMX path's SIGSEGV
        return subprocess.CompletedProcess(cmd, 0, "loading\n12.5\n", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    ppl, note = llama_anchor.llama_perplexity_isolated(tmp_path / "x.gguf", torch.zeros(1, 4, dtype=torch.long), 2)
    assert calls == [False, True] and ppl == 12.5
    assert note.startswith("llama.cpp crashed (signal 11) on x.gguf") and "-mno-amx-int8" in note
    monkeypatch.setattr(subprocess, "run", lambda cmd, input, **kw: subprocess.CompletedProcess(cmd, -6, "", ""))
    with pytest.raises(RuntimeError, match=r"crashed \(signal 6\) on x.gguf, without its extra buffer types too"):
        llama_anchor.llama_perplexity_isolated(tmp_path / "x.gguf", torch.zeros(1, 4, dtype=torch.long), 2)


def test_a_failed_requantization_leaves_no_partial_gguf(monkeypatch, tmp_path):
    """Regression: a llama_model_quantize that failed (a non-zero code, or an exception) left its partial output,
    up to the F32 file's 540 MB, in the cache folder for good."""
    from types import SimpleNamespace

    def quantize(source, out, params):
        with open(out, "wb") as f:
            f.write(b"GGUF partial")
        return quantize.code

    quantize.code = 1
    fake = SimpleNamespace(llama_model_quantize_default_params=lambda: SimpleNamespace(), llama_model_quantize=quantize)
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    with pytest.raises(RuntimeError, match="llama_model_quantize to Q4_0 failed with code 1"):
        llama_anchor.requantized("Q4_0", 2, 2, source=tmp_path / "in.gguf", folder=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    quantize.code = 0
    out = llama_anchor.requantized("Q4_0", 2, 2, source=tmp_path / "in.gguf", folder=tmp_path)
    assert out.name.startswith("smollm2-135m-instruct-Q4_0-") and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_a_changed_source_or_llama_cpp_version_is_requantized_again(monkeypatch, tmp_path):
    """Regression: the cached file was named by format alone, so a new source GGUF or llama.cpp version reused
    the file the old one made."""
    from types import SimpleNamespace

    def quantize(source, out, params):
        with open(out, "wb") as f:
            f.write(open(source, "rb").read())
        return 0

    fake = SimpleNamespace(llama_model_quantize_default_params=lambda: SimpleNamespace(), llama_model_quantize=quantize,
                           __version__="0.3.36")  # fmt: skip
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    src = tmp_path / "src" / "in.gguf"
    src.parent.mkdir()
    src.write_bytes(b"GGUF one")
    first = llama_anchor.requantized("Q4_0", 2, 2, source=src, folder=tmp_path)
    assert llama_anchor.requantized("Q4_0", 2, 2, source=src, folder=tmp_path) == first  # built once
    src.write_bytes(b"GGUF two, longer")
    second = llama_anchor.requantized("Q4_0", 2, 2, source=src, folder=tmp_path)
    assert second != first and second.read_bytes() == b"GGUF two, longer"
    fake.__version__ = "0.3.37"
    assert llama_anchor.requantized("Q4_0", 2, 2, source=src, folder=tmp_path) not in (first, second)
