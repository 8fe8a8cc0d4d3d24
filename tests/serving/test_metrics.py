"""``GET /metrics`` as Prometheus reads it (its own text parser): the engine's gauges and counters, prompt tokens,
requests by how they ended, and cumulative histograms of time to first token, time per token and latency that
count every finished request once."""

from __future__ import annotations

import math

import httpx
import pytest

from llmspeed.serving.request_stats import Histogram
from tests.serving.conftest import post_json

parser = pytest.importorskip("prometheus_client.parser")


def _families(url: str) -> dict:
    text = httpx.get(f"{url}/metrics").text
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


def test_metrics_parse_and_count_each_finished_request_once(tiny_server, live_server):
    with live_server(tiny_server) as url:
        for n in (3, 5):
            r = post_json(url, "/v1/completions", {"model": "tiny", "prompt": "abcd", "max_tokens": n, "ignore_eos": True})
            assert r.status_code == 200, r.text
        post_json(url, "/v1/completions", {"model": "tiny", "prompt": "x" * 600, "max_tokens": 2})  # refused: too long
        families = _families(url)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("llmspeed_generation_tokens_total", ())] == 8
    assert samples[("llmspeed_prompt_tokens_total", ())] == 8 + 600  # the refused prompt's tokens count too
    assert samples[("llmspeed_request_finished_total", (("finished_reason", "length"),))] == 2
    assert samples[("llmspeed_request_finished_total", (("finished_reason", "error"),))] == 1
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "time_per_output_token_seconds"):
        family = families[f"llmspeed_{name}"]
        assert family.type == "histogram"
        buckets = [s for s in family.samples if s.name.endswith("_bucket")]
        counts = [s.value for s in buckets]
        assert counts == sorted(counts) and buckets[-1].labels["le"] == "+Inf"  # cumulative, ending at +Inf
        count = next(s.value for s in family.samples if s.name.endswith("_count"))
        assert count == counts[-1] == 2  # the two answered requests; the refused one had no token
        assert next(s.value for s in family.samples if s.name.endswith("_sum")) > 0


def test_a_histogram_counts_a_value_in_the_first_bucket_holding_it():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    lines = h.lines("x")
    assert lines[:3] == ['x_bucket{le="0.1"} 2', 'x_bucket{le="1.0"} 3', 'x_bucket{le="+Inf"} 4']
    assert math.isclose(float(lines[3].split()[1]), 3.65) and lines[4] == "x_count 4"
