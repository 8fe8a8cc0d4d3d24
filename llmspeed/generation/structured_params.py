"""What a request's output must look like: :class:`StructuredOutputsParams` (a JSON schema, any JSON object, a regular
expression, one of a list of strings, or a grammar), vLLM's structured outputs, as plain validated data.

The grammar each kind describes is built by `xgrammar <https://github.com/mlc-ai/xgrammar>`_ (the library vLLM and
SGLang use for this), imported only when a request asks for structured outputs; :mod:`.structured` turns it into
the token masks the sampler applies.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..names import shown as _shown

KINDS = ("json", "regex", "choice", "grammar", "json_object")
INSTALL = "pip install 'llmspeed[structured]' (or pip install xgrammar)"


def xgrammar() -> Any:
    """The ``xgrammar`` module; ``ImportError`` saying how to install it when it is missing."""
    try:
        import xgrammar as xgr
    except ImportError as err:
        raise ImportError(f"structured outputs need the xgrammar package: {INSTALL}") from err
    return xgr


_MISREAD = re.compile(r"[^\x00-\x7f][0-9A-Fa-f]")  # what xgrammar 0.2 reads as one code point in a literal


def _schema_literals(schema: str | None) -> list[str]:
    """The places of a JSON schema (as text) that xgrammar writes as literals (``enum`` and ``const`` strings, property
    names) and would misread: a non-ASCII character followed by a hex digit."""
    found: list[str] = []

    def walk(node: Any, literal: bool = False) -> None:
        if isinstance(node, str):
            found.extend(_MISREAD.findall(node) if literal else ())
        elif isinstance(node, list):
            for item in node:
                walk(item, literal)
        elif isinstance(node, dict):
            for key, value in node.items():
                if key == "properties" and isinstance(value, dict) and not literal:
                    walk(list(value), True)
                walk(value, literal or key in ("enum", "const"))

    walk(json.loads(schema) if schema is not None else None)
    return found


def _schema_text(given: object) -> str | None:
    """A JSON schema (a mapping, a JSON string, or a pydantic model class) as canonical JSON text; ``None`` when it
    is none of these."""
    if isinstance(given, type) and hasattr(given, "model_json_schema"):  # a pydantic model class, as vLLM takes it
        given = given.model_json_schema()
    if isinstance(given, str):
        try:
            given = json.loads(given)
        except ValueError:
            return None
    if not isinstance(given, Mapping):
        return None
    try:
        return json.dumps(given)  # key order kept: a schema's property order is the order the output writes them
    except (TypeError, ValueError):  # a value JSON cannot write (a set, a NaN is written; a set is not)
        return None


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Constrain a request's output to one of these (exactly one given), as vLLM's ``StructuredOutputsParams``.

    At each step the tokens that cannot continue a valid output are masked out before sampling (greedy and random
    requests alike), and the request ends (``"stop"``) once the output is complete and the grammar allows nothing but
    the end-of-sequence token. A request that reaches ``max_new_tokens`` first ends with ``"length"`` and an
    incomplete output, as in vLLM.

    Attributes:
        json: A JSON schema the output must validate against: a dict, its JSON text, or a pydantic model class
            (kept as canonical JSON text).
        regex: A regular expression the whole output must match (ECMAScript syntax, as xgrammar reads it).
        choice: Strings the output must be exactly one of.
        grammar: A context-free grammar in xgrammar's EBNF (GBNF, llama.cpp's, with a ``root`` rule).
        json_object: ``True``: any JSON object (OpenAI's ``response_format={"type": "json_object"}``).
        any_whitespace: Whether JSON output may put any whitespace between its tokens (vLLM's default); ``False``
            writes JSON in one compact form (``{"a": 1, "b": 2}``), which keeps a small model from looping on
            whitespace (vLLM's ``disable_any_whitespace``).
    """

    json: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False
    any_whitespace: bool = True

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"`structured_outputs` must give exactly one of {list(KINDS)}; got "
                             f"{given or 'none'}")  # fmt: skip
        if self.json is not None:
            text = _schema_text(self.json)
            if text is None:
                raise ValueError(f"`structured_outputs.json` must be a JSON schema (a dict, its JSON text or a "
                                 f"pydantic model class); got {_shown(self.json)}")  # fmt: skip
            object.__setattr__(self, "json", text)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"`structured_outputs.{name}` must be a non-empty string; got {_shown(value)}")
        misread = _MISREAD.findall(self.grammar) if self.grammar is not None else _schema_literals(self.json)
        if misread:
            raise ValueError(f"`structured_outputs.{'grammar' if self.grammar else 'json'}` writes {misread[:4]} in a "
                             f"literal: xgrammar 0.2 reads a non-ASCII character followed by a hex digit there as one "
                             f"character ('éa' as U+0E9A) and would write that instead; in a grammar give the "
                             f"character a literal of its own (\"é\" \"a\"), or use regex")  # fmt: skip
        if self.choice is not None:
            choice = (self.choice,) if isinstance(self.choice, str) else self.choice
            choice = tuple(choice) if isinstance(choice, (list, tuple)) else None
            if not choice or not all(isinstance(c, str) and c for c in choice):
                raise ValueError(f"`structured_outputs.choice` must be a non-empty list of non-empty strings; got "
                                 f"{_shown(self.choice)}")  # fmt: skip
            if any("\x00" in c for c in choice):  # xgrammar never matches one: the choice could not be written
                raise ValueError(f"`structured_outputs.choice` strings cannot hold a NUL character ('\\x00'), which "
                                 f"xgrammar does not match; got {_shown(self.choice)}")  # fmt: skip
            object.__setattr__(self, "choice", choice)
        for name in ("json_object", "any_whitespace"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`structured_outputs.{name}` must be a bool; got {getattr(self, name)!r}")
        self.build()  # a schema, expression or grammar xgrammar cannot read is refused here, not at the first step

    @property
    def kind(self) -> str:
        """Which of :data:`KINDS` it gives."""
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def build(self) -> Any:
        """The ``xgrammar.Grammar`` it describes (no tokenizer needed).

        Raises:
            ImportError: xgrammar is not installed (naming how to install it).
            ValueError: the schema, expression or grammar is one xgrammar cannot read (its message, naming the field).
        """
        xgr = xgrammar()
        kind = self.kind
        try:
            if kind == "json":
                return xgr.Grammar.from_json_schema(self.json, any_whitespace=self.any_whitespace, strict_mode=True)
            if kind == "json_object":
                schema = '{"type": "object"}'
                return xgr.Grammar.from_json_schema(schema, any_whitespace=self.any_whitespace, strict_mode=False)
            if kind == "regex":
                return xgr.Grammar.from_regex(self.regex)
            if kind == "choice":
                return xgr.Grammar.from_ebnf("root ::= " + " | ".join(f"({ebnf_literal(c)})" for c in self.choice or ()))
            return xgr.Grammar.from_ebnf(self.grammar)
        except RuntimeError as err:  # xgrammar's parse errors; the last line says what is wrong
            lines = [line for line in str(err).splitlines() if line.strip()]
            message = lines[0].split("] ", 1)[-1] if lines else str(err)
            raise ValueError(f"`structured_outputs.{kind}` cannot be compiled: {_shown(message, 300)}") from None

    def cache_key(self) -> tuple:
        """What the compiled grammar depends on (equal keys compile to the same grammar)."""
        return (self.kind, getattr(self, self.kind), self.any_whitespace)


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def ebnf_literal(text: str) -> str:
    """``text`` as a sequence of EBNF string literals that xgrammar reads back as ``text``.

    Each character outside printable ASCII gets a literal of its own (``"café"`` -> ``"caf" "é"``): xgrammar 0.2 reads
    a literal whose non-ASCII character is followed by a hex digit as one code point (``"éa"`` becomes U+0E9A, its
    printed ``\\xe9a``), so the string would never be matched.
    """
    parts, run = [], ""
    for ch in text:
        if " " <= ch <= "~":
            run += _ESCAPES.get(ch, ch)
            continue
        if run:
            parts.append(run)
        parts.append(_ESCAPES.get(ch, ch if ch >= "\x80" else f"\\x{ord(ch):02x}"))
        run = ""
    if run:
        parts.append(run)
    return " ".join(f'"{p}"' for p in parts)


def coerce_structured(given: object) -> StructuredOutputsParams | None:
    """``given`` (``None``, a :class:`StructuredOutputsParams`, or a dict of its fields) as one; ``ValueError``
    naming what is accepted for anything else."""
    if given is None or isinstance(given, StructuredOutputsParams):
        return given
    if isinstance(given, Mapping):
        names = list(StructuredOutputsParams.__dataclass_fields__)
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(f"`structured_outputs` has unknown keys {unknown}; it takes {names}")
        return StructuredOutputsParams(**given)
    raise ValueError(f"`structured_outputs` must be None, a StructuredOutputsParams or a dict of its fields (as "
                     f"{{'json': schema}}); got {type(given).__name__}")  # fmt: skip



__all__ = ["KINDS", "StructuredOutputsParams", "coerce_structured", "ebnf_literal", "xgrammar"]
