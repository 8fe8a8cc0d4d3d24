"""Evaluation text: Python's documentation topics (``pydoc_data.topics``), shipped with every CPython.

The text (about 460k characters of English) is joined in sorted topic order so it is the same on
every machine running the same CPython minor version. It is split in two halves by characters:
``"eval"`` (perplexity windows are cut from its start) and ``"train"`` (for calibration and
fine-tuning, never overlapping the evaluation windows).
"""

from __future__ import annotations

from functools import lru_cache

SPLITS = ("all", "eval", "train")


@lru_cache(maxsize=1)
def _all_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def pydoc_text(split: str = "all") -> str:
    """Return the pydoc topics text: ``"all"``, the first half ``"eval"`` or the second half ``"train"``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    text = _all_text()
    half = len(text) // 2
    return {"all": text, "eval": text[:half], "train": text[half:]}[split]
