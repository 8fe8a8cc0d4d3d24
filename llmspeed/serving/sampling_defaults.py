"""Default sampling parameters from the model's generation config, as vLLM's ``--generation-config auto`` (its
default) applies them: a request that leaves ``temperature``, ``top_p``, ``top_k``, ``min_p`` or
``repetition_penalty`` out samples with the model's published values (Qwen's ``temperature: 0.7, top_p: 0.8,
top_k: 20``, Llama 3's ``temperature: 0.6, top_p: 0.9``), not with the OpenAI API's defaults; a value the request
gives always wins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")  # vLLM's, in the config's names
SOURCES = ("auto", "vllm")  # or a folder holding generation_config.json


def sampling_defaults(model: Any, source: str = "auto") -> dict[str, float | int]:
    """The request-field defaults ``source`` gives: ``"auto"`` the model's own generation config (the values it sets
    explicitly), ``"vllm"`` none (the OpenAI API's defaults), or a folder holding a ``generation_config.json``.

    Raises:
        ValueError: ``source`` is none of these, or its folder has no ``generation_config.json`` (named).
    """
    check_source(source)
    if source == "vllm":
        return {}
    if source == "auto":
        config = getattr(getattr(model, "module", None), "generation_config", None)
        given = config.to_diff_dict() if config is not None else {}
    else:
        from transformers import GenerationConfig

        given = GenerationConfig.from_pretrained(Path(source)).to_diff_dict()
    return {k: given[k] for k in SAMPLING_FIELDS if given.get(k) is not None}


def check_source(source: str) -> None:
    """``ValueError`` unless ``source`` is one of :data:`SOURCES` or a folder holding ``generation_config.json``
    (checkable before a model loads)."""
    if source not in SOURCES and not (Path(source) / "generation_config.json").is_file():
        raise ValueError(f"generation_config must be one of {list(SOURCES)} or a folder holding "
                         f"generation_config.json; got {source!r}")  # fmt: skip


__all__ = ["SAMPLING_FIELDS", "SOURCES", "check_source", "sampling_defaults"]
