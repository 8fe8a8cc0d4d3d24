"""Evaluation texts: Python's documentation topics (``pydoc_data.topics``), shipped with every CPython,
and CPython's license as a second text in another register (:func:`license_text`).

The text (about 460k characters of English) is joined in sorted topic order so it is the same on
every machine running the same CPython minor version. It is split in two halves by characters:
``"eval"`` (perplexity windows are cut from its start) and ``"train"`` (for calibration and
fine-tuning, never overlapping the evaluation windows).
"""

from __future__ import annotations

from functools import lru_cache

SPLITS = ("all", "eval", "train")
_LICENSE = "LICENSE.txt"


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


@lru_cache(maxsize=1)
def license_text() -> str:
    """CPython's license (``LICENSE.txt`` in the standard library folder, about 14k characters).

    Legal English, a register the pydoc text never uses: a second evaluation text that no llmspeed
    training or calibration run reads. It is the same on every machine with the same CPython version.
    ``ValueError`` if this Python was installed without it (some distributions strip it).
    """
    import os
    import sysconfig

    path = os.path.join(sysconfig.get_paths()["stdlib"], _LICENSE)
    if not os.path.isfile(path):
        raise ValueError(f"this Python ships no {_LICENSE} in its standard library folder ({path})")
    with open(path, encoding="utf-8") as f:
        return f.read()
