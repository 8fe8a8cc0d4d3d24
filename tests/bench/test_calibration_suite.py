"""Calibration suite pieces: which rows it measures, and how it turns perplexities into changes and spread."""

from __future__ import annotations

import llmspeed
from llmspeed.bench import calibration as C


def test_full_run_measures_every_method_the_issue_names():
    rows = C.configurations(quick=False, formats=("int4", "nf4", "int8"))
    assert rows[0] == ("int4", 64, "awq+gptq", "mix", "-")  # the headline first
    have = {(f, g, m) for f, g, m, _, _ in rows}
    for g in (64, 128):
        assert {("int4", g, m) for m in ("rtn", "hqq", "gptq", "awq", "awq+gptq")} <= have
    assert {("nf4", 64, m) for m in ("rtn", "gptq", "awq", "awq+gptq")} <= have
    assert ("fp32", None, "-") in have
    assert set(C.UNSEEN) < set(C.DOMAINS) and "pydoc" not in C.UNSEEN
    assert {("int4", 64, m, "int8 down_proj") for m in ("gptq", "awq+gptq")} <= {(f, g, m, o) for f, g, m, _, o in rows}
    assert {("int4", g, "rtn", "int8 activations") for g in (64, 128)} | {("int4", 64, "awq+gptq", "int8 activations")} <= {
        (f, g, m, o) for f, g, m, _, o in rows}  # fmt: skip
    assert C.EXTRAS["int8 activations"] == {"activations": "int8"}
    # the output head at int8 (and the tied embedding with it), against the default float head
    assert {("int4", 64, "rtn", "fp32 lm_head"), ("int4", 64, "awq+gptq", "fp32 lm_head"), ("int8", None, "rtn", "fp32 lm_head")} <= {
        (f, g, m, o) for f, g, m, _, o in rows}  # fmt: skip
    assert C.settings("int4", "int8 lm_head") == {"lm_head": "int8"} == C.settings("int8", "int8 lm_head")
    assert C.settings("int4", "fp32 lm_head") == {"lm_head": None}  # quantize's default head is int8


def test_the_int8_rows_use_the_documented_layers_and_groups_limit_the_rows():
    assert C.EXTRAS["int8 down_proj"]["int8_layers"] == list(llmspeed.quant.SENSITIVE)
    rows = C.configurations(quick=False, formats=("int4",), groups=(64,))
    assert {g for f, g, *_ in rows if f == "int4"} == {64}
    # regression: groups=(128,) still measured two int4 g64 rows (AWQ+GPTQ with int8 activations / fp32 head)
    assert {g for f, g, *_ in C.configurations(quick=False, formats=("int4",), groups=(128,)) if f == "int4"} == {128}
    assert all(o in C.EXTRAS for *_, o in rows)
    only = C.configurations(quick=False, formats=("int4",), groups=(64,), methods=("gptq",))
    assert {m for _, _, m, _, _ in only} == {"-", "gptq"} and ("fp32", None, "-", "-", "-") in only


def test_changes_and_spread_are_against_the_fp32_row():
    base = dict(format="fp32", group="-", method="-", calibration="-", options="-")
    timing = dict(calib_wall_s=0, calib_cpu_s=0, load_avg=0)
    rows = [
        {**base, "ppl_pydoc": 10.0, "ppl_license": 20.0, "ppl_news": 40.0, **timing},
        {**base, "format": "int4", "group": 64, "method": "rtn", "ppl_pydoc": 11.0, "ppl_license": 25.0,
         "ppl_news": 40.0, **timing},
    ]  # fmt: skip
    out = C._with_changes(rows)
    assert [r["format"] for r in out] == ["fp32", "int4"]
    assert (out[1]["pydoc_vs_fp32"], out[1]["license_vs_fp32"], out[1]["news_vs_fp32"]) == ("+10.0%", "+25.0%", "+0.0%")
    assert out[1]["spread"] == "25.0 pt" and out[0]["spread"] == "0.0 pt"


def test_run_passes_each_rows_calibration_text_and_options_to_quantize(monkeypatch):
    """run() on a tiny model with quantize and perplexity recorded: the ``pydoc`` row calibrates on the pydoc
    ``"train"`` half, the others on the default mix (None), and a row's options reach ``method_options``."""
    from llmspeed.eval import pydoc_text

    calls = []
    monkeypatch.setattr(C, "_load", lambda model, device: llmspeed.models.tiny("llama"))
    monkeypatch.setattr(C, "domain_texts", lambda: {d: d for d in C.DOMAINS})
    monkeypatch.setattr(llmspeed, "quantize", lambda m, fmt, group, **kw: calls.append((fmt, group, kw)) or m)
    monkeypatch.setattr("llmspeed.eval.perplexity", lambda m, text, n_windows: 10.0)
    rows = C.run(quick=False, progress=False, formats=("int4",), groups=(64,), methods=("gptq", "awq+gptq"),
                 options=("-", "damp=0.1"))  # fmt: skip
    by_options = {(kw["calibration"] is not None, kw["method_options"].get("damp")): (fmt, group) for fmt, group, kw in calls}
    assert by_options == {(False, None): ("int4", 64), (True, None): ("int4", 64), (False, 0.1): ("int4", 64)}
    pydoc_calls = [kw for _, _, kw in calls if kw["calibration"] is not None]
    assert len(pydoc_calls) == 1 and pydoc_calls[0]["calibration"] == pydoc_text("train")
    assert all(kw["method_options"]["n_sequences"] == 128 for _, _, kw in calls)
    assert {(r["method"], r["calibration"], r["options"]) for r in rows} == {
        ("-", "-", "-"), ("gptq", "mix", "-"), ("awq+gptq", "mix", "-"), ("gptq", "pydoc", "-"), ("awq+gptq", "mix", "damp=0.1")}
    assert all(r["pydoc_vs_fp32"] == "+0.0%" for r in rows)
