"""Safetensors files of a checkpoint folder: which ones, what format the folder is, and reading them.

A folder holds either ``model.safetensors`` or ``model.safetensors.index.json`` naming shards. Reading
goes through ``safetensors.safe_open`` (memory-mapped) for checkpoints llmspeed loads whole, or
:func:`stream_tensors` (plain reads of one tensor at a time, so the file's pages do not stay resident)
for quantize-while-loading.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
NATIVE = "llmspeed"  # the "format" metadata of llmspeed's own model.safetensors

# safetensors dtype names -> torch dtypes (the ones checkpoints of causal LMs use)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def shard_files(directory: Path) -> list[Path]:
    """The safetensors files of ``directory`` (one, or the shards its index names), in index order."""
    if (directory / SINGLE).is_file():
        return [directory / SINGLE]
    if (directory / INDEX).is_file():
        try:
            weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{directory / INDEX} is unreadable ({err}); it needs a 'weight_map'") from err
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise ValueError(f"{directory / INDEX} names shards that are missing: {missing[:3]}")
        return [directory / n for n in names]
    raise ValueError(f"{directory} holds neither {SINGLE} nor {INDEX}: pass the folder that llmspeed.save, "
                     f"transformers' save_pretrained or a Hugging Face download wrote (its weights in safetensors)")


def read_config(directory: Path, name: str = "config.json") -> dict:
    """``directory / name`` as a dict (``ValueError`` naming the file when missing, not JSON or not an object)."""
    path = directory / name
    if not path.is_file():
        raise ValueError(f"{directory} has no {name}; a checkpoint folder needs one")
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object; got a {type(data).__name__}")
    return data


def quantization_config(directory: Path) -> dict | None:
    """The folder's quantization settings: ``config.json``'s ``quantization_config``, else AutoGPTQ's older
    ``quantize_config.json`` (``quant_method`` ``"gptq"`` unless it says otherwise); ``None`` for a float folder."""
    quant = read_config(directory).get("quantization_config")
    if quant is None and (directory / "quantize_config.json").is_file():
        quant = {"quant_method": "gptq", **read_config(directory, "quantize_config.json")}
    if quant is not None and not isinstance(quant, dict):
        raise ValueError(f"{directory / 'config.json'} field quantization_config must be an object; got {quant!r}")
    return quant


def start_folder(root: torch.nn.Module, directory: Path) -> None:
    """Ready ``directory`` for one model's files: created if needed, ``generation_config.json`` of ``root`` written
    (end-of-sequence ids, sampling defaults), and a weights index an earlier sharded save left removed with the
    shards it names, as ``save_pretrained`` cleans up: readers that follow an index (vLLM's) would load those
    stale weights instead of the new ``model.safetensors``."""
    directory.mkdir(parents=True, exist_ok=True)
    generation_config = getattr(root, "generation_config", None)
    if generation_config is not None:  # validated by transformers first: nothing else is written when it raises
        generation_config.save_pretrained(directory)
    if (directory / INDEX).is_file():
        try:
            stale = set(json.loads((directory / INDEX).read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):  # unreadable: the index alone goes
            stale = set()
        for name in stale:  # shard files of this folder only (no paths), never the new weights
            if isinstance(name, str) and Path(name).name == name and name.endswith(".safetensors") and name != SINGLE:
                (directory / name).unlink(missing_ok=True)
        (directory / INDEX).unlink()


# Where transformers' tokenizer save_pretrained writes chat templates, and from_pretrained finds them
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
CHAT_TEMPLATE_DIR = "additional_chat_templates"


def save_tokenizer(tokenizer: Any, directory: Path) -> None:
    """``tokenizer.save_pretrained(directory)`` after removing the chat templates an earlier save left: a tokenizer
    without a template writes none, and ``from_pretrained`` would give it the old one (transformers' own
    ``save_pretrained`` leaves them too)."""
    for name in CHAT_TEMPLATE_FILES:
        (directory / name).unlink(missing_ok=True)
    extra = directory / CHAT_TEMPLATE_DIR
    if extra.is_dir():
        for path in extra.glob("*.jinja"):
            path.unlink()
        if not any(extra.iterdir()):
            extra.rmdir()
    tokenizer.save_pretrained(directory)


def detect(directory: str | Path) -> str:
    """``"llmspeed"``, ``"compressed-tensors"``, ``"gptq"``, ``"awq"`` or ``"float"`` (a plain transformers folder).

    Raises:
        ValueError: no such folder, no safetensors files, or a quantization method llmspeed cannot read
            (bitsandbytes, ...), named in the message.
    """
    from safetensors import safe_open

    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(
            f"{directory} is not a folder; pass the folder llmspeed.save or save_pretrained wrote"
        )
    files = shard_files(directory)
    try:
        with safe_open(str(files[0]), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error type for bad headers
        raise ValueError(f"{files[0]} is corrupt or truncated ({err}); save the model again") from err
    if metadata.get("format") == NATIVE:
        return NATIVE
    quant = quantization_config(directory)
    if quant is None:
        return "float"
    method = quant.get("quant_method")
    if method in ("compressed-tensors", "gptq", "awq"):
        return method
    raise ValueError(
        f"{directory} is quantized with quant_method={method!r}; llmspeed.load reads llmspeed, "
        f"compressed-tensors (pack-quantized), GPTQ and AWQ (GEMM) folders; load a float checkpoint and call "
        f"llmspeed.quantize instead"
    )


def stream_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of one safetensors file, each read into its own buffer, in file order.

    Unlike ``safe_open`` nothing is memory-mapped, so a tensor's pages are freed once the caller drops it.
    """
    with open(path, "rb") as f:
        try:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        except (struct.error, ValueError) as err:
            raise ValueError(f"{path} is corrupt or truncated ({err})") from err
        header.pop("__metadata__", None)
        base = 8 + length
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(
                    f"{path}: tensor {name!r} has dtype {info['dtype']}, which llmspeed does not read"
                )
            start, end = info["data_offsets"]
            out = torch.empty(info["shape"], dtype=dtype)
            f.seek(base + start)
            view = out.view(-1).view(torch.uint8) if out.numel() else out
            if f.readinto(view.numpy().data) != end - start:
                raise ValueError(f"{path}: tensor {name!r} is truncated")
            yield name, out


def read_metadata(path: Path, advice: str = "") -> dict[str, str]:
    """The metadata of safetensors file ``path`` (``{}`` when it has none); ``ValueError`` naming the file (and
    ``advice``, appended) when its header cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as err:  # safetensors raises its own error type for bad headers
        raise ValueError(f"{path} is corrupt or truncated ({err}){advice}") from err


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file of ``directory`` (memory-mapped reads)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in shard_files(directory):
        try:
            tensors.update(load_file(str(path)))
        except Exception as err:  # safetensors raises its own error type for bad files
            raise ValueError(f"{path} is corrupt or truncated ({err})") from err
    return tensors


def config_dtype(config: dict) -> torch.dtype:
    """The weight dtype ``config.json`` names (``dtype`` or the older ``torch_dtype``; fp32 when absent)."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"config.json names dtype {name!r}, which is not a floating-point torch dtype")
    return dtype
