"""``save``/``load``: llmspeed's own folder format, and the dispatch to the standard formats.

``save(model, path, format="compressed-tensors")`` writes what transformers and vLLM load
(:mod:`.formats.compressed_tensors`); ``load`` reads llmspeed, compressed-tensors, GPTQ and AWQ (GEMM) folders
(:func:`.formats.detect` tells which) and GGUF files (:mod:`.formats.gguf_load`).

Folder layout written by :func:`save`::

    model.safetensors   every parameter and persistent buffer (packed codes, scales, zeros, float weights);
                        metadata: {"format": "llmspeed", "version": "2", "dtype", "quantization": JSON
                        {layer name: QuantConfig.to_dict()}, "aliases": JSON {tied name: stored name},
                        "embeddings" (only when there are any): JSON {input embedding: quantized head it
                        reads, :class:`~llmspeed.quant.embedding.QuantizedEmbedding`}}
    config.json         the transformers config (the architecture to rebuild), with a ``quantization_config``
                        that transformers refuses with a message naming llmspeed (see :data:`NATIVE_MARKER`)
    generation_config.json  end-of-sequence ids and sampling defaults, as ``save_pretrained`` writes them
    tokenizer files     when the model has a tokenizer

:func:`load` builds the architecture with its parameters on the ``meta`` device (no float weight is
allocated or initialised), puts empty quantized skeletons at the quantized positions, then assigns the
stored tensors after checking each one's dtype and shape (and each alias's target) against the module
that receives it: the result is bit-exact, and a modified file raises a ``ValueError`` naming the tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from ..model import Model, as_model
from ..names import check_device, folder_path
from ..protocol import CausalLM, base_linear, is_fake_quantized
from .config import ACTIVATIONS, QuantConfig
from .embedding import share_tied_embedding, shared_embeddings
from .formats import awq, compressed_tensors, gguf_file, gguf_load, gptq, skeleton
from .formats.files import detect, read_config, read_metadata, save_tokenizer, start_folder
from .modules import QuantizedLinearBase
from .primitives import SCALE_DTYPE, SYMMETRIC_ZERO

WEIGHTS = "model.safetensors"
FORMAT = "llmspeed"
VERSION = "2"  # 2: 4-bit scales and zero points in fp16 (version 1 stored fp32; read and rounded to fp16)
READS = ("1", VERSION)
SAVE_FORMATS = ("llmspeed", "compressed-tensors", "gguf")
# config.json's quantization_config in a native folder. transformers knows quant_method "gptq", builds its
# config and rejects ``bits`` with "Only support quantization to [2,3,4,8] bits but found <bits>", so
# from_pretrained fails with this text instead of loading random linears (an unknown quant_method is only
# a warning there). vLLM's GPTQ config checks ``bits`` the same way (not run here). llmspeed.load ignores it.
NATIVE_MARKER = {
    "quant_method": "gptq",
    "bits": "llmspeed-native: this folder is llmspeed's own format; load it with llmspeed.load(path), or write "
    "one transformers and vLLM read with llmspeed.save(model, path, format='compressed-tensors')",
    "llmspeed_format": FORMAT,
}


def save(model: CausalLM, directory: str | Path, format: str = "llmspeed") -> Path:
    """Write ``model`` to folder ``directory``; return the folder path.

    Args:
        model: The model, quantized or not (a transformers causal LM is wrapped first).
        directory: The folder (created if needed; a weights index and the shards it names, left there by an earlier
            sharded save, are removed so that no reader loads them instead).
        format: ``"llmspeed"`` (int8, int4, NF4, HQQ, act-order; read back bit-exact by :func:`load`) or
            ``"compressed-tensors"`` (int8 per channel and int4 group-wise, symmetric or asymmetric: the
            folder ``transformers.AutoModelForCausalLM.from_pretrained`` and ``vllm serve`` load) or ``"gguf"``
            (``directory`` names one file: int4 as ``Q4_0``/``Q4_1``, int8 as ``Q8_0``, the file llama.cpp,
            Ollama and LM Studio run; :mod:`.formats.gguf_file`).

    Raises:
        ValueError: an unknown ``format``, or a model the format cannot hold (named in the message): LoRA
            adapters (saved apart, :func:`llmspeed.lora.save_adapter`), layers prepared for
            quantization-aware training (:func:`llmspeed.qat.convert` them first); before anything is written.
        TypeError: ``model`` is neither an llmspeed model nor a transformers causal LM.
    """
    if format not in SAVE_FORMATS:
        raise ValueError(f"format must be one of {list(SAVE_FORMATS)}; got {format!r}")
    if format == "gguf" and not isinstance(directory, (str, os.PathLike)):  # one file, not a folder
        raise TypeError(f"directory must be a file path for format='gguf' (a str or pathlib.Path); got {directory!r}")
    target = Path(directory) if format == "gguf" else folder_path(directory, "directory", write=True)
    model = as_model(model)  # a transformers model is wrapped, as the other verbs do
    for name, module in model.linear_layers():  # what load() could not rebuild: refused before writing
        if is_fake_quantized(module):
            raise ValueError(
                f"layer {name!r} is prepared for quantization-aware training, which llmspeed.load cannot "
                f"rebuild; call llmspeed.qat.convert(model) before saving"
            )
        if format == "llmspeed" and base_linear(module) is not module:
            raise ValueError(
                f"layer {name!r} carries LoRA adapters ({type(module).__name__}), which llmspeed.load cannot "
                f"rebuild; save them with lora.save_adapter and the model without them (lora.delete_adapter), "
                f"or merge them in and take the wrappers off (lora.merge_and_unload)"
            )
    if format == "compressed-tensors":
        return compressed_tensors.save(model, target)
    if format == "gguf":
        return gguf_file.save(model, target)
    directory = target
    from safetensors.torch import save_file

    root = model.module
    start_folder(root, directory)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_by_storage: dict[tuple, str] = {}
    for name, tensor in root.state_dict().items():
        key = (
            str(tensor.device),
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
        )
        if key in first_by_storage:
            aliases[name] = first_by_storage[key]
            continue
        first_by_storage[key] = name
        tensors[name] = tensor.detach().to("cpu").contiguous()
    quant = {
        name: m.config.to_dict() for name, m in model.linear_layers() if isinstance(m, QuantizedLinearBase)
    }
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": str(model.spec.dtype).removeprefix("torch."),
        "quantization": json.dumps(quant),
        "aliases": json.dumps(aliases),
    }
    shared = shared_embeddings(model)
    if shared:  # absent otherwise: folders without a shared embedding stay readable by older llmspeed
        metadata["embeddings"] = json.dumps(shared)
    save_file(tensors, str(directory / WEIGHTS), metadata=metadata)
    config = getattr(root, "config", None)
    if config is not None:
        config.save_pretrained(directory)
        _mark_native(directory / "config.json")
    if model.tokenizer is not None:
        save_tokenizer(model.tokenizer, directory)
    return directory


def _mark_native(path: Path) -> None:
    data = json.loads(path.read_text())
    data["quantization_config"] = NATIVE_MARKER
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _not_checkpoint(directory: Path, why: str) -> ValueError:
    return ValueError(
        f"{directory} is not an llmspeed checkpoint ({why}); write one with llmspeed.save(model, directory), "
        f"or load a plain transformers folder with llmspeed.wrap(AutoModelForCausalLM.from_pretrained(...))"
    )


def _read_metadata(directory: Path) -> dict[str, str]:
    path = directory / WEIGHTS
    if not path.is_file() or not (directory / "config.json").is_file():
        raise _not_checkpoint(directory, f"it needs {WEIGHTS} and config.json")
    metadata = read_metadata(path, "; save the model again")
    if metadata.get("format") != FORMAT:
        raise _not_checkpoint(directory, f"{WEIGHTS} has no llmspeed metadata")
    if metadata.get("version") not in READS:
        raise ValueError(
            f"{path} has llmspeed format version {metadata.get('version')!r}; this llmspeed reads {READS!r}"
        )
    read_config(directory)  # a truncated or damaged config.json is a ValueError naming it (transformers: OSError)
    return metadata


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:
        raise ValueError(f"{path} is corrupt or truncated ({err}); save the model again") from err


def load(directory: str | Path, device: str | torch.device = "cpu", activations: str | None = None) -> Model:
    """Load an llmspeed, compressed-tensors (pack-quantized), GPTQ or AWQ (GEMM) folder, or a GGUF file, as llmspeed
    packed modules.

    The architecture is built on ``meta`` and every stored tensor lands in its packed module
    without a float copy of a quantized weight; llmspeed folders come back bit-exact. In compressed-tensors,
    GPTQ and AWQ folders, float tensors stored in a dtype other than ``config.json``'s are cast to the model's
    dtype, as transformers' ``from_pretrained`` does (packed integer tensors are read as stored). A GGUF file (what
    llama.cpp runs) keeps its ``Q4_0``, ``Q4_1``, ``Q4_K``, ``Q6_K`` and ``Q8_0`` codes and computes in float32
    (:mod:`.formats.gguf_load`).

    ``activations``: ``None`` (default) keeps what the checkpoint says (llmspeed folders store
    ``QuantConfig.activations``; the other formats load with float activations); ``"int8"`` gives every quantized
    linear dynamic int8 activations in blocks of 32 channels (``quantize(..., activations="int8")``), as llama.cpp
    computes a GGUF file's quantized layers (its ``Q8_0`` / ``Q8_1`` activations): on CPUs with AVX2 the decode step
    then multiplies integer codes; ``"float"`` the reverse.

    Raises:
        ValueError: ``activations`` is not ``None``, ``"float"`` or ``"int8"`` (before anything is read),
            ``device`` is not usable here (``"cuda"`` without CUDA), the path is missing or a file that is not GGUF,
            the folder is none of these formats, or a tensor is corrupt, truncated, missing,
            of the wrong dtype or shape, or an alias names a parameter that does not match (the message
            names the tensor).
    """
    if activations is not None and activations not in ACTIVATIONS:
        raise ValueError(f"activations must be None (as the checkpoint says) or one of {list(ACTIVATIONS)}; "
                         f"got {activations!r}")
    directory = folder_path(directory, "directory")
    check_device(device)
    model = _load_any(directory, device)
    if activations is not None:
        _set_activations(model, activations)
    return model


def _load_any(directory: Path, device: str | torch.device) -> Model:
    if directory.is_file():
        if _is_gguf(directory):
            return gguf_load.load(directory, device)
        raise _not_checkpoint(directory, "a file, not a folder: pass the folder llmspeed.save wrote, or a GGUF file")
    if not directory.is_dir():
        raise _not_checkpoint(directory, "no such folder")
    kind = detect(directory)
    if kind == "compressed-tensors":
        return compressed_tensors.load(directory, device)
    if kind == "gptq":
        return gptq.load(directory, device)
    if kind == "awq":
        return awq.load(directory, device)
    return _load_native(directory, device)


def _set_activations(model: Model, activations: str) -> None:
    """Give every quantized linear of a model just loaded (no Generator has read it yet) ``activations``."""
    layers = [m for _, m in model.linear_layers() if isinstance(m, QuantizedLinearBase)]
    for module in layers:  # every layer's config validated before any layer changes
        dataclasses.replace(module.config, activations=activations)
    for module in layers:
        module.set_activations(activations)


def _is_gguf(path: Path) -> bool:
    """Whether file ``path`` starts with GGUF's magic bytes."""
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _load_native(directory: Path, device: str | torch.device) -> Model:
    metadata = _read_metadata(directory)
    source = directory / WEIGHTS
    try:
        quant = {
            name: QuantConfig.from_dict(cfg) for name, cfg in json.loads(metadata["quantization"]).items()
        }
        aliases: dict[str, str] = json.loads(metadata["aliases"])
        shared: dict[str, str] = json.loads(metadata.get("embeddings", "{}"))
        dtype = getattr(torch, metadata["dtype"])
        if not isinstance(dtype, torch.dtype) or not isinstance(aliases, dict) or not isinstance(shared, dict):
            raise TypeError(f"dtype {metadata['dtype']!r} or aliases {type(aliases).__name__}")
    except (KeyError, ValueError, AttributeError, TypeError) as err:
        raise ValueError(f"{source} has unreadable llmspeed metadata ({err}); save the model again") from err
    tensors = _read_tensors(source)
    if metadata["version"] == "1":  # fp32 4-bit scales and zeros: rounded to the fp16 the modules now hold
        for name, cfg in quant.items():
            for key in (f"{name}.scales", f"{name}.zeros") if cfg.format != "int8" else ():
                if key in tensors and tensors[key].dtype == torch.float32:
                    tensors[key] = tensors[key].to(SCALE_DTYPE)
    for name, cfg in quant.items():  # symmetric=True is the format exports write without zero points
        zeros = tensors.get(f"{name}.zeros")
        if cfg.format == "int4" and cfg.symmetric and zeros is not None and not bool((zeros == SYMMETRIC_ZERO).all()):
            raise ValueError(
                f"{source}: layer {name!r} is symmetric=True in the file's quantization metadata, but its zeros are not "
                f"all {SYMMETRIC_ZERO:g} (an asymmetric layer); the folder was modified after llmspeed.save"
            )
    model = skeleton.skeleton(directory, dtype)
    for name, cfg in quant.items():
        if name not in model.linear_names():
            raise ValueError(f"{source}: quantized layer {name!r} is not a linear position of this architecture")
        skeleton.install(model, name, cfg, bias=f"{name}.bias" in tensors)
    for embedding, head in shared.items():
        _share(model, embedding, head, quant, source)
    want = skeleton.expected(model)
    for name, stored in aliases.items():  # before the key check, so a bad alias is named as such
        skeleton.alias_target(name, stored, source, want, stored_names=tensors.keys())
    needed = set(want) - set(aliases)
    missing, unexpected = sorted(needed - set(tensors)), sorted(set(tensors) - needed)
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}; "
            f"the folder was modified after llmspeed.save"
        )
    for name, tensor in tensors.items():
        skeleton.assign(model, name, tensor, source, want)
    for name, stored in aliases.items():
        skeleton.alias(model, name, stored, source, want)
    return skeleton.finish(model, dtype, device, source)


def _share(model: Model, embedding: str, head: str, quant: dict[str, QuantConfig], source: Path) -> None:
    """Install the quantized tied embedding the file records, after checking both names."""
    root = model.hf  # model.module, typed as the transformers model it is
    names = {id(m): n for n, m in root.named_modules()}
    actual = names.get(id(root.get_input_embeddings()))
    if embedding != actual or head not in quant:
        raise ValueError(
            f"{source}: the shared embedding {embedding!r} -> {head!r} does not match this architecture "
            f"(input embedding {actual!r}, quantized layers {sorted(quant)[:3]}...); the folder was modified"
        )
    share_tied_embedding(model, head)
