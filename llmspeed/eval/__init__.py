"""Evaluation: perplexity over fixed windows of text Python ships, and the default calibration mix kept apart from it."""

from .perplexity import perplexity, window_losses
from .registers import calibration_mix
from .text import license_text, news_text, pydoc_text

__all__ = ["perplexity", "window_losses", "pydoc_text", "license_text", "news_text", "calibration_mix"]
