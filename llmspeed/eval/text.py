"""Evaluation texts: Python's documentation topics (``pydoc_data.topics``), shipped with every CPython,
CPython's license (:func:`license_text`) and IDLE's change log (:func:`news_text`), two more texts in
registers of their own that no llmspeed calibration or training run reads.

The text (about 460k characters of English) is joined in sorted topic order so it is the same on
every machine running the same CPython minor version. It is split in two halves by characters:
``"eval"`` (perplexity windows are cut from its start) and ``"train"`` (for calibration and
fine-tuning). The halves share no characters, but the topics repeat each other: whole paragraphs of the
``"eval"`` half, some inside its first perplexity windows, occur word for word in ``"train"``
(docs/calibration.md measures how much), so a model trained on ``"train"`` has seen part of what it
is scored on. The calibration mix reads the
``"train"`` half without those paragraphs (:func:`~.registers.pydoc_unseen_train`).
"""

from __future__ import annotations

from functools import lru_cache

SPLITS = ("all", "eval", "train")
_LICENSE = "LICENSE.txt"
_NEWS = ("idlelib", "NEWS.txt")


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
    return _stdlib_file(_LICENSE)


@lru_cache(maxsize=1)
def news_text() -> str:
    """IDLE's change log (``idlelib/NEWS.txt``, about 55k characters): terse release notes with issue numbers.

    A register neither the pydoc text nor the default calibration mix contains (the mix reads no
    ``idlelib`` file): an evaluation text for "text the calibration never saw". ``ValueError`` if this
    Python was installed without IDLE.
    """
    return _stdlib_file(*_NEWS)


def _stdlib_file(*parts: str) -> str:
    import os
    import sysconfig

    path = os.path.join(sysconfig.get_paths()["stdlib"], *parts)
    if not os.path.isfile(path):
        raise ValueError(f"this Python ships no {'/'.join(parts)} in its standard library folder ({path})")
    with open(path, encoding="utf-8") as f:
        return f.read()
