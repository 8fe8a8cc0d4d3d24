"""Tiny random decoder-only models built from a config and a seed (no downloads), for tests and benchmarks."""

from __future__ import annotations

import numbers
from typing import Any

import torch

from ..model import Model
from ..names import check_device
from ..precision.cast import resolve_dtype

# Small enough to run a forward pass in milliseconds; shapes exercise grouped-query attention.
_TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)

ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    # fused qkv_proj and gate_up_proj; Phi3Config's default token ids (32000) are past the tiny vocabulary
    "phi3": ("Phi3Config", {"sliding_window": None, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}),
}


def _config(config_name: str, fields: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """The transformers config ``config_name`` built from ``fields``; ``TypeError`` naming unknown ``overrides``.

    transformers keeps any keyword it does not know as a plain attribute, so a misspelt field
    (``num_layers=4``) would be silently ignored; the fields it stores that way are refused here.
    """
    import transformers

    config_class = getattr(transformers, config_name)
    config = config_class(**fields)
    unknown = sorted((set(vars(config)) - set(vars(config_class()))) & set(overrides))
    if unknown:
        raise TypeError(
            f"unknown config fields {unknown} for {config_name}; overrides must be fields of it "
            f"(e.g. num_hidden_layers, hidden_size, intermediate_size, vocab_size, head_dim)"
        )
    return config


def _check_seed(seed: Any) -> None:
    """``ValueError`` unless ``seed`` is an integer ``torch.manual_seed`` takes (a float was truncated, None raised
    a bare ``int()`` TypeError)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -(2**63) <= int(seed) < 2**64:
        raise ValueError(f"seed must be an integer in [-2**63, 2**64); got {seed!r}")


def tiny(
    architecture: str = "llama", seed: int = 0, dtype: torch.dtype | str = torch.float32, **overrides: Any
) -> Model:
    """A randomly initialised tiny model of one supported family, reproducible from ``seed``.

    Args:
        architecture: One of :data:`ARCHITECTURES` (``"llama"``, ``"qwen2"``, ``"qwen3"``, ``"mistral"``, ``"phi3"``).
        seed: Seed for the weights: an integer (``ValueError`` otherwise).
        dtype: Weight dtype, or its name (``"bf16"``, ``"bfloat16"``, ...: :mod:`llmspeed.names`).
        overrides: Config fields to change (e.g. ``num_hidden_layers=4``); ``TypeError`` for a name the
            config does not have. The output head is untied from the input embedding unless
            ``tie_word_embeddings=True``.
    """
    if not isinstance(architecture, str) or architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}; got {architecture!r}")
    _check_seed(seed)
    dtype = resolve_dtype(dtype)
    import transformers

    config_name, extra = ARCHITECTURES[architecture]
    config = _config(config_name, {**_TINY, "tie_word_embeddings": False, **extra, **overrides}, overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    hf.eval()
    return Model(hf, None)


def llama_1b_random(
    seed: int = 0, dtype: torch.dtype | str = torch.bfloat16, device: str | torch.device = "cpu", **overrides: Any
) -> Model:
    """A 1B-class Llama (hidden 2048, 16 layers, 32 heads, 8 KV heads, vocab 128256) with random weights.

    ``dtype`` and ``overrides`` are checked as in :func:`tiny`; ``device`` as in :func:`llmspeed.models.smollm2`.
    """
    import transformers

    _check_seed(seed)
    dtype = resolve_dtype(dtype)
    check_device(device)
    cfg = dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    )
    config = _config("LlamaConfig", {**cfg, **overrides}, overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            hf = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    hf.eval()
    return Model(hf, None)
