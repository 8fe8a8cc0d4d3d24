"""Generation tests run tiny models whose ops are too small to gain from a second thread."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every generation test runs with one intra-op thread (see ``one_thread``)."""
