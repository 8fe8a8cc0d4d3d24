"""Shared fixtures: tiny random models per architecture, the embedded SmolLM2, a fresh-interpreter runner, and the ``gpu`` marker."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import llmspeed

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
# kernel="auto" follows the rule table unless a test turns timing on (tests/quant/test_autotune.py):
# timings on a shared machine would make which (correct) kernel runs differ from run to run.
os.environ.setdefault("LLMSPEED_AUTOTUNE", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: on a shared 2-core machine, OpenMP barriers cost more than tiny ops."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def run_script():
    """``run(script) -> stdout`` of ``script`` in a fresh interpreter (e.g. Triton's, set before any kernel compiles); fails on a non-zero exit."""

    def run(script: str) -> str:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    return run


@pytest.fixture(params=sorted(llmspeed.models.ARCHITECTURES))
def tiny_model(request):
    """A fresh tiny random model of each supported architecture (fp32, seed 0)."""
    return llmspeed.models.tiny(request.param, seed=0)


@pytest.fixture
def llama():
    """A fresh tiny random Llama (fp32, seed 0)."""
    return llmspeed.models.tiny("llama", seed=0)


@pytest.fixture(scope="session")
def smollm2_cached():
    """SmolLM2 loaded once per session. Do not modify it: use ``smollm2`` for a fresh copy."""
    return llmspeed.models.smollm2()


@pytest.fixture
def smollm2(smollm2_cached):
    """A fresh SmolLM2 (loads from the safetensors cache in well under a second)."""
    return llmspeed.models.smollm2()
