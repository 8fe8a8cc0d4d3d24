"""The structured-outputs suite, run for real in its quick form on SmolLM2 (a JSON schema, four requests)."""

from __future__ import annotations

import pytest

pytest.importorskip("xgrammar")


@pytest.mark.slow
def test_quick_run_gives_both_tables_with_valid_outputs(shown_bars):
    from llmspeed.bench import structured

    rows = structured.run(quick=True, progress=True)
    ours = [r for r in rows if r["table"].startswith("structured outputs against")]
    peer = [r for r in rows if r["table"].startswith("against transformers")]
    assert [r["output"] for r in ours] == [r["output"] for r in peer] == ["json schema"]
    for r in ours:
        assert r["valid"] == r["stopped"] == "4/4"  # every constrained output complete and valid
        assert r["constrained / free"] > 0 and r["tokens"] >= 4
    for r in peer:
        assert r["llmspeed tok/s"] > 0 and r["transformers tok/s"] > 0
        assert int(r["same tokens"].split("/")[0]) >= 1  # greedy fp32: padding aside, the same grammar, same tokens
    assert shown_bars[:1] == ["structured outputs"]
