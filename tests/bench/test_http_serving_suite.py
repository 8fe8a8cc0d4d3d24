"""The HTTP serving suite's tables: summaries over rounds, per-round ratios, and its argument checks."""

from __future__ import annotations

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
    assert commands["llmspeed int8"](8000)[-4:] == ["--quantize", "int8", "--port", "8000"]
    assert commands["transformers"](8001)[-1] == "8001"
    with pytest.raises(ValueError, match="rounds must be a positive integer; got 0"):
        http_serving.run(rounds=0)
    with pytest.raises(ValueError, match="runs SmolLM2 on the CPU only"):
        http_serving.run(device="cuda")
