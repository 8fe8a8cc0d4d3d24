"""GGUF files, what llama.cpp, Ollama and LM Studio run: written by ``llmspeed.save(model, "m.gguf", format="gguf")``.

The quantized layers keep their codes (:mod:`.gguf_blocks`): symmetric int4 becomes ``Q4_0`` bit for bit,
asymmetric int4 ``Q4_1`` (the offset ``-zero * scale`` rounded to fp16), int8 ``Q8_0`` (the row scale rounded
to fp16, or the group scales as they are); a group of 64 or 128 channels is two or four 32-channel blocks with the
group's scale. int8 at group 16 (``Q6_K`` read from a GGUF file) is written dequantized, with a warning. So a model
quantized with GPTQ, AWQ or QAT here runs in llama.cpp with the codes chosen here, not requantized by
``llama-quantize``. Float layers are written in the model's dtype (F32, F16 or BF16), norms in F32.

Tensor names and architecture fields are llama.cpp's (through the ``gguf`` package's name map) for the
families :data:`ARCHITECTURES` lists (Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` are llama.cpp's ``attn_qkv`` and
``ffn_up`` as they are); llama and Mistral (llama.cpp's ``llama``) store the rows of the query
and key projections in llama.cpp's rotary order (:func:`rotary_rows`), as its converter does and
transformers' GGUF reader undoes. A tied output head is not stored: the readers use ``token_embd``
(quantized, when llmspeed shares the quantized head with the embedding). The tokenizer, when the model has
one, is written by :mod:`.gguf_vocab`. Models the format cannot hold are refused, naming the layer, before
anything is written; the file appears complete or not at all (written beside, then renamed).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...protocol import CausalLM, base_linear
from ..embedding import shared_embeddings
from ..modules import Int4Linear, Int8Linear, QuantizedLinearBase
from . import gguf_blocks, gguf_vocab

# transformers model_type -> llama.cpp architecture (Mistral is llama.cpp's "llama")
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3"}
_FLOAT_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q4_0": "MOSTLY_Q4_0",
               "Q4_1": "MOSTLY_Q4_1", "Q8_0": "MOSTLY_Q8_0"}  # fmt: skip


def refusal(name: str, module: nn.Module) -> str | None:
    """Why the linear layer at ``name`` cannot be written as GGUF, or ``None``."""
    if base_linear(module) is not module:
        return (
            f"layer {name!r} carries LoRA adapters: merge them in and take the wrappers off "
            f"(lora.merge_and_unload), or take them off (lora.delete_adapter) and save them with lora.save_adapter"
        )
    if not isinstance(module, QuantizedLinearBase):
        return None
    cfg = module.config
    if cfg.format == "nf4":
        return f"layer {name!r} is NF4, which GGUF has no type for: quantize with format='int4' or 'int8'"
    if cfg.act_order or cfg.hadamard:
        what = "permuted input columns (act_order)" if cfg.act_order else "Hadamard-rotated groups"
        return f"layer {name!r} has {what}, which llama.cpp's blocks cannot describe; keep format='llmspeed'"
    if as_floats(module):
        return None
    if module.in_features % gguf_blocks.QK or (cfg.group_size is not None and cfg.group_size % gguf_blocks.QK):
        return (
            f"layer {name!r} has in_features={module.in_features} and group_size={cfg.group_size}; GGUF blocks are "
            f"32 input channels, so both must be multiples of 32 (or None: one scale per row)"
        )
    return None


def as_floats(module: QuantizedLinearBase) -> bool:
    """Whether the export writes ``module`` as its dequantized float weight: int8 whose groups are shorter than a
    ``Q8_0`` block (group 16: a ``Q6_K`` layer read from a GGUF file), which no block type llmspeed writes holds."""
    g = module.config.group_size
    return module.config.format == "int8" and g is not None and g % gguf_blocks.QK != 0


def rotary_rows(rows: int, heads: int) -> torch.Tensor:  # [rows] int64
    """Row order of a llama query/key projection in a GGUF file: within each head, the first and second half
    of the rotary pairs interleaved (``new[h, i, j] = old[h, j, i]`` over ``[heads, 2, rows / heads / 2]``)."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def _quantized(module: QuantizedLinearBase, rows: torch.Tensor) -> tuple[np.ndarray, str]:
    """The blocks of ``module``'s rows ``rows`` and their GGUF type name."""
    k = module.in_features
    if isinstance(module, Int8Linear):  # one scale per row, or per group of a multiple of 32
        d = gguf_blocks.block_values(module.scales.detach().float()[rows], module.config.group_size, k)  # [out, k / 32]
        return gguf_blocks.q8_0(module.qweight[rows].cpu(), d.cpu()), "Q8_0"
    assert isinstance(module, Int4Linear)
    g = module.config.group_size
    codes = module.codes(rows).cpu()[:, :k]  # [out, k] uint8
    scales = module.scales.detach().float()[rows].cpu()  # [out, groups]
    zeros = module.zeros.detach().float()[rows].cpu()  # [out, groups]
    d = gguf_blocks.block_values(scales, g, k)
    if bool((zeros == 8).all()):
        return gguf_blocks.q4_0(codes, d), "Q4_0"
    return gguf_blocks.q4_1(codes, d, gguf_blocks.block_values(-zeros * scales, g, k)), "Q4_1"


def _floats(t: torch.Tensor, dtype: torch.dtype) -> tuple[np.ndarray, str]:
    """A float tensor as stored: 1-D tensors (norms, biases) in F32, others in the model's float type."""
    t = t.detach().cpu()
    kind = "F32" if t.dim() == 1 or dtype not in _FLOAT_TYPES else _FLOAT_TYPES[dtype]
    if kind == "BF16":
        return t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy(), kind  # [rows, 2 * cols] bytes
    return t.to(torch.float16 if kind == "F16" else torch.float32).contiguous().numpy(), kind


def _rope(config: Any) -> dict[str, Any]:
    """The config's rope parameters (transformers 5's ``rope_parameters``, else ``rope_scaling``)."""
    return getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}


def _rope_theta(config: Any) -> float:
    params = _rope(config)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default" and not (kind == "longrope" and config.model_type == "phi3"):
        raise ValueError(f"cannot save format='gguf': rope scaling {kind!r} is not written by this export (it writes "
                         f"Phi-3's longrope)")  # fmt: skip
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def long_rope(config: Any) -> dict[str, Any] | None:
    """Phi-3's LongRoPE parameters (``None`` without): the factor tables, the pre-scaling context and the attention
    factor, computed as transformers computes it when the config leaves it out."""
    params = _rope(config)
    if params.get("rope_type", params.get("type")) != "longrope":
        return None
    orig = int(params.get("original_max_position_embeddings") or config.original_max_position_embeddings)
    factor = params.get("factor") or config.max_position_embeddings / orig
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    return {"long": params["long_factor"], "short": params["short_factor"], "original": orig,
            "attention": float(attention)}  # fmt: skip


def _fields(config: Any, arch: str) -> dict[str, Any]:
    """The architecture's fields (without the ``<arch>.`` prefix), as llama.cpp's converter writes them."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    fields: dict[str, Any] = {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers,
        "feed_forward_length": config.intermediate_size,
        "attention.head_count": heads,
        "attention.head_count_kv": getattr(config, "num_key_value_heads", None) or heads,
        "rope.freq_base": _rope_theta(config),
        "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "rope.dimension_count": head_dim,
        "vocab_size": config.vocab_size,
    }
    if head_dim * heads != config.hidden_size:
        fields["attention.key_length"] = fields["attention.value_length"] = head_dim
    if arch == "phi3":  # as llama.cpp's converter: rotary width, pre-scaling context, window (0: none)
        partial = _rope(config).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
        fields["rope.dimension_count"] = int(head_dim * float(partial))
        fields["rope.scaling.original_context_length"] = int(
            getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)
        fields["attention.sliding_window"] = int(getattr(config, "sliding_window", None) or 0)
        scaled = long_rope(config)
        if scaled is not None:  # the factor tables go in as tensors (rope_factors_long / _short)
            fields["rope.scaling.original_context_length"] = scaled["original"]
            fields["rope.scaling.attn_factor"] = scaled["attention"]
    return fields


def namer(config: Any, arch: str) -> Callable[[str], tuple[str, int | None] | None]:
    """``name(module)``: the GGUF name of transformers module ``module``'s tensors (``None`` if it has none) and,
    for llama's query and key projections, the heads whose rows the file keeps in rotary order (else ``None``)."""
    gguf = require_gguf()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    heads_of = {"attn_q": config.num_attention_heads,
                "attn_k": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}  # fmt: skip

    def name(hf: str) -> tuple[str, int | None] | None:
        mapped = names.get_name(hf)
        if mapped is None:
            return None
        return mapped, heads_of.get(mapped.rsplit(".", 1)[-1]) if arch == "llama" else None

    return name


def _tensors(model: CausalLM, arch: str) -> dict[str, tuple[np.ndarray, str]]:
    """Every stored tensor under its GGUF name: ``{name: (array, GGUF type name)}``."""
    root = model.module
    name_of = namer(getattr(root, "config", None), arch)

    def gguf_name(hf: str, suffix: str) -> tuple[str, int | None]:
        found = name_of(hf)
        if found is None:
            raise ValueError(f"cannot save format='gguf': no GGUF tensor name for {hf!r} ({arch})")
        return f"{found[0]}.{suffix}", found[1]

    def order(rows: int, heads: int | None) -> torch.Tensor:
        return rotary_rows(rows, heads) if heads else torch.arange(rows)

    quantized = {n: m for n, m in model.linear_layers() if isinstance(m, QuantizedLinearBase)}
    shared = {head: embedding for embedding, head in shared_embeddings(model).items()}
    out: dict[str, tuple[np.ndarray, str]] = {}
    floats = [n for n, m in quantized.items() if as_floats(m)]
    if floats:
        warnings.warn(f"{len(floats)} int8 layer(s) at group 16 (e.g. {floats[0]!r}: Q6_K read from a GGUF file) are "
                      f"written dequantized, in the model's float type: GGUF's Q8_0 blocks hold one scale per 32 "
                      f"channels", stacklevel=4)  # fmt: skip
    for name, module in quantized.items():
        target, heads = gguf_name(shared.get(name, name), "weight")
        rows = order(module.out_features, heads)
        if name in floats:
            out[target] = _floats(module.dequantize(torch.float32, rows).cpu(), model.spec.dtype)
        else:
            out[target] = _quantized(module, rows)
        if module.bias is not None:
            bias_name, _ = gguf_name(name, "bias")
            out[bias_name] = _floats(module.bias[order(module.out_features, heads)], model.spec.dtype)
    prefixes = tuple(f"{n}." for n in quantized)
    seen: set[tuple] = set()
    for name, tensor in root.state_dict().items():
        same = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if name.startswith(prefixes) or same in seen:  # a tied head: the readers take token_embd
            continue
        seen.add(same)
        module_name, suffix = name.rsplit(".", 1)
        target, heads = gguf_name(module_name, suffix)
        out[target] = _floats(tensor[order(tensor.shape[0], heads)] if heads else tensor, model.spec.dtype)
    return out


def _file_type(tensors: dict[str, tuple[np.ndarray, str]]) -> str:
    """llama.cpp's ``general.file_type``: the type holding most of the 2-D weights' elements."""
    counts: dict[str, int] = {}
    for array, kind in tensors.values():
        if array.ndim != 2:
            continue
        if kind in gguf_blocks.BLOCK_BYTES:  # rows of bytes: each block holds QK weights
            elements = array.size // gguf_blocks.BLOCK_BYTES[kind] * gguf_blocks.QK
        else:  # F32 / F16 values, or BF16 as two bytes each
            elements = array.size // 2 if kind == "BF16" else array.size
        counts[kind] = counts.get(kind, 0) + elements
    return max(counts, key=lambda k: counts[k]) if counts else "F32"


def require_gguf() -> Any:
    """The ``gguf`` package (llama.cpp's own reader, writer and tensor names), or an ``ImportError`` saying how to get it."""
    try:
        import gguf
    except ImportError as err:
        raise ImportError(
            "reading and writing GGUF files needs the gguf package: pip install 'llmspeed[gguf]' (or gguf)"
        ) from err
    return gguf


def save(model: CausalLM, path: str | Path) -> Path:
    """Write ``model`` as the GGUF file ``path`` (see the module docstring); return the path."""
    gguf = require_gguf()

    config: Any = getattr(model.module, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"cannot save format='gguf': model_type {model_type!r} is not written by this export; it writes "
            f"{sorted(ARCHITECTURES)}"
        )
    for name, module in model.linear_layers():
        reason = refusal(name, module)
        if reason is not None:
            raise ValueError(f"cannot save format='gguf': {reason}")
    arch = ARCHITECTURES[model_type]
    fields = _fields(config, arch)
    vocab = gguf_vocab.metadata(model.tokenizer, config.vocab_size) if model.tokenizer is not None else {}
    tensors = _tensors(model, arch)
    scaled = long_rope(config) if arch == "phi3" else None
    if scaled is not None:  # as llama.cpp's converter: one fp32 factor per rotary frequency
        tensors["rope_factors_long.weight"] = (np.asarray(scaled["long"], np.float32), "F32")
        tensors["rope_factors_short.weight"] = (np.asarray(scaled["short"], np.float32), "F32")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path must be a file for format='gguf' (e.g. 'model.gguf'); {str(path)!r} is a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch)
    try:
        # a bare "mistral" would make transformers' reader look for a gguf-py architecture of that name
        writer.add_name(Path(str(getattr(config, "_name_or_path", ""))).name or f"llmspeed-{model_type}")
        for key, value in fields.items():
            _add(writer, f"{arch}.{key}", value)
        writer.add_file_type(gguf.LlamaFileType[_FILE_TYPES[_file_type(tensors)]])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in vocab.items():
            _add(writer, key, value)
        for name, (array, kind) in tensors.items():
            raw = gguf.GGMLQuantizationType[kind] if array.dtype == np.uint8 else None
            writer.add_tensor(name, array, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return path


def _add(writer: Any, key: str, value: Any) -> None:
    """One metadata field with GGUF's type for it: ``bool``, ``uint32`` counts and ids, ``float32``, string, array."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))
