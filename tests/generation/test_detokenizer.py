"""Incremental detokenization: streamed text is always a prefix of the final text, UTF-8 safe, stops exact."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llmspeed.generation.detokenizer import Detokenizer


class Utf8Bytes:
    """One token per byte; decoding a cut multi-byte character gives U+FFFD, as real byte-level BPEs do."""

    def decode(self, ids, skip_special_tokens=False):
        return bytes(ids).decode("utf-8", errors="replace")


def _run(tokens, stop, tokenizer=None, min_checked=0):
    d = Detokenizer(tokenizer or Utf8Bytes(), [65, 66], stop)
    pieces, finished = [], False
    for i, t in enumerate(tokens):
        pieces.append(d.add(t, check_stop=i + 1 >= min_checked))
        if d.stopped:
            finished = True
            break
    pieces.append(d.finish())
    return pieces, d, finished


TEXT = st.text(alphabet="ab é€😀\n", max_size=30)


@settings(max_examples=200, deadline=None)
@given(text=TEXT, stops=st.lists(st.text(alphabet="ab é€", min_size=1, max_size=4), max_size=3))
def test_stream_is_always_a_prefix_of_the_final_text_and_never_shows_stopped_text(text, stops):
    tokens = list(text.encode("utf-8"))
    pieces, d, stopped = _run(tokens, stops)
    final = d.text
    shown = ""
    for piece in pieces:
        shown += piece
        assert final.startswith(shown)  # nothing shown that the final text does not have
        assert "\ufffd" not in piece  # never half a character
    assert shown == final
    assert (stopped, final) == _expected(text, stops)


def _expected(text, stops):
    """Generation stops at the first character that completes a stop string, cut where the earliest one starts."""
    for k in range(1, len(text) + 1):
        hits = [text[:k].find(s) for s in stops if s in text[:k]]
        if hits:
            return True, text[: min(hits)]
    return False, text


def test_a_multi_token_stop_string_is_never_streamed():
    text = "Python is a high-level programming language"
    pieces, d, stopped = _run(list(text.encode()), ["programming"])
    assert stopped and d.text == "Python is a high-level "
    assert "".join(pieces) == d.text and not any("prog" in p for p in pieces)


def test_stop_strings_are_not_checked_before_min_tokens():
    tokens = list(b"abcabc")
    _, d, stopped = _run(tokens, ["a"], min_checked=4)
    assert stopped and d.text == "abc"  # the first "a" (token 1) was before min_tokens; the second stops


def test_no_tokenizer_gives_no_text():
    d = Detokenizer(None, [1], ["x"])
    assert d.add(5) == "" and d.finish() == "" and not d.stopped
