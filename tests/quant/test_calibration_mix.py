"""The default calibration text mixes registers Python ships and keeps every evaluation text out."""

from __future__ import annotations

import pytest

import llmspeed
from llmspeed.eval import registers


def _samples(text: str, n: int = 40, width: int = 120) -> list[str]:
    """``n`` pieces of ``width`` characters spread over ``text``, whitespace-normalized."""
    step = max(1, (len(text) - width) // n)
    return [" ".join(text[i : i + width].split()) for i in range(0, len(text) - width, step)][:n]


@pytest.mark.parametrize(
    "name,text",
    [
        ("pydoc eval half", lambda: llmspeed.eval.pydoc_text("eval")),
        ("license", llmspeed.eval.license_text),
        ("idle news", llmspeed.eval.news_text),
    ],
)
def test_mix_holds_no_evaluation_text(name, text):
    mix = " ".join(llmspeed.eval.calibration_mix().split())
    pieces = _samples(text())
    assert len(pieces) == 40
    leaked = [p for p in pieces if p in mix]
    assert not leaked, (name, leaked[:2])


def test_mix_interleaves_all_four_registers_from_its_start():
    texts = registers.register_texts()
    head = registers.calibration_mix()[: 4 * registers.CHUNK_CHARS + 400]  # about the first round of chunks
    norm = " ".join(head.split())
    for register in registers.REGISTERS:
        first = " ".join(texts[register][: registers.CHUNK_CHARS].split())[:200]
        assert first in norm, register
    assert len(registers.calibration_mix()) >= 3 * registers.REGISTER_CHARS


def test_mix_contains_its_own_training_half_but_not_the_pydoc_eval_half():
    mix = " ".join(llmspeed.eval.calibration_mix().split())
    train = llmspeed.eval.pydoc_text("train")
    assert " ".join(train[1000:1120].split()) in mix
    assert not any(p in mix for p in _samples(llmspeed.eval.pydoc_text("eval"), n=10))


def test_comment_and_docstring_extraction():
    source = '#!/usr/bin/env python\n"""Module doc."""\n# first line of a note\n# second line here\nx = 1  # a trailing comment here\n\ndef f():\n    """Function doc."""\n'
    assert registers.docstrings(source) == ["Module doc.", "Function doc."]
    assert registers.comment_blocks(source) == [
        "first line of a note second line here a trailing comment here"
    ]


def test_comment_blocks_drop_runs_of_two_words_or_fewer():
    source = "# two words\nx = 1\n# three words here\n"
    assert registers.comment_blocks(source) == ["three words here"]


def test_chunks_cover_the_text_at_line_ends():
    lines = [f"line {i} " + "x" * (i % 70) for i in range(400)]
    text = "\n".join(lines)
    pieces = registers._chunks(text, len(text))
    assert len(pieces) > 2 and "\n".join(pieces) == text  # nothing skipped, nothing repeated
    assert all(len(p) >= registers.CHUNK_CHARS for p in pieces[:-1])


def test_mix_holds_every_chunk_of_every_register():
    """A register with fewer chunks runs out first; the other registers' chunks still all go in."""
    mix = registers.calibration_mix()
    texts = registers.register_texts()
    for register in registers.REGISTERS:
        chunks = registers._chunks(texts[register], registers.REGISTER_CHARS)
        assert all(c in mix for c in chunks), register
