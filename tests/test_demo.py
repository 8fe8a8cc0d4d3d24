"""``python -m llmspeed demo`` on a short setting: every step it runs prints a row with its numbers."""

from __future__ import annotations

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
        assert float(cells[3]) > 1 and float(cells[4]) > 0  # perplexity, decode tok/s
    with pytest.raises(SystemExit):
        demo.main(["--steps", "fp32,nope"])
    assert "unknown ['nope']" in capsys.readouterr().err
