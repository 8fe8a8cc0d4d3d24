"""Fixtures of the bench suites' tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def shown_bars(monkeypatch):
    """The ``desc`` of every tqdm bar created from here on that is not disabled: a suite's own, a calibration's,
    transformers' loading and writing bars (they are tqdm's too, or no bar at all when switched off)."""
    import tqdm.std

    shown: list[str] = []
    init = tqdm.std.tqdm.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if not self.disable:
            shown.append(self.desc)

    monkeypatch.setattr(tqdm.std.tqdm, "__init__", record)
    return shown
