"""``python -m llmspeed demo`` on a short setting: every step it runs prints a row with its numbers."""

from __future__ import annotations

import argparse
import re

import pytest

from llmspeed import demo


@pytest.mark.slow
def test_demo_prints_a_row_per_step(capsys):
    assert demo.main(["--steps", "fp32,batched", "--windows", "1", "--window", "64", "--new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| fp32") or line.startswith("| generate_batched")]
    assert len(rows) == 2, out
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[3]) > 1 and float(cells[4]) > 0  # perplexity, generated tok/s
    with pytest.raises(SystemExit):
        demo.main(["--steps", "fp32,nope"])
    assert "unknown ['nope']" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--windows", "0"], "argument --windows: must be an integer >= 1; got '0'"),
        (["--window", "1"], "argument --window: must be an integer >= 2; got '1'"),
        (["--new-tokens", "0"], "argument --new-tokens: must be an integer >= 1; got '0'"),
        (["--lora-steps", "x"], "argument --lora-steps: must be an integer >= 1; got 'x'"),
        (["--steps", ","], r"--steps: none given; accepted: \['fp32'"),
    ],
)
def test_bad_numbers_and_empty_steps_are_refused_before_any_model_loads(argv, match, capsys, monkeypatch):
    """Regression: --windows 0, --new-tokens 0 or --lora-steps 0 failed with a traceback from perplexity, generate
    or finetune after the earlier steps had run (minutes); an empty --steps printed an empty table and exited 0."""
    monkeypatch.setattr(demo.models, "smollm2", lambda: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--steps", "fp32,qlora", *argv])
    assert exit_info.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def test_window_beyond_the_models_positions_is_refused_before_any_model_loads(capsys, monkeypatch):
    """Regression: --window 9000 (past SmolLM2's 8192 positions) passed the parser and was refused by perplexity
    only after a model had loaded, and in the qlora step only after the fine-tuning had run."""
    monkeypatch.setattr(demo.models, "smollm2", lambda: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--steps", "qlora,fp32", "--window", "8193"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --window: must be at most 8192" in err and "got '8193'" in err, err


@pytest.mark.parametrize("windows, exact", [(7, True), (1000, False)])
def test_windows_beyond_the_evaluation_text_are_refused_before_any_model_loads(capsys, monkeypatch, windows, exact):
    """Regression: --window 8192 --windows 7 (57,344 tokens; the evaluation text has about 57,000) passed the parser
    and was refused by perplexity only after the first step had run (in qlora, after fine-tuning)."""
    from llmspeed.eval import pydoc_text
    from llmspeed.models.embedded import tokenizer

    tokens = len(tokenizer().encode(pydoc_text("eval"), add_special_tokens=False))
    assert 8192 * 6 <= tokens < 8192 * 7  # the case this test is about: only an exact count can refuse it
    demo._check_text_length(argparse.ArgumentParser(), 8192, 6)  # what the text holds passes
    monkeypatch.setattr(demo.models, "smollm2", lambda: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--steps", "qlora,fp32", "--window", "8192", "--windows", str(windows)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--window 8192 x --windows {windows} needs {8192 * windows} tokens" in err, err
    assert (f"has {tokens}:" if exact else "has at most") in err, err
