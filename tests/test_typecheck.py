"""mypy over the package reports no errors (the ``typecheck`` nox session's check, run by ``nox -s tests`` too)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent  # the repository root: pyproject.toml's [tool.mypy] and llmspeed/

# a cold run (the fresh cache dir below) takes about 30 s on 2 cores
pytestmark = pytest.mark.slow


def test_mypy_reports_no_errors(tmp_path, monkeypatch):
    pytest.importorskip("mypy")
    from mypy import api

    monkeypatch.chdir(ROOT)
    out, err, status = api.run(
        ["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(tmp_path / "cache"), "llmspeed"]
    )
    assert status == 0, f"mypy llmspeed (exit status {status}):\n{out}{err}"
