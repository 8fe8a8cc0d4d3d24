"""Incremental detokenization: streamed text is always a prefix of the final text, UTF-8 safe, stops exact."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmspeed.generation.detokenizer import Detokenizer, backend_decode
from llmspeed.generation.sampling import SamplingParams
from llmspeed.generation.sequence import Sequence


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
    pieces.append(d.finish(check_stop=len(tokens) >= min_checked))
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


class Pieces:
    """Tokens of several bytes each, one of which ends inside a character, as byte-level BPE merges can."""

    PIECES = {0: b"S", 1: b"TOP\xe2", 2: b"\x82\xac", 3: b"ok "}

    def decode(self, ids, skip_special_tokens=False):
        return b"".join(self.PIECES.get(i, bytes([i])) for i in ids).decode("utf-8", errors="replace")


def test_a_stop_string_in_the_tail_held_back_for_a_partial_character_is_found_at_the_end():
    """Regression: a token whose text ends in part of a character is held back with all it carries; when the request
    ended right after it (``max_new_tokens``), ``finish`` flushed that text without searching it for stop strings,
    so "STOP" reached the output (finish reason "length")."""
    pieces, d, stopped = _run([3, 0, 1], ["STOP"], Pieces())
    assert not stopped and d.stopped  # found by finish(), not by add()
    assert d.text == "ok " and "".join(pieces) == "ok "
    pieces, d, _ = _run([3, 0, 1, 2], ["STOP"], Pieces())  # the character completed: found by add() as before
    assert d.stopped and d.text == "ok "


def test_a_stop_string_in_the_flushed_tail_is_not_checked_before_min_tokens():
    """Regression: ``finish`` searched the held-back tail for stop strings even when the request ended (at its
    context limit) before ``min_tokens``, cutting text that ``add`` would not have cut there."""
    pieces, d, _ = _run([3, 0, 1], ["STOP"], Pieces(), min_checked=4)
    assert not d.stopped and d.text.startswith("ok STOP") and "".join(pieces) == d.text


def _scripted_pieces(llama, monkeypatch):
    """The Generator's sampler scripted to write tokens 3, 0, 1 ("ok ", "S", "TOP\\xe2") on a Pieces tokenizer."""
    from llmspeed.generation import engine as engine_module

    script, real = iter([3, 0, 1]), engine_module.sample_batch

    def scripted(logits, params, generators, rows):
        tokens, logprobs = real(logits, params, generators, rows)
        return [next(script) for _ in tokens], logprobs

    monkeypatch.setattr(engine_module, "sample_batch", scripted)
    llama.tokenizer = Pieces()


def test_the_generator_reports_stop_for_a_stop_string_found_in_the_flushed_tail(llama, monkeypatch):
    """The same through the Generator: its sampler scripted to write "ok ", "S", "TOP\\xe2" and stop at
    ``max_new_tokens=3``: the text ends before "STOP" and the finish reason is "stop", not "length"."""
    from llmspeed.generation import Generator, SamplingParams

    _scripted_pieces(llama, monkeypatch)
    out = Generator(llama, progress=False).generate_batched(
        [[5, 6, 7]], SamplingParams(max_new_tokens=3, ignore_eos=True, stop=("STOP",)))[0]  # fmt: skip
    assert out.token_ids == [3, 0, 1]
    assert out.finish_reason == "stop" and out.text == "ok "


def test_the_generator_does_not_cut_at_a_stop_string_before_min_tokens_at_the_context_limit(llama, monkeypatch):
    """Regression: a request ended by the cache's capacity before ``min_tokens`` had its held-back tail searched
    for stop strings: its text was cut at "STOP" and its finish reason turned to "stop"."""
    from llmspeed.generation import Generator, SamplingParams

    _scripted_pieces(llama, monkeypatch)
    gen = Generator(llama, progress=False, kv_cache_tokens=6, block_size=2)
    params = SamplingParams(max_new_tokens=5, min_tokens=5, ignore_eos=True, stop=("STOP",))
    out = gen.generate_batched([[5, 6, 7]], params)[0]
    assert out.token_ids == [3, 0, 1]
    assert out.finish_reason == "length" and out.text.startswith("ok STOP")


class Special(Utf8Bytes):
    """Utf8Bytes with token 300, a special token that decoding skips; counts the ids each decode reads."""

    def __init__(self):
        self.read = 0

    def decode(self, ids, skip_special_tokens=False):
        self.read += len(ids)
        return super().decode([i for i in ids if i != 300] if skip_special_tokens else ids)


def test_a_run_of_special_tokens_does_not_grow_every_later_decode():
    """Regression: tokens that decode to nothing stayed in the decode window, so after n of them (an ``ignore_eos``
    run past end-of-text) every token decoded all n again: n**2 work in all."""
    def run(n):
        tok = Special()
        pieces, d, _ = _run(list(b"ab") + [300] * n + list("é z".encode()), [], tok)
        return tok.read, "".join(pieces), d.text

    (short, text_short, _), (long, text_long, final) = run(10), run(1000)
    assert text_short == text_long == final == "abé z"
    assert long - short <= 4 * (1000 - 10)  # linear in the tokens: each special one decoded a bounded number of ids


def test_no_tokenizer_gives_no_text():
    d = Detokenizer(None, [1], ["x"])
    assert d.add(5) == "" and d.finish() == "" and not d.stopped


def test_a_request_checks_no_stop_string_before_min_tokens():
    """vLLM: a stop string in the first min_tokens tokens ends nothing; after them it does."""
    seq = Sequence(0, [65], SamplingParams(min_tokens=2, stop=("a",)))
    seq.detok = Detokenizer(Utf8Bytes(), seq.prompt_ids, seq.params.stop)
    reasons = []
    for token in b"aba":
        seq.output_ids.append(token)
        reasons.append(seq.advance(token, frozenset(), 100)[0])
    assert reasons == [None, None, "stop"] and seq.detok.text == "ab"


def test_only_the_last_len_of_longest_stop_minus_one_characters_are_held_back():
    d = Detokenizer(Utf8Bytes(), [65], ("xyz", "q"))
    assert [d.add(t) for t in b"abcd"] == ["", "", "a", "b"]
    assert d.finish() == "cd"
    plain = Detokenizer(Utf8Bytes(), [65])
    assert [plain.add(t) for t in b"ab"] == ["a", "b"]


class SentencePiece:
    """Decoding drops the leading space of its first word, as SentencePiece tokenizers (Llama 2, Mistral) do."""

    PIECES = {1: "▁Hello", 2: "▁world", 3: "!"}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.PIECES[i] for i in ids).replace("▁", " ").lstrip(" ")


def test_the_first_output_word_keeps_its_leading_space_from_the_prompt_context():
    d = Detokenizer(SentencePiece(), [1], ())
    assert [d.add(2), d.add(3)] == [" world", "!"] and d.text == " world!"


def _both(tok, prompt, tokens, stop=()):
    """Texts and deltas of a detokenizer through the Rust decode and of one through ``tokenizer.decode``."""
    fast, slow = Detokenizer(tok, prompt, stop), Detokenizer(tok, prompt, stop)
    slow._fast = None
    assert fast._fast is not None
    deltas = [(fast.add(t), slow.add(t)) for t in tokens]
    deltas.append((fast.finish(), slow.finish()))
    return fast, slow, deltas


# Text where transformers' clean_up_tokenization changes something: " ." " ," " ?" " !" " ' " " n't" " 'm" " 's" ...
CLEANED = [" .", " ,", " ?", " !", " ' ", " n't", " 'm", " 's", " 've", " 're", " x != y ", " don't"]


def _wordpiece(clean_up=True):
    """A small WordPiece fast tokenizer (built here, as BERT's is) whose Rust decode leaves "a , b ." as it is."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = ["[UNK]", "[CLS]", "[SEP]", "hello", "world", "x", "y", "don", "##t", "it", "##s", "is", "=", "n", "t", "s",
             "m", "ve", "re", ".", ",", "?", "!", "'", "##'", "##!", "##.", "é", "😀"]  # fmt: skip
    backend = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(cleanup=False)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]",
                                                sep_token="[SEP]", clean_up_tokenization_spaces=clean_up)  # fmt: skip


def _golden_tokenizer(kind, smollm2):
    """SmolLM2's byte-level BPE as it is (no clean-up), with clean-up on (which transformers skips for a BPE model),
    and with clean-up forced; a WordPiece tokenizer with clean-up on (applied)."""
    import copy

    if kind == "wordpiece":
        return _wordpiece()
    tok = copy.copy(smollm2.tokenizer)
    if kind != "plain":
        tok.clean_up_tokenization_spaces = True
    if kind == "bpe forced":
        tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    return tok


GOLDEN = ["plain", "bpe clean-up on", "bpe forced", "wordpiece"]


@pytest.mark.parametrize("kind", GOLDEN)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_the_rust_decode_gives_the_text_of_the_tokenizers_decode(smollm2_cached, kind, data):
    """Golden: the tokenizer through ``backend_decode`` gives the text ``tokenizer.decode`` gives, and every delta,
    on random ids (special tokens, byte pieces of multi-byte characters, text clean-up changes, ...) and on real text."""
    tok = _golden_tokenizer(kind, smollm2_cached)
    vocab = len(tok)
    special = sorted(tok.all_special_ids)
    real = tok.encode("Héllo wörld — 😀 naïve façade\n\tdef f(x):  return x ** 2  # ok. I don't know , he said . Is it ? "
                      "Yes ! it 's x != y , we 're sure ' n' I 'm , we 've !", add_special_tokens=False)  # fmt: skip
    cleaned = [tok.encode(s, add_special_tokens=False) for s in CLEANED]
    pieces = data.draw(st.lists(st.one_of(st.integers(0, vocab - 1).map(lambda i: [i]), st.sampled_from(special).map(
        lambda i: [i]), st.sampled_from(real).map(lambda i: [i]), st.sampled_from(cleaned)), max_size=30))  # fmt: skip
    ids = [i for piece in pieces for i in piece]
    prompt = data.draw(st.lists(st.integers(0, vocab - 1), max_size=6))
    stop = data.draw(st.lists(st.text(alphabet="ab é😀 ", min_size=1, max_size=3), max_size=2))
    assert backend_decode(tok)(ids) == tok.decode(ids, skip_special_tokens=True)
    fast, slow, deltas = _both(tok, prompt, ids, stop)
    assert all(a == b for a, b in deltas) and fast.text == slow.text and fast.stopped == slow.stopped
    _, _, real_deltas = _both(tok, [], real)
    assert all(a == b for a, b in real_deltas)
    assert "".join(a for a, _ in real_deltas) == tok.decode(real, skip_special_tokens=True)
    if not stop and not prompt:  # the deltas add up to the decode of the whole, clean-up included (a prompt's
        # context gives the first word the space it has after the prompt, which the ids alone decode without)
        assert "".join(a for a, _ in deltas) == tok.decode(ids, skip_special_tokens=True) == fast.text


@pytest.mark.parametrize("path", ["rust", "decode"])
@pytest.mark.parametrize("text", ["x ' y", "it 's x", "don 't", "hello ' s world", "x ' ' y", "x = y , x ' s",
                                  "hello world ' s", "hello , world . is it ? ! x ' y"])  # fmt: skip
def test_deltas_add_up_to_the_cleaned_text_where_a_clean_up_removes_a_space_already_decoded(text, path):
    """Regression: transformers' clean-up turns " ' " into "'", removing the space after the quote too; the windows'
    deltas had handed that space out (``"x ' y"`` streamed as ``"x ' y"``, decoded as ``"x'y"``)."""
    tok = _wordpiece()
    ids = tok.encode(text, add_special_tokens=False)
    d = Detokenizer(tok, [])
    if path == "decode":
        d._fast = None
    deltas = [d.add(i) for i in ids] + [d.finish()]
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == d.text
    assert tok.decode(ids, skip_special_tokens=True) != tok.decode(ids, skip_special_tokens=True,
                                                                  clean_up_tokenization_spaces=False)  # fmt: skip


def test_a_stop_string_is_found_in_the_cleaned_text():
    """"x's" exists only after the clean-up ("x ' s" raw): the stop string is searched in the text callers get."""
    tok = _wordpiece()
    ids = tok.encode("hello x ' s world", add_special_tokens=False)
    d = Detokenizer(tok, [], stop=["x's"])
    out = "".join(d.add(i) for i in ids) + d.finish()
    assert d.stopped and out == d.text == "hello "


def test_the_golden_tokenizers_clean_up_where_transformers_does(smollm2_cached):
    """The golden test's cases are what they claim: clean-up changes the text of the forced BPE and the WordPiece
    tokenizer (so the Rust decode alone would differ) and not that of the BPE with clean-up on."""
    for kind in GOLDEN:
        tok = _golden_tokenizer(kind, smollm2_cached)
        ids = tok.encode("hello , world . don't it 's ?", add_special_tokens=False)
        rust = tok.backend_tokenizer.decode(ids, skip_special_tokens=True)
        assert backend_decode(tok)(ids) == tok.decode(ids, skip_special_tokens=True)
        assert (rust != tok.decode(ids, skip_special_tokens=True)) == (kind in ("bpe forced", "wordpiece")), kind


def test_a_clean_up_overridden_by_a_subclass_or_the_instance_is_applied():
    """``_decode`` calls ``self.clean_up_tokenization``: the fast path calls the same one, where it is overridden
    too; a transformers without the BPE flag (< 5.7, which cleaned BPE text as well) gets ``decode`` itself."""
    tok = _wordpiece()
    ids = tok.encode("hello , world .", add_special_tokens=False)

    class Custom(type(tok)):
        def clean_up_tokenization(self, text):
            return super().clean_up_tokenization(text).upper()

    custom = _wordpiece()
    custom.__class__ = Custom
    assert backend_decode(custom)(ids) == custom.decode(ids, skip_special_tokens=True) == "HELLO, WORLD."
    tok.clean_up_tokenization = lambda text: text.replace(" ", "_")
    assert backend_decode(tok)(ids) == tok.decode(ids, skip_special_tokens=True) == "hello_,_world_."
    older = _wordpiece()
    del older.__dict__["clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"]
    assert backend_decode(older) is None
    assert backend_decode(_wordpiece(clean_up=False))(ids) == "hello , world ."


def test_the_rust_decode_is_used_only_where_it_is_what_decode_returns(smollm2_cached):
    import copy

    tok = smollm2_cached.tokenizer
    assert backend_decode(tok) is not None and backend_decode(Utf8Bytes()) is None and backend_decode(None) is None
    other = copy.copy(tok)  # a backend_tokenizer other than the _tokenizer that _decode decodes with
    other.__class__ = type("Other", (type(tok),), {"backend_tokenizer": property(lambda self: copy.deepcopy(self._tokenizer))})
    assert backend_decode(other) is None

    calls = []

    class Custom(type(tok)):  # a subclass that changes decode (as some models' tokenizers do): it must be called
        def decode(self, ids, skip_special_tokens=False, **kwargs):
            calls.append(list(ids))
            return super().decode(ids, skip_special_tokens=skip_special_tokens, **kwargs).upper()

    custom = copy.copy(tok)
    custom.__class__ = Custom
    word = tok.encode(" hello", add_special_tokens=False)
    assert backend_decode(custom) is None
    assert "".join(Detokenizer(custom, [], ()).add(t) for t in word) == " HELLO" and calls


def test_a_decode_set_on_the_tokenizer_instance_is_called(smollm2_cached):
    """Regression: only the class was checked for an overridden ``decode``, so a wrapper set on the instance (as
    ``monkeypatch.setattr(tokenizer, "decode", ...)`` or a post-processing wrapper does) was passed over for the
    Rust decode, and the text was not what ``tokenizer.decode`` gives."""
    import copy

    tok = copy.deepcopy(smollm2_cached.tokenizer)
    plain = tok.decode
    tok.decode = lambda ids, skip_special_tokens=False, **kwargs: plain(ids, skip_special_tokens=skip_special_tokens).upper()
    word = tok.encode(" hello", add_special_tokens=False)
    assert backend_decode(tok) is None
    assert "".join(Detokenizer(tok, [], ()).add(t) for t in word) == " HELLO"



def test_the_rust_decode_skips_tokens_the_user_added_as_decode_does(smollm2_cached):
    """Tokens added with ``add_tokens`` are kept and those added as special (``add_special_tokens``, ``add_tokens(...,
    special_tokens=True)``) dropped, by the Rust decode as by ``tokenizer.decode``."""
    import copy

    tok = copy.deepcopy(smollm2_cached.tokenizer)
    tok.add_tokens(["<foo>", " barbaz"])
    tok.add_tokens(["<sp2>"], special_tokens=True)
    tok.add_special_tokens({"additional_special_tokens": ["<spec>"]})
    ids = tok.encode("hi <foo> x barbaz<sp2>y <spec> end", add_special_tokens=False)
    fast, slow, deltas = _both(tok, [], ids)
    assert all(a == b for a, b in deltas) and fast.text == slow.text == tok.decode(ids, skip_special_tokens=True)
    assert "<foo>" in fast.text and "<sp2>" not in fast.text and "<spec>" not in fast.text


@pytest.mark.parametrize("path", ["rust", "decode"])
def test_a_long_cleaned_output_costs_the_same_per_token_at_its_end(path, monkeypatch):
    """Regression: with a clean-up (WordPiece, a forced BPE), every token cleaned the whole output so far again, so a
    stream cost quadratic time in its length. transformers' clean-up is now applied past the last point no rewrite
    reaches across: the characters it is handed grow with the output's length, not with its square."""
    import functools

    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    handed = []
    real = PreTrainedTokenizerBase.clean_up_tokenization

    @functools.wraps(real)
    def counting(self, text):
        handed.append(len(text))
        return real(self, text)

    monkeypatch.setattr(PreTrainedTokenizerBase, "clean_up_tokenization", counting)
    tok = _wordpiece()
    ids = tok.encode("hello , world . is it ? x ' s don 't " * 150, add_special_tokens=False)  # 1,950 tokens
    d = Detokenizer(tok, [])
    assert d._local  # transformers' own clean-up, wrapped as it is (a subclass's is applied to the whole text)
    if path == "decode":
        d._fast = None
    out = "".join(d.add(i) for i in ids) + d.finish()
    streamed = list(handed)
    assert out == d.text == tok.decode(ids, skip_special_tokens=True)
    assert sum(streamed) < 40 * len(out)  # was 5.6 million characters for this 4,649 (about len(out) ** 2 / 4)
    assert max(streamed) < 40


def test_a_clean_up_overridden_by_a_subclass_is_applied_to_the_whole_text():
    """A subclass's clean-up may rewrite anything, across the points transformers' own never rewrites across: the
    request's text is its clean-up of the whole (text it rewrites after handing it out is the known limit of deltas)."""
    class Joining(type(_wordpiece())):
        def clean_up_tokenization(self, text):
            return super().clean_up_tokenization(text).replace("world is", "WORLD-IS")

    tok = _wordpiece()
    tok.__class__ = Joining
    ids = tok.encode("hello , world . hello world is it", add_special_tokens=False)
    d = Detokenizer(tok, [])
    assert not d._local
    for i in ids:
        d.add(i)
    d.finish()
    assert d.text == tok.decode(ids, skip_special_tokens=True) == "hello, world. hello WORLD-IS it"


def test_a_local_clean_up_that_rewrites_settled_text_still_ends_with_the_clean_up_of_the_whole():
    """The defensive branch of the local clean-up: should the text already handed out after the last barrier change
    (transformers' clean-up never does that), a non-final step hands out nothing and the final one replaces that
    part, so the request's text is still the clean-up of everything it generated."""
    tok = _wordpiece()
    ids = tok.encode("hello , world . x ? x", add_special_tokens=False)
    d = Detokenizer(tok, [])
    assert d._local
    released = "".join(d.add(i) for i in ids[:-1])
    assert released == d.text and d.text.endswith("x")  # the settled tail after "world" holds an "x"
    real = d._clean
    d._clean = lambda text: real(text).replace("x", "Y")  # now rewrites text it handed out before
    shown = d.text
    assert d.add(ids[-1]) == "" and d.text == shown  # a rewritten settled part: nothing more is handed out
    d.finish()
    assert d.text == tok.decode(ids, skip_special_tokens=True).replace("x", "Y") == "hello, world. Y? Y"
