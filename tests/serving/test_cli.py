"""``python -m llmspeed serve`` flags refused before any model is loaded (fast; the slow ones are in test_server.py)."""

from __future__ import annotations

import pytest

from llmspeed.serving import cli


def test_group_size_without_quantize_is_refused_not_ignored(monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded: --group-size without --quantize would serve the float model")

    monkeypatch.setattr(cli, "load_model", no_load)
    with pytest.raises(SystemExit, match="--group-size 64 needs --quantize"):
        cli.build(cli.build_parser().parse_args(["--group-size", "64"]))
