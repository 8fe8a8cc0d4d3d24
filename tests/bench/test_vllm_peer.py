"""The batching suite's vLLM peer (issue #22) without a GPU: a stand-in ``vllm`` package in the child process checks
the plumbing (checkpoint folder, token-id prompts, greedy ``ignore_eos`` parameters, timings, errors, rows)."""

from __future__ import annotations

import os
import textwrap

import pytest

import llmspeed
from llmspeed.bench import batching as suite
from llmspeed.bench import vllm_peer

FAKE = '''
import json, os
__version__ = "0.0-stand-in"
MODE = os.environ.get("FAKE_VLLM_MODE", "ok")

class SamplingParams:
    def __init__(self, temperature, max_tokens, ignore_eos, detokenize):
        assert temperature == 0.0 and ignore_eos and not detokenize
        self.max_tokens = max_tokens

class _Out:
    def __init__(self, ids):
        self.token_ids = ids

class _Request:
    def __init__(self, ids):
        self.outputs = [_Out(ids)]

class LLM:
    def __init__(self, model, dtype, skip_tokenizer_init, seed, gpu_memory_utilization, max_num_seqs,
                 enable_prefix_caching=None):
        assert skip_tokenizer_init and dtype == "bfloat16"
        # on by default in vLLM: the timed run would find the warm-up's prompts cached
        assert enable_prefix_caching is False, "the timed run must compute every prompt token, as llmspeed's"
        with open(os.path.join(model, "config.json")) as f:
            assert json.load(f)["model_type"] == "llama"
        if MODE == "crash":
            raise RuntimeError("CUDA out of memory (stand-in)")
        if MODE == "engine":  # vLLM's engine core logs why it failed (on stdout); the LLM then raises this
            print("(EngineCore pid=7) ERROR 12-06 [core.py:1] ValueError: No available memory for the cache blocks. "
                  "Try increasing `gpu_memory_utilization`.")
            raise RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {}")
        if MODE == "chatty":  # vLLM logs to stdout (VLLM_LOGGING_STREAM), at its shutdown too
            import atexit
            print("INFO 12-06 llm_engine.py:1] loading (stand-in)")
            atexit.register(print, "INFO 12-06 core.py:1] shutting down the engine core (stand-in)")
        if MODE == "hang":  # its engine core runs in a process of its own, as vLLM's V1 engine does
            import subprocess, sys
            core = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            with open(os.environ["FAKE_VLLM_PIDFILE"], "w") as f:
                f.write(str(core.pid))

    def generate(self, prompts, params, use_tqdm=True):
        if MODE == "hang":
            import time
            time.sleep(120)
        params = params if isinstance(params, list) else [params] * len(prompts)
        assert all(isinstance(p["prompt_token_ids"], list) for p in prompts)
        short = 1 if MODE == "short" else 0
        return [_Request([7] * max(p.max_tokens - short, 0)) for p in params]
'''


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    (tmp_path / "site" / "vllm").mkdir(parents=True)
    (tmp_path / "site" / "vllm" / "__init__.py").write_text(textwrap.dedent(FAKE))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(vllm_peer, "unavailable", lambda: None)
    return tmp_path


def test_vllm_runs_the_workload_from_a_checkpoint_folder_in_a_child(stand_in):
    model = llmspeed.models.tiny("llama", seed=0)
    peer = vllm_peer.measure(model, [[1, 2, 3], [4, 5]], [3, 5], context=8, steps=2, workdir=str(stand_in))
    assert peer["version"] == "0.0-stand-in" and peer["seconds"] > 0 and isinstance(peer["decode_step"], float)
    assert list(stand_in.glob("tmp*")) == []  # the checkpoint folder is removed


@pytest.mark.parametrize("mode, error", [("crash", r"vLLM's run failed \(exit 1\): .*CUDA out of memory"),
                                         ("short", r"vLLM's run failed .*returned 6 tokens where 8 were asked for"),
                                         ("engine", r"vLLM's run failed \(exit 1\): ValueError: No available memory "
                                                    r"for the cache blocks.* See root cause above")])
def test_a_vllm_run_that_fails_becomes_a_reason(stand_in, monkeypatch, mode, error):
    monkeypatch.setenv("FAKE_VLLM_MODE", mode)
    peer = vllm_peer.measure(llmspeed.models.tiny("llama", seed=0), [[1, 2, 3], [4, 5]], [3, 5], context=8, steps=2)
    assert set(peer) == {"error"}
    assert __import__("re").search(error, peer["error"]), peer["error"]


def test_rows_say_how_llmspeed_compares_or_why_vllm_did_not_run():
    rows = [{"system": "llmspeed Generator", "tok_s": 300.0}]
    row = suite.vllm_row({"seconds": 2.0, "decode_step": 0.001, "version": "1.2"}, rows, "bf16", 4, 400, 100.0)
    assert row["system"] == suite.VLLM and row["tok_s"] == 200.0 and row["vs_generate_batch"] == 2.0
    assert row["note"] == "vLLM 1.2; llmspeed Generator at 1.50x of it"
    skipped = suite.vllm_row({"error": "vllm is not installed in this environment"}, rows, "bf16", 4, 400, 100.0)
    assert skipped["tok_s"] == skipped["seconds"] == "" and skipped["note"].startswith("not measured: vllm is not")


def test_without_vllm_or_a_gpu_the_reason_is_given():
    import importlib.util

    import torch

    here = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    assert (vllm_peer.unavailable() is None) == here
    if not here:
        assert vllm_peer.measure(None, [], []) == {"error": vllm_peer.unavailable()}


def test_log_lines_vllm_prints_on_stdout_after_the_result_are_passed_over(stand_in, monkeypatch):
    """Regression: the parent read the child's last stdout line as the JSON result, but vLLM logs to stdout (its
    shutdown too), so a run that worked raised a JSONDecodeError that ended the whole suite."""
    monkeypatch.setenv("FAKE_VLLM_MODE", "chatty")
    peer = vllm_peer.measure(llmspeed.models.tiny("llama", seed=0), [[1, 2, 3], [4, 5]], [3, 5], context=8, steps=2)
    assert peer["version"] == "0.0-stand-in" and peer["seconds"] > 0, peer


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed and not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_vllm_run_past_the_timeout_ends_with_the_processes_it_started(stand_in, monkeypatch):
    """Regression: a timeout killed the child alone, and the processes vLLM starts (its engine core) lived on,
    holding the GPU's memory while the suite went on."""
    import signal
    import time

    pidfile = stand_in / "core.pid"
    monkeypatch.setenv("FAKE_VLLM_MODE", "hang")
    monkeypatch.setenv("FAKE_VLLM_PIDFILE", str(pidfile))
    peer = vllm_peer.measure(llmspeed.models.tiny("llama", seed=0), [[1, 2, 3]], [3], context=8, steps=2, timeout=8)
    assert peer == {"error": "vLLM did not finish within 8 s"}
    core = int(pidfile.read_text())
    try:
        deadline = time.monotonic() + 5
        while _alive(core) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(core)
    finally:
        if _alive(core):
            os.kill(core, signal.SIGKILL)
