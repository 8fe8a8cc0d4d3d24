"""Evaluation: perplexity over fixed windows of Python's own documentation."""

from .perplexity import perplexity, window_losses
from .text import license_text, pydoc_text

__all__ = ["perplexity", "window_losses", "pydoc_text", "license_text"]
