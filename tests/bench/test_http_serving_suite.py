"""The HTTP serving suite's tables: summaries over rounds, per-round ratios, and its argument checks."""

from __future__ import annotations

import json

import pytest

from llmspeed.bench import http_serving


def _row(server, rate, req_s, sustained=True, round_=None):
    row = {"table": "http load", "server": server, "offered_req_s": rate, "completed_req_s": req_s,
           "sustained": sustained}
    if round_ is not None:
        row["round"] = round_
    return row


def test_round_ratios_compare_each_server_with_the_first_in_the_same_round():
    rows = [_row("llmspeed", 4, 2.0, round_=1), _row("llmspeed int8", 4, 2.6, round_=1),
            _row("llmspeed", 4, 1.0, round_=2), _row("llmspeed int8", 4, 1.2, round_=2),
            _row("llmspeed", 4, 4.0, round_=3), _row("llmspeed int8", 4, 4.8, round_=3)]  # fmt: skip
    (out,) = http_serving._round_ratios(rows, ("llmspeed", "llmspeed int8"), (4,), 3)
    assert out["server"] == "llmspeed int8" and out["rounds"] == 3
    assert (out["min"], out["median"], out["max"]) == (1.2, 1.2, 1.3)  # the host's drift (4x) cancels
    assert out["each round"] == "1.30 1.20 1.20"


def test_a_rate_is_sustained_only_if_every_round_sustained_it():
    rows = [_row("llmspeed", 2, 1.9, True, 1), _row("llmspeed", 2, 1.9, True, 2),
            _row("llmspeed", 4, 2.5, True, 1), _row("llmspeed", 4, 2.5, False, 2),
            _row("transformers", 2, 0.5, False, 1), _row("transformers", 1, 0.9, True, 1)]  # fmt: skip
    summary = {r["server"]: r for r in http_serving._summary(rows, ("transformers", "llmspeed"), (1, 2, 4))}
    assert summary["llmspeed"]["highest_rate_with_p99_ttft_under_2s"] == 2
    assert summary["llmspeed"]["vs_transformers_serve"] == 2.0


def test_every_server_has_a_command_and_bad_arguments_are_named(tmp_path):
    commands = http_serving._commands(tmp_path)
    assert commands["llmspeed int8"](8000)[-4:] == ["--quantize", "int8", "--port", "8000"]  # the head at int8 too
    assert commands["llmspeed int8 float head"](8000)[-5:-2] == ["--quantize", "int8", "--no-quantize-lm-head"]
    assert commands["transformers"](8001)[-1] == "8001"
    with pytest.raises(ValueError, match="rounds must be a positive integer; got 0"):
        http_serving.run(rounds=0)
    with pytest.raises(ValueError, match="runs SmolLM2 on the CPU only"):
        http_serving.run(device="cuda")


def test_bad_arguments_are_refused_before_the_model_is_exported(monkeypatch):
    """Regression: an unknown server was named only after SmolLM2 was written to a temporary folder (540 MB, left
    there); requests=0 and rates=() silently ran the defaults, a rate of 0 or below died in the arrivals."""
    exported = []
    monkeypatch.setattr(http_serving, "_export_smollm2", exported.append)
    with pytest.raises(ValueError, match=r"unknown servers \['vllm'\]; known: \['transformers', 'llmspeed'"):
        http_serving.run(servers=("transformers", "vllm"))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"requests must be an int of at least 1 .*; got {bad}"):
            http_serving.run(requests=bad)
    for bad in ((), (1.0, 0.0), (-1.0,), ("2",)):
        with pytest.raises(ValueError, match=r"rates must be positive numbers \(requests per second\) or None; got "):
            http_serving.run(rates=bad)
    with pytest.raises(ValueError, match="rounds must be a positive integer; got True"):
        http_serving.run(rounds=True)
    assert exported == []


def test_the_exported_model_folder_is_removed_after_the_run(monkeypatch):
    """Regression: every run left its export of SmolLM2 (540 MB of fp32 weights) in a temporary folder."""
    from contextlib import contextmanager

    import transformers

    folders = []

    def export(folder):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"weights")
        folders.append(folder)

    @contextmanager
    def server(command, port, log):
        log.write_text("started")
        yield f"http://127.0.0.1:{port}"

    async def drive(url, model, prompts, lengths, times):
        return [{"ttft": 0.1, "itl": [0.01], "chunks": 2, "end": 1.0} for _ in prompts], 0.0

    tokenizer = type("Tok", (), {"decode": lambda self, ids: "text", "encode": lambda self, text: list(range(400))})()
    monkeypatch.setattr(http_serving, "_export_smollm2", export)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda folder: tokenizer)
    monkeypatch.setattr(http_serving, "server_process", server)
    monkeypatch.setattr(http_serving, "_drive", drive)
    rows = http_serving.run(quick=True, servers=("llmspeed",), rates=(1.0,), requests=2)
    assert [r["table"] for r in rows] == ["http load", "http load, summary"] and rows[0]["requests"] == 2
    assert len(folders) == 1 and not folders[0].exists() and not folders[0].parent.exists()


class _FakeStream:
    """What ``httpx.AsyncClient.stream`` yields: a status and the response's lines."""

    def __init__(self, lines, status=200):
        self.lines, self.status_code = lines, status

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False

    async def aiter_lines(self):
        for line in self.lines:
            yield line


class _FakeClient:
    def __init__(self, lines, status=200):
        self.lines, self.status = lines, status

    def stream(self, *args, **kwargs):
        return _FakeStream(self.lines, self.status)


def _chunk(text):
    return "data: " + json.dumps({"choices": [{"delta": {"content": text}}]})


def test_a_complete_empty_answer_is_not_an_error_and_errors_are_named():
    """A stream that ends with ``[DONE]`` but no text (the first token ended the answer) completed; a stream cut
    short, an HTTP error and an exception are errors, each counted by kind in its row."""
    import asyncio

    def one(lines, status=200):
        return asyncio.run(http_serving._one(_FakeClient(lines, status), "u", "m", "p", 4, 0.0))

    full, empty = one([_chunk("a"), _chunk("b"), "data: [DONE]"]), one(['data: {"choices": []}', "data: [DONE]"])
    cut, refused = one([_chunk("a")]), one([], status=503)
    assert full["chunks"] == 2 and "error" not in full and "ttft" in full
    assert empty["chunks"] == 0 and "error" not in empty and "ttft" not in empty
    assert cut == {"error": "stream ended without data: [DONE]"} and refused == {"error": "HTTP 503"}
    row = http_serving._row("llmspeed", 4, [full, empty, cut, refused, refused], 0.0)
    assert (row["requests"], row["errors"], row["empty_answers"]) == (5, 3, 1) and not row["sustained"]
    assert row["error_kinds"] == "HTTP 503 x2; stream ended without data: [DONE] x1"


def test_progress_false_shows_no_bar_and_true_a_bar_over_the_measurements(monkeypatch, shown_bars, capsys):
    """Regression: run() took ``progress`` and ignored it: writing the model for the servers showed transformers'
    "Writing model shards" bar under --no-progress (and by default: progress=False), and progress=True showed
    no bar over the measurements."""
    from contextlib import contextmanager

    import llmspeed
    from llmspeed.models.embedded import tokenizer

    tok = tokenizer()  # the real export, of a tiny model under the embedded tokenizer
    monkeypatch.setattr(llmspeed.models, "smollm2", lambda: llmspeed.Model(
        llmspeed.models.tiny("llama", vocab_size=len(tok)).hf, tok))  # fmt: skip

    @contextmanager
    def server(command, port, log):
        yield f"http://127.0.0.1:{port}"

    async def drive(url, model, prompts, lengths, times):
        return [{"ttft": 0.1, "itl": [0.01], "chunks": 2, "end": 1.0} for _ in prompts], 0.0

    monkeypatch.setattr(http_serving, "server_process", server)
    monkeypatch.setattr(http_serving, "_drive", drive)
    args = dict(quick=True, servers=("llmspeed", "llmspeed int8"), rates=(1.0, 2.0), requests=2)
    assert len(http_serving.run(**args)) == 6  # 2 servers x 2 rates, then a summary row per server
    assert shown_bars == []
    capsys.readouterr()
    http_serving.run(**args, progress=True, rounds=2)
    assert shown_bars == ["Writing model shards", "http_serving"]
    assert "http_serving: 100%|██████████| 8/8" in capsys.readouterr().err  # 2 servers x 2 rates x 2 rounds
