"""Model names the benchmark suites accept (``--model``), resolved to a fresh :class:`llmspeed.Model`.

Names:

* ``"smollm2"``: the embedded SmolLM2-135M-Instruct (real weights, a tokenizer: perplexity works);
* ``"llama-1b-random"``: a 1B-class Llama config with random weights (no tokenizer; for GPU timing);
* ``"tiny-<arch>"`` (``tiny-llama``, ``tiny-qwen2``, ...): tiny random models, for harness tests;
* ``"smollm2-shape-<arch>"``: random weights in SmolLM2-135M's shape (576 wide, 30 layers, 9 heads, 3 KV heads,
  1536 in the MLP, its vocabulary) for any tiny architecture: the same sizes across families (Phi-3's fused
  projections against Llama's), for timing;
* any other string: a folder holding a transformers checkpoint and its tokenizer.

Every call builds a fresh model, so a suite can cast or quantize it without affecting the next row.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..model import Model

NAMES = ("smollm2", "llama-1b-random", "tiny-<arch>", "smollm2-shape-<arch>", "PATH")
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192)  # fmt: skip


def name_error(name: str) -> str | None:
    """Why no suite can load ``--model name`` (a misspelt name or a missing folder), or ``None``.

    Checked before any suite runs: a suite that ignores ``--model`` would otherwise run for minutes
    before the others fail one by one. Which of the accepted names a suite supports is its own check.
    """
    from ..models import ARCHITECTURES

    if name in ("smollm2", "llama-1b-random", "llama1b", "tiny") or Path(name).is_dir():
        return None
    for prefix in ("tiny-", "smollm2-shape-"):
        if name.startswith(prefix):
            if name.removeprefix(prefix) in ARCHITECTURES:
                return None
            return f"{prefix}<arch> takes arch in {sorted(ARCHITECTURES)}; got {name!r}"
    return f"must be one of {', '.join(NAMES)} (PATH: a folder with a transformers checkpoint); got {name!r}, not a folder"


@contextmanager
def hf_bars(progress: bool) -> Iterator[None]:
    """transformers' own progress bars (loading or writing weights) switched off inside the block unless
    ``progress``, and back as they were after it."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown and not progress:
            hf_logging.enable_progress_bar()


def load_model(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, progress: bool = True) -> Model:
    """Load the model called ``name`` (see the module docstring) on ``device`` in ``dtype``; ``progress``:
    transformers' bar over a checkpoint folder's weights (the other names load without one)."""
    from .. import models

    if name == "smollm2":
        return models.smollm2(dtype=dtype, device=device)
    if name in ("llama-1b-random", "llama1b"):  # the spellings name_error accepts
        return models.llama_1b_random(dtype=dtype, device=device)
    if name == "tiny" or name.startswith("tiny-"):
        arch = name.removeprefix("tiny-") if name != "tiny" else "llama"
        if arch not in models.ARCHITECTURES:
            raise ValueError(
                f"model must be tiny-<arch> with arch in {sorted(models.ARCHITECTURES)}; got {name!r}"
            )
        return Model(models.tiny(arch, seed=0, dtype=dtype).hf.to(device), None)
    if name.startswith("smollm2-shape-") and name.removeprefix("smollm2-shape-") in models.ARCHITECTURES:
        shaped = models.tiny(name.removeprefix("smollm2-shape-"), seed=0, dtype=dtype, **SMOLLM2_SHAPE)
        return Model(shaped.hf.to(device), None)
    path = Path(name)
    if not path.is_dir():
        raise ValueError(
            f"model must be one of {', '.join(NAMES)} (PATH: a folder with a transformers checkpoint); got {name!r}"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path) if any(path.glob("tokenizer*")) else None
    with hf_bars(progress):
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    hf.to(device)  # type: ignore[arg-type]  # transformers' stubs type .to()'s first argument oddly
    hf.eval()
    return Model(hf, tokenizer)


def sync(device: str) -> None:
    """Wait for queued GPU work (no-op on CPU), so timings and memory readings are complete."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
