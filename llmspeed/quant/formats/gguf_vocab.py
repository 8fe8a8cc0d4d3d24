"""A transformers byte-level BPE tokenizer as GGUF's ``tokenizer.ggml.*`` metadata (what llama.cpp tokenizes with).

llama.cpp does not read a tokenizer's pre-tokenizer from the file: ``tokenizer.ggml.pre`` names one of the
pre-tokenizers it implements itself. :data:`PRE_TOKENIZERS` names the ones this export recognises, by the
pre-tokenizer of the tokenizer's ``tokenizer.json`` (the regular expression llama.cpp's
``src/llama-vocab.cpp`` implements for that name); any other is refused rather than written under a name
that would split text differently. Token types follow llama.cpp's converter: special added tokens are
``CONTROL``, other added tokens ``USER_DEFINED``, ids the tokenizer does not fill (a model vocabulary padded
past the tokenizer's) ``UNUSED`` placeholders named ``[PAD<id>]``.
"""

from __future__ import annotations

import json
from typing import Any

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# the pre-tokenizer of a tokenizer.json, as the steps :func:`pre_tokenizer_steps` lists -> llama.cpp's name
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("byte-level",): "gpt-2",  # ByteLevel's own regex is GPT-2's
    ("digits", "byte-level"): "smollm",  # every digit its own piece, then GPT-2's regex
    (f"split {QWEN2_REGEX}", "byte-level without regex"): "qwen2",
    (f"split {LLAMA3_REGEX}", "byte-level without regex"): "llama-bpe",
}
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # gguf.TokenType values


def _steps(node: dict | None) -> list[str]:
    if node is None:
        return []
    kind = node.get("type")
    if kind == "Sequence":
        return [step for child in node.get("pretokenizers", []) for step in _steps(child)]
    if kind == "ByteLevel":
        return ["byte-level" if node.get("use_regex", True) else "byte-level without regex"]
    if kind == "Digits" and node.get("individual_digits"):
        return ["digits"]
    if kind == "Split" and node.get("behavior") == "Isolated" and not node.get("invert"):
        pattern = node.get("pattern", {})
        if "Regex" in pattern:
            return [f"split {pattern['Regex']}"]
    return [json.dumps(node, sort_keys=True)]  # anything else: kept whole, so that it matches no known name


def pre_tokenizer_steps(spec: dict) -> tuple[str, ...]:
    """The pre-tokenizer of a parsed ``tokenizer.json`` as a tuple of steps (keys of :data:`PRE_TOKENIZERS`)."""
    return tuple(_steps(spec.get("pre_tokenizer")))


def _spec(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"cannot save format='gguf': the tokenizer ({type(tokenizer).__name__}) is not a fast (tokenizers) "
            f"tokenizer, whose tokenizer.json this export reads"
        )
    return json.loads(backend.to_str())


def _pre_name(spec: dict) -> str:
    steps = pre_tokenizer_steps(spec)
    name = PRE_TOKENIZERS.get(steps)
    if name is None:
        raise ValueError(
            f"cannot save format='gguf': the tokenizer's pre-tokenizer {list(steps)} is not one llama.cpp implements "
            f"under a name this export knows ({sorted(PRE_TOKENIZERS.values())}); save the model without its "
            f"tokenizer (Model(model.module, None)) and take the vocabulary from llama.cpp's convert_hf_to_gguf.py"
        )
    return name


def _adds_prefix_space(node: dict | None) -> bool:
    """Whether the pre-tokenizer's byte-level step puts a space before the text."""
    if node is None:
        return False
    if node.get("type") == "Sequence":
        return any(_adds_prefix_space(child) for child in node.get("pretokenizers", []))
    return node.get("type") == "ByteLevel" and bool(node.get("add_prefix_space"))


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def metadata(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """``tokenizer.ggml.*`` fields (and ``tokenizer.chat_template``) for ``tokenizer``, its ids padded to ``vocab_size``.

    Raises:
        ValueError: the tokenizer is not byte-level BPE, its pre-tokenizer has no llama.cpp name
            (:data:`PRE_TOKENIZERS`), or it holds more ids than the model's embedding.
    """
    spec = _spec(tokenizer)
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "byte-level" not in " ".join(pre_tokenizer_steps(spec)):
        raise ValueError(
            f"cannot save format='gguf': only byte-level BPE tokenizers (GPT-2, Llama-3, Qwen, SmolLM) are "
            f"written; this one is {model.get('type')!r} with pre-tokenizer {list(pre_tokenizer_steps(spec))}"
        )
    pre = _pre_name(spec)
    by_id: dict[int, str] = {int(i): t for t, i in model.get("vocab", {}).items()}
    types = dict.fromkeys(by_id, NORMAL)
    for added in spec.get("added_tokens", []):
        by_id[int(added["id"])] = added["content"]
        types[int(added["id"])] = CONTROL if added.get("special") else USER_DEFINED
    if by_id and max(by_id) >= vocab_size:
        raise ValueError(
            f"cannot save format='gguf': the tokenizer has id {max(by_id)}, past the model's vocabulary of {vocab_size}"
        )
    fields: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)],
        "tokenizer.ggml.token_type": [types.get(i, UNUSED) for i in range(vocab_size)],
        "tokenizer.ggml.merges": _merges(model),
        "tokenizer.ggml.add_bos_token": bool(getattr(tokenizer, "add_bos_token", False)),
        "tokenizer.ggml.add_space_prefix": _adds_prefix_space(spec.get("pre_tokenizer")),
    }
    for key, attribute in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"),
                           ("padding", "pad_token_id")):  # fmt: skip
        value = getattr(tokenizer, attribute, None)
        if isinstance(value, int):
            fields[f"tokenizer.ggml.{key}_token_id"] = value
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        fields["tokenizer.chat_template"] = template
    return fields
