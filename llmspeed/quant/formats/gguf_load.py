"""GGUF files read into llmspeed's packed modules: ``llmspeed.load("model.gguf")``.

The types llmspeed has kernels for keep their codes: ``Q4_0`` becomes symmetric int4 (``Int4Linear``, zero points 8)
bit for bit; ``Q4_1`` asymmetric int4 with zero point ``-m / d`` rounded to fp16 (within that rounding of the file's
values: a few thousandths of a step; a zero point within ``m``'s own fp16 rounding of a whole number is that number,
so llmspeed's asymmetric int4 comes back exact); ``Q4_K`` (the K-quant most files on the Hub are mostly made of)
the same way at group 32, each sub-block's scale ``d * sc`` and offset ``-dmin * m`` read as ``Q4_1``'s ``d`` and
``m``, the scale rounded to fp16 too; ``Q8_0`` becomes ``Int8Linear`` bit for bit: with one scale per row where
its blocks share one (what llmspeed writes), else group-wise at 32 (llama.cpp's own); ``Q6_K`` (the head, value and
half the down projections of a ``Q4_K_M`` file) group-wise int8 at 16, its codes minus 32 and each 16 channels'
scale ``d * sc`` rounded to fp16. Blocks that share their scale (and offset) over 64 or 128 channels read back as one
group of that size, so a file llmspeed wrote returns with the group size it was quantized at. Every other type
(``Q5_*`` and the other K-quants, i-quants) is dequantized to float32 by the ``gguf`` package, and
one warning names them. The model computes in float32, as llama.cpp does; ``llmspeed.cast`` it after loading for
16-bit activations, or load it with ``llmspeed.load(path, activations="int8")`` to round each quantized layer's
input to int8 codes in blocks of 32 channels, as llama.cpp's dot products do (its ``Q8_0`` / ``Q8_1``
activations): the CPU kernels then multiply integers.

The file is read by :mod:`.gguf_read` (its header and tensor table; the vocabulary is not parsed), the config from
its fields as transformers reads them (:func:`config_of`; tests compare it with ``AutoConfig``'s reading), the
tokenizer by transformers (``AutoTokenizer`` with ``gguf_file=``), for the families
:data:`~.gguf_file.ARCHITECTURES` writes (Phi-3's rotary width and LongRoPE tables too, which
transformers' reading drops); llama files' query and key rows are put
back from llama.cpp's rotary order, and a ``rope_freqs`` table (Llama 3.1+'s rope scaling) divides the rotary
frequencies as llama.cpp does. Without an ``output.weight`` the head is tied to ``token_embd``: a 4-bit or
row-scaled ``Q8_0`` one becomes the quantized head the input embedding reads its rows from, as llmspeed's own
shared heads do.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...model import Model
from ..config import QuantConfig
from ..embedding import share_tied_embedding
from ..modules import Int4Linear, Int8Linear
from ..primitives import SCALE_DTYPE, SYMMETRIC_ZERO
from . import gguf_blocks, gguf_file, gguf_read, skeleton

READS = ("llama", "qwen2", "qwen3", "phi3")  # llama.cpp architectures read (Mistral files are "llama")
_WITH_OFFSETS = {"Q4_1": gguf_blocks.read_q4_1, "Q4_K": gguf_blocks.read_q4_k}  # w = d * q + m per 32 channels
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1+ files: the divisor of each rotary frequency (their rope scaling)
LONG_ROPE = ("rope_factors_long.weight", "rope_factors_short.weight")  # Phi-3 128k / 3.5 / 4-mini: LongRoPE
FLOAT_TYPES = ("F32", "F16", "BF16")  # GGUF types read as they are (every other is dequantized or packed)


# transformers config field -> the GGUF field (after "<arch>.") it is read from; what gguf_file._fields writes
CONFIG_FIELDS = {
    "hidden_size": "embedding_length", "intermediate_size": "feed_forward_length", "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count", "num_key_value_heads": "attention.head_count_kv",
    "max_position_embeddings": "context_length", "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base", "head_dim": "attention.key_length", "vocab_size": "vocab_size",
}  # fmt: skip
# tokenizer.ggml.<name>_token_id -> the config field transformers reads it into
TOKEN_IDS = {"bos": "bos_token_id", "eos": "eos_token_id", "padding": "pad_token_id", "unknown": "unk_token_id"}


def config_of(fields: dict[str, Any], arch: str, tensors: dict[str, Any]) -> Any:
    """The transformers config the GGUF ``fields`` describe (architecture ``arch``), in transformers' field names.

    Read here rather than by ``AutoConfig.from_pretrained(gguf_file=...)``, which parses the whole vocabulary again
    (4 s for SmolLM2); checked against it in the tests. Qwen3's head size, which that reader leaves out, is kept.
    """
    from transformers import AutoConfig

    kw = {key: fields[f"{arch}.{name}"] for key, name in CONFIG_FIELDS.items() if f"{arch}.{name}" in fields}
    if "vocab_size" not in kw:  # older files: the embedding's rows
        kw["vocab_size"] = int(tensors["token_embd.weight"].shape[1])
    for name, key in TOKEN_IDS.items():
        if f"tokenizer.ggml.{name}_token_id" in fields:
            kw[key] = fields[f"tokenizer.ggml.{name}_token_id"]
    kw["rms_norm_eps"] = float(kw.get("rms_norm_eps", 1e-6))
    kw["rope_theta"] = float(kw.get("rope_theta", 10000.0))
    if arch == "phi3":  # what transformers' reader drops: the rotary width (Phi-4-mini rotates 3/4 of each head).
        # The sliding window field is not read: llama.cpp attends to the whole context of a phi3 file (measured)
        head_dim = kw.get("head_dim") or kw["hidden_size"] // kw["num_attention_heads"]
        kw["partial_rotary_factor"] = fields.get("phi3.rope.dimension_count", head_dim) / head_dim
        kw["original_max_position_embeddings"] = fields.get("phi3.rope.scaling.original_context_length",
                                                            kw.get("max_position_embeddings"))  # fmt: skip
        if all(name in tensors for name in LONG_ROPE):  # LongRoPE: the factor tables and its attention factor
            long, short = (np.asarray(tensors[name].data, np.float32).tolist() for name in LONG_ROPE)
            kw["rope_parameters"] = {
                "rope_type": "longrope", "rope_theta": kw["rope_theta"], "long_factor": long, "short_factor": short,
                "partial_rotary_factor": kw["partial_rotary_factor"],
                "original_max_position_embeddings": kw["original_max_position_embeddings"],
                **({"attention_factor": float(fields["phi3.rope.scaling.attn_factor"])}
                   if "phi3.rope.scaling.attn_factor" in fields else {}),
            }  # fmt: skip
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # Phi3Config's defaults are Phi-3's own ids
            kw.setdefault(key, None)
    return AutoConfig.for_model(arch, tie_word_embeddings="output.weight" not in tensors, **kw)


def values(tensor: Any) -> torch.Tensor:  # float32, transformers' shape
    """Tensor ``tensor`` (a :class:`~.gguf_read.Tensor`) as float32 in transformers' shape, whatever its type."""
    import gguf

    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the innermost dimension first
    return torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)).reshape(shape)


def _flat_groups(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, zeros: torch.Tensor, g: int) -> None:
    """In place: the groups whose zero point ``-m / d`` fp16 cannot hold (``d`` 0, or ``|m / d|`` past fp16's range)
    as constant groups, codes 0, zero point -1, scale their value ``m + d * mean(code)`` (exact when ``d`` is 0)."""
    flat = (d == 0) | ~(zeros.abs() <= torch.finfo(SCALE_DTYPE).max)  # [out, groups]
    if not bool(flat.any()):
        return
    mean = codes.float().reshape(codes.shape[0], -1, g).mean(-1)  # [out, groups]
    d.copy_(torch.where(flat, m + d * mean, d))
    zeros.copy_(torch.where(flat, -1.0, zeros))
    codes.masked_fill_(flat.repeat_interleave(g, dim=1), 0)


def _whole(zeros: torch.Tensor) -> torch.Tensor:  # [out, groups]
    """``zeros`` with each one within fp16's rounding of ``m`` (``2^-11`` relative) of a whole number made that
    number: the zero points llmspeed's asymmetric int4 holds, written as ``m = -zero * d`` in fp16, come back exact."""
    near = torch.round(zeros)
    return torch.where((zeros - near).abs() <= zeros.abs() * 2.0**-11 + 1e-6, near, zeros)


def quantized(tensor: Any, rows: torch.Tensor, bias: torch.Tensor | None) -> nn.Module | None:
    """The packed module of ``tensor`` (rows ``rows`` in that order), or ``None`` for a type llmspeed has no layout for."""
    kind = tensor.tensor_type.name
    k = int(tensor.shape[0])
    if kind == "Q4_0":
        codes, d = gguf_blocks.read_q4_0(tensor.data)
        g = gguf_blocks.shared_group([d], k)
        d = d[rows, :: g // gguf_blocks.QK]  # [out, groups]
        cfg = QuantConfig("int4", g, symmetric=True)
        return Int4Linear.from_codes(codes[rows], d, torch.full_like(d, SYMMETRIC_ZERO), config=cfg, bias=bias)
    if kind in _WITH_OFFSETS:
        codes, d, m = _WITH_OFFSETS[kind](tensor.data)
        g = gguf_blocks.shared_group([d, m], k)
        codes, d, m = codes[rows], d[rows, :: g // gguf_blocks.QK], m[rows, :: g // gguf_blocks.QK]
        d = d.to(SCALE_DTYPE).float()  # the scale the module holds (Q4_K's d * sc is an fp32 product)
        if not bool(torch.isfinite(d).all()):
            return None
        zeros = _whole(-m / d)  # [out, groups]; w = d q + m = (q - zero) d
        _flat_groups(codes, d, m, zeros, g)
        return Int4Linear.from_codes(codes, d, zeros, config=QuantConfig("int4", g), bias=bias)
    if kind == "Q8_0":
        codes, d = gguf_blocks.read_q8_0(tensor.data)
        if gguf_blocks.shared_group([d], k, sizes=(k,)) == k:  # one scale per row: what llmspeed writes for int8
            return Int8Linear.from_codes(codes[rows], d[rows, 0], config=QuantConfig("int8"), bias=bias)
        g = gguf_blocks.shared_group([d], k)  # llama.cpp's own: a scale per 32 channels (64, 128 where they repeat)
        return Int8Linear.from_codes(codes[rows], d[rows, :: g // gguf_blocks.QK], config=QuantConfig("int8", g), bias=bias)
    if kind == "Q6_K":
        codes, scale = gguf_blocks.read_q6_k(tensor.data)  # [out, k] in [-32, 31], [out, k / 16]
        scale = scale.to(SCALE_DTYPE).float()  # the scale the module holds (d * sc is an fp32 product)
        if not bool(torch.isfinite(scale).all()):
            return None
        negative = (scale < 0).repeat_interleave(gguf_blocks.Q6_K_GROUP, dim=1)  # [out, k]: a scale of either sign
        codes = torch.where(negative, -codes.to(torch.int16), codes.to(torch.int16)).to(torch.int8)  # -(-32) fits int8
        config = QuantConfig("int8", gguf_blocks.Q6_K_GROUP)
        return Int8Linear.from_codes(codes[rows], scale.abs()[rows], config=config, bias=bias)
    return None


def _divide_frequencies(model: Model, factors: torch.Tensor, path: Path) -> None:
    """Divide the rotary frequencies by a file's ``rope_freqs`` ``factors`` [head_dim / 2], as llama.cpp does.

    Llama 3.1+'s rope scaling reaches a GGUF file only as this table (transformers' reader drops it and would give
    every position unscaled angles): dividing ``inv_freq`` by it is the rotary embedding llama.cpp computes.
    """
    rotary: Any = getattr(getattr(model.module, "model", None), "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if not isinstance(inv_freq, torch.Tensor) or tuple(factors.shape) != tuple(inv_freq.shape):
        raise ValueError(f"{path}: tensor {ROPE_FREQS!r} is {list(factors.shape)}; the model's rotary embedding has "
                         f"{None if inv_freq is None else list(inv_freq.shape)} frequencies")  # fmt: skip
    rotary.inv_freq = inv_freq / factors.to(inv_freq.dtype)  # [head_dim / 2]
    if isinstance(getattr(rotary, "original_inv_freq", None), torch.Tensor):
        rotary.original_inv_freq = rotary.inv_freq.clone()


def load(path: Path, device: str | torch.device = "cpu") -> Model:
    """Read the GGUF file ``path`` (see the module docstring)."""
    gguf_file.require_gguf()
    try:
        fields, tensors = gguf_read.read(path)
    except ValueError as err:
        raise ValueError(f"{path} is not a readable GGUF file ({err})") from err
    arch = fields.get("general.architecture")
    if arch not in READS:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not read by llmspeed; it reads {list(READS)}")
    scaling = fields.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):  # transformers' reader keeps none of these: the angles would be wrong
        raise ValueError(f"{path}: rope scaling {scaling!r} ({arch}.rope.scaling.type) is not read by llmspeed; it reads "
                         f"files without rope scaling, and Llama 3.1+'s rope_freqs table")  # fmt: skip
    long_rope = [name for name in LONG_ROPE if name in tensors]
    if long_rope and (arch != "phi3" or len(long_rope) != len(LONG_ROPE)):
        raise ValueError(f"{path}: tensors {long_rope} hold LongRoPE's rope scaling, which llmspeed reads only from phi3 "
                         f"files holding both of {list(LONG_ROPE)} (this is a {arch} file)")  # fmt: skip
    tied = "output.weight" not in tensors
    tokenizer = None
    if "tokenizer.ggml.tokens" in fields:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = config_of(fields, arch, tensors)
    model = skeleton.from_config(config, torch.float32, tokenizer, path)
    root: Any = model.module
    head = next(n for n, m in root.named_modules() if m is root.get_output_embeddings())
    name_of = gguf_file.namer(config, arch)
    used: set[str] = set(long_rope)  # read into the config
    dequantized: dict[str, str] = {}  # GGUF tensor -> its type, for the tensors read as floats

    def take(name: str) -> Any:
        if name not in tensors:
            raise ValueError(f"{path}: tensor {name!r} is missing (a {arch} file needs it)")
        used.add(name)
        return tensors[name]

    def gguf_name(module: str) -> tuple[str, int | None]:
        found = name_of(module)
        if found is None:
            raise ValueError(f"{path}: no GGUF tensor name for {module!r} ({arch})")
        return found

    floats: dict[str, torch.Tensor] = {}
    for name, lin in model.linear_layers():
        target, heads = ("token_embd", None) if name == head and tied else gguf_name(name)
        weight = take(f"{target}.weight")
        shape = (int(weight.shape[1]), int(weight.shape[0]))
        assert isinstance(lin, nn.Linear)  # the skeleton's own, on meta
        out, k = lin.out_features, lin.in_features
        if shape != (out, k):
            raise ValueError(f"{path}: tensor {target + '.weight'!r} is {list(shape)}; the config needs [{out}, {k}]")
        rows = torch.argsort(gguf_file.rotary_rows(out, heads)) if heads else torch.arange(out)
        bias = values(take(f"{target}.bias"))[rows] if f"{target}.bias" in tensors else None
        module = quantized(weight, rows, bias)
        if module is not None:
            model.replace_linear(name, module)
            if name == head and tied:
                share_tied_embedding(model, head)
            continue
        if weight.tensor_type.name not in FLOAT_TYPES:
            dequantized[weight.name] = weight.tensor_type.name
        if name == head and tied:  # the embedding below is read as floats, and the head tied to it
            continue
        floats[f"{name}.weight"] = values(weight)[rows]
        if bias is not None:
            floats[f"{name}.bias"] = bias
    linear = tuple(f"{n}." for n in model.linear_names())
    for key in skeleton.expected(model):
        if key in floats or key.startswith(linear):  # read above, or a packed layer's tensors already in place
            continue
        owner, _, suffix = key.rpartition(".")
        stored = take(f"{gguf_name(owner)[0]}.{suffix}")
        if stored.tensor_type.name not in FLOAT_TYPES:  # a quantized embedding: a lookup of floats
            dequantized[stored.name] = stored.tensor_type.name
        floats[key] = values(stored)
    if ROPE_FREQS in tensors:
        _divide_frequencies(model, values(take(ROPE_FREQS)), path)
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise ValueError(f"{path}: tensors {unexpected[:3]} ({len(unexpected)} in all) belong to no layer of the "
                         f"{arch} model its config describes")  # fmt: skip
    if dequantized:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(Counter(dequantized.values()).items()))
        warnings.warn(f"{path}: {kinds} tensor(s) load as float32 (llmspeed has no kernels for those GGUF types); "
                      f"Q4_0, Q4_1, Q4_K, Q6_K and Q8_0 load packed; llmspeed.quantize(model, 'int8', include=[...]) "
                      f"quantizes the float ones", stacklevel=3)  # fmt: skip
    return skeleton.finish_foreign(model, floats, torch.float32, device, path)
