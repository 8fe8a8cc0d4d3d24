"""What the fused decode step can run (:func:`unsupported`), and the snapshot of a model's tensors it runs
(:class:`Snapshot`): read once, held by the extension between steps, and checked before each step."""

from __future__ import annotations

import operator
import weakref
from functools import lru_cache
from typing import Any, cast

import torch
from torch import nn

from .. import huge_pages
from . import fused_lora
from .layer_matrices import layer_matrices

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
_ASSIGNED = [0]  # child modules, parameters and buffers assigned anywhere in this process since the hooks below


def _count_assignment(parent: nn.Module, name: str, child: object) -> None:
    _ASSIGNED[0] += 1


@lru_cache(maxsize=1)
def _watch_assignments() -> None:
    """Count every child module, parameter and buffer assignment in the process (``setattr``, ``add_module``,
    ``ModuleList[i] =``, ``module.weight = nn.Parameter(...)``, ``load_state_dict(assign=True)``): global torch
    hooks, installed once, that :meth:`Snapshot.valid` reads."""
    hooks = nn.modules.module
    for register in (hooks.register_module_module_registration_hook, hooks.register_module_parameter_registration_hook,
                     hooks.register_module_buffer_registration_hook):  # fmt: skip
        register(_count_assignment)


QUANT_FORMATS = ("int8", "int4", "nf4")
TILE = 16  # 4-bit codes the C++ tile decodes at once (the quantization kernel's q4_tile)


def _fusable(module: Any, rotated_ok: bool = False) -> bool:
    """Whether the C++ step reads this linear: an fp32/bf16 ``nn.Linear`` or a quantized linear (the protocol's
    ``QuantizedLinear``: int8, int4 or NF4 packed buffers described by its ``layout``).

    4-bit groups must split into whole 16-code tiles, group-wise int8 groups must split its rows evenly (in
    groups of a multiple of 16 codes, as GGUF's ``Q8_0``), and act-order modules (whose input is gathered through
    ``perm`` first) stay on the generic path; ``hadamard`` ones (input rotated within groups) only where
    ``rotated_ok`` (the projections of a decoder layer: the step rotates their input buffer in place; not the head).
    """
    if type(module) is nn.Linear:
        return module.weight.dtype in _WEIGHT_DTYPES
    layout = getattr(module, "layout", None)
    if getattr(module, "quant_format", None) not in QUANT_FORMATS or layout is None:
        return False
    if not module.qweight.is_contiguous() or module.config.act_order or (module.config.hadamard and not rotated_ok):
        return False
    if not layout.four_bit:
        whole_groups = not layout.grouped_int8 or (layout.in_features % layout.group == 0 and module.scales.is_contiguous())
        return module.qweight.dtype == torch.int8 and whole_groups
    return module.qweight.dtype == torch.uint8 and layout.tiles_of(TILE)


def _flags(module: Any) -> int:
    """What the step does to a linear's input, as decode_cpu.cpp reads it: 1 int8 codes
    (``QuantConfig.activations``), 2 rotated within groups (``QuantConfig.hadamard``)."""
    config = getattr(module, "config", None)
    return (getattr(config, "activations", "float") == "int8") + 2 * bool(getattr(config, "hadamard", False))


def _parts(module: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(weight, scale, zero)`` the C++ step reads for a linear that :func:`_fusable` accepts.

    fp32/bf16 ``nn.Linear``: ``(weight, None, None)``; llmspeed's ``Int8Linear``: ``(qweight, scales,
    None)`` (fp32 ``[out]``, or fp16 ``[out, groups]`` group-wise); ``Int4Linear``: ``(qweight, scales, zeros)``; ``NF4Linear``: ``(qweight, group scales, None)``
    (double-quantized scales are expanded once, per snapshot).
    """
    if type(module) is nn.Linear:
        return module.weight, None, None
    fmt, q = module.quant_format, module.qweight
    if fmt == "int8":
        return q, module.scales, None
    if fmt == "int4":
        return q, module.scales.contiguous(), module.zeros.contiguous()
    if not module.config.double_quant:  # NF4: its own fp16 scales, no copy
        return q, module.scales, None
    return q, module.group_scales().half().contiguous(), None  # fp16 values already: exact


def embedding_parts(module: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """``(table, scale, zero, group)`` from which the C++ greedy steps read the input embedding's rows, or ``None``.

    An ``nn.Embedding`` (fp32 or bf16, without ``max_norm``): its weight, empty scale and zero, group 0. llmspeed's
    ``QuantizedEmbedding`` of an fp32 model (the rows of a quantized tied head): the head's :func:`_parts`, with
    its group size for 4-bit formats (0 for int8). Other embeddings run in Python (:meth:`FusedDecode.run`).
    """
    none = torch.empty(0)
    if type(module) is nn.Embedding:
        ok = module.max_norm is None and module.weight.dtype in _WEIGHT_DTYPES and module.weight.is_contiguous()
        return (module.weight.detach(), none, none, 0) if ok else None
    head = getattr(module, "head", None)
    if embedding_dtype(module) != torch.float32 or type(head) is nn.Linear or head is None or not _fusable(head):
        return None
    q, scale, zero = _parts(head)
    if scale is None or not scale.is_contiguous() or head.layout.grouped_int8:  # the C++ rows: int8 per row or 4-bit
        return None
    return q, scale, _opt(zero), head.layout.group if head.layout.four_bit else 0


def embedding_dtype(module: Any) -> torch.dtype | None:
    """The dtype of the vectors an input embedding returns (``nn.Embedding``'s weight, ``QuantizedEmbedding``'s
    ``dtype_reference``), or ``None`` for another module."""
    if type(module) is nn.Embedding:
        return module.weight.dtype
    reference = getattr(module, "dtype_reference", None)
    return reference.dtype if isinstance(reference, torch.Tensor) else None


def _check_linear(module: nn.Module, name: str, bias_ok: bool, lora_ok: bool = True, rotated_ok: bool = False) -> str | None:
    if lora_ok and fused_lora.is_lora(module):
        why = fused_lora.unfusable_reason(module)
        if why is not None:
            return f"{name} has LoRA adapters the fused step cannot apply: {why}"
        module = cast(nn.Module, module.base_layer)  # over a rotated base, the adapters' A is stacked rotated (fused_lora.stacks)
    if not _fusable(module, rotated_ok):
        cfg = getattr(module, "config", None)
        moved = [k for k in ("hadamard", "act_order") if getattr(cfg, k, False)]
        if moved:
            return f"{name} transforms its input before the matmul ({moved[0]}=True), which the fused step does not"
        layout = getattr(module, "layout", None)
        if layout is not None and layout.grouped_int8:
            return (f"{name} is group-wise int8 whose groups of {layout.group} do not split its {layout.in_features} "
                    f"inputs evenly, which the fused step does not read")  # fmt: skip
        what = getattr(module, "quant_format", None) or getattr(getattr(module, "weight", None), "dtype", "")
        return f"{name} is {type(module).__name__} ({what}): not an fp32/bf16 nn.Linear or an llmspeed int8/int4/nf4 linear"
    if module.bias is not None and not bias_ok:
        return f"{name} has a bias"
    return None


def _eps(norm: nn.Module) -> float | None:
    value = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return None if value is None else float(value)


def _check_norms(body: Any) -> str | None:
    """Every RMSNorm must share the final norm's epsilon (the C++ step takes one)."""
    eps = _eps(body.norm)
    for i, layer in enumerate(body.layers):
        norms = {"input_layernorm": layer.input_layernorm, "post_attention_layernorm": layer.post_attention_layernorm}
        for name in ("q_norm", "k_norm"):
            if hasattr(layer.self_attn, name):
                norms[f"self_attn.{name}"] = getattr(layer.self_attn, name)
        for name, norm in norms.items():
            if getattr(norm, "weight", None) is None or _eps(norm) != eps:
                return f"layers.{i}.{name} is not an RMSNorm with the final norm's epsilon {eps}"
    return None


def unsupported(model) -> str | None:
    """Why ``model`` cannot use the fused decode step as it is now, or ``None`` when it can."""
    hf = getattr(model, "hf", None)
    if hf is None:
        return "the model is not an llmspeed.Model wrapping a transformers model"
    cfg = hf.config.get_text_config()
    if cfg.model_type not in ARCHITECTURES:
        return f"model_type {cfg.model_type!r} is not one of {ARCHITECTURES}"
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(cfg, 'hidden_act', None)!r} is not 'silu'"
    if model.spec.device.type != "cpu":
        return f"the model is on {model.spec.device}, not the CPU"
    body = getattr(hf, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(body, "rotary_emb"):
        return "no model.layers / model.rotary_emb"
    reason = _check_linear(hf.lm_head, "lm_head", bias_ok=False, lora_ok=False) or _check_norms(body)
    if reason:
        return reason
    inv_freq = getattr(body.rotary_emb, "inv_freq", None)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if isinstance(inv_freq, torch.Tensor) and 2 * inv_freq.numel() > head_dim:  # fewer: a partial rotary embedding
        return f"the rotary embedding turns {2 * inv_freq.numel()} dimensions of heads {head_dim} wide"
    for i, layer in enumerate(body.layers):
        matrices = layer_matrices(layer, cfg)
        for m in matrices:
            where = f"layers.{i}.{'self_attn' if m.owner is layer.self_attn else 'mlp'}.{m.attr}"
            if m.rows is not None and fused_lora.is_lora(m.module) and not fused_lora.block_aligned(m.rows):
                return (f"{where} carries LoRA adapters and its {m.name} rows {m.rows.start}:{m.rows.stop} are not "
                        f"whole blocks of {fused_lora.LORA_BLOCK} outputs, which the fused step reads adapters in")
            reason = _check_linear(m.module, where, bias_ok=m.name in ("q_proj", "k_proj", "v_proj"), rotated_ok=True)
            if reason:
                return reason
        reason = _check_shared_rotation(i, matrices[:3]) or _check_shared_rotation(i, matrices[4:6])
        if reason:
            return reason
    return None


def _rotation(module: nn.Module) -> int | None:
    """The block size a linear rotates its input in (``QuantConfig.hadamard``: its group), else ``None``."""
    config = getattr(_base(module), "config", None)
    return config.group_size if config is not None and getattr(config, "hadamard", False) else None


def _check_shared_rotation(i: int, matrices: list[Any]) -> str | None:
    """The matrices that read one input buffer must rotate it alike: the step rotates the buffer once, in place."""
    names = [m.name for m in matrices]
    rotations = [_rotation(m.module) for m in matrices]
    if len(set(rotations)) > 1:
        said = ", ".join(f"{n} {'by ' + str(r) if r else 'unrotated'}" for n, r in zip(names, rotations))
        return f"layer {i}: {'/'.join(names)} read one input but rotate it differently ({said}), which the fused step does not"
    return None


def _base(module: nn.Module) -> nn.Module:
    """The linear a LoRA wrapper wraps, else the module itself."""
    return cast(nn.Module, module.base_layer) if fused_lora.is_lora(module) else module


def _f32(t: torch.Tensor | None) -> torch.Tensor:
    return torch.empty(0) if t is None else t.detach().float().contiguous()


def _opt(t: torch.Tensor | None) -> torch.Tensor:
    return torch.empty(0) if t is None else t


class Snapshot:
    """The tensor list handed to C++, with what must stay the same for it to be valid.

    Checking a model from scratch (:func:`unsupported`) and gathering its tensors costs several times
    more than re-validating a snapshot: every module is still the same object at the same place, every
    tensor read still has the same storage and dtype (``nn.Module.to`` and :func:`llmspeed.cast` change a
    parameter's data in place) and every tensor read as an fp32 copy (a bf16 model's norms and biases) the version
    it was copied at, no LoRA wrapper anywhere has changed its adapters, scales or flags (one process-wide
    count, :func:`.fused_lora.state_changes`), and every tensor of the adapters a step reads has the version it was
    stacked at (checked in the extension with the pointers; an adapter no row reads is checked when one does).

    The modules are checked in place (each parent's ``_modules[name]`` is still the child read, the
    decoder layers' list included, and each module read still holds the same parameter and buffer objects:
    a replaced parameter's old tensor keeps its pointer) only when a module, parameter or buffer was assigned
    somewhere in the process since the last check (global registration hooks count them) or one of the
    parents gained or lost a child (``del``, ``ModuleList.insert``): walking some 400 children that each
    step's weight reads had pushed out of the cache was a visible part of a small model's step. Writing
    ``_modules``, ``_parameters`` or ``_buffers`` directly, or deleting a parameter, goes unseen.

    The tensor lists are handed to the extension once (``hold``) and each step passes the handle: converting
    some 900 Python tensors per call cost about 0.3 ms of a 13 ms step, and checking every source's pointer
    in Python about 1 ms once the step's weight reads had pushed them out of the cache; the extension checks
    the pointers and dtypes itself (``held_current``). The hold is released when the snapshot is dropped.
    """

    def __init__(self, hf: Any, ext: Any, lora_dtype: torch.dtype = torch.float16):
        body = hf.model
        self.lora_dtype = lora_dtype
        self.wrappers: list[Any] = []  # LoRA wrappers, in the C++ layout's order
        self.lora: list[torch.Tensor] = []  # (A, B) stacks per matrix per layer, or [] without LoRA
        _watch_assignments()
        self.assigned = _ASSIGNED[0]  # read before the modules, so that an assignment during the read counts
        checks: list[tuple[nn.Module, str, object]] = [(hf, "model", body), (hf, "lm_head", hf.lm_head)]
        checks += [(body, "norm", body.norm), (body, "layers", body.layers)]
        checks += [(body.layers, name, layer) for name, layer in body.layers._modules.items()]
        self.sources: list[torch.Tensor] = [body.norm.weight]
        self.copied: list[torch.Tensor] = []  # sources the step reads as fp32 copies (:meth:`_f32`)
        self.mirrors: list[torch.Tensor] = []  # (16-bit source, its fp32 copy) pairs, flat: compared value by value
        self.weights: list[torch.Tensor] = []
        holders: list[nn.Module] = [body.norm, hf.lm_head]  # the modules whose parameters and buffers the step reads
        flags: list[int] = []  # per matrix (layer by layer, in layer_matrices' order), then the head: _flags
        config = hf.config.get_text_config()
        for layer in body.layers:
            attn = layer.self_attn
            for name in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
                checks.append((layer, name, getattr(layer, name)))
            parts, read = {}, {}  # a fused linear is read once, its matrices are row ranges of it
            matrices = layer_matrices(layer, config)
            for m in matrices:
                module = m.module
                if m.attr not in read:
                    checks.append((m.owner, m.attr, module))
                    if fused_lora.is_lora(module):
                        checks.append((module, "base_layer", module.base_layer))
                        checks += [(d, n, w) for d in (module.lora_A, module.lora_B) for n, w in d._modules.items()]
                        holders += [*module.lora_A.values(), *module.lora_B.values()]
                    holders.append(_base(module))
                    read[m.attr] = self._read(_base(module))
                parts[m.name] = tuple(t if t is None or m.rows is None else t[m.rows] for t in read[m.attr])
                flags.append(_flags(_base(module)))
            ln1, ln2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
            biases: list[torch.Tensor | None] = [getattr(_base(m.module), "bias", None) for m in matrices[:3]]
            biases = [b if b is None or m.rows is None else b[m.rows] for b, m in zip(biases, matrices)]
            qk_norms = [getattr(getattr(attn, n, None), "weight", None) for n in ("q_norm", "k_norm")]
            holders += [layer.input_layernorm, layer.post_attention_layernorm]
            for name in ("q_norm", "k_norm"):
                if hasattr(attn, name):
                    checks.append((attn, name, getattr(attn, name)))
                    holders.append(getattr(attn, name))
            extra = [t for t in biases + qk_norms if t is not None]
            self.sources += [ln1, ln2] + extra
            # the layout decode_cpu.cpp expects (PER_LAYER tensors)
            self.weights += [self._f32(t) for t in [ln1, ln2] + biases + qk_norms]
            self.weights += [_opt(t) for m in matrices for t in parts[m.name]]
        self.lm_head = [_opt(t) for t in self._read(hf.lm_head)]
        flags.append(_flags(hf.lm_head))
        self.flags = torch.tensor(flags, dtype=torch.uint8) if any(flags) else torch.empty(0, dtype=torch.uint8)  # [layers * 7 + 1]
        self.norm = self._f32(body.norm.weight)
        self._stack_adapters(body, config)
        # read once: what the step needs from the model besides tensors (its structure is checked each step)
        self.num_heads = hf.config.get_text_config().num_attention_heads
        self.eps = _eps(body.norm)
        self.scaling = float(body.layers[0].self_attn.scaling)
        # nn.Module keeps its children, parameter and buffer dicts for life (assigning, deleting or replacing edits them)
        triples: list[tuple[dict[str, Any], str, object]] = [(o._modules, n, c) for o, n, c in checks]
        # parents whose sizes are checked every step (a del runs no hook); the tensors' dicts are not (cost)
        self._parents = list({id(d): d for d, _, _ in triples}.values())
        triples += [(d, n, t) for m in holders for d in (m._parameters, m._buffers) for n, t in d.items()]
        dicts, names, children = zip(*triples)
        self._dicts, self._names, self._children = list(dicts), list(names), list(children)
        self._sizes = list(map(len, self._parents))
        self.ext = ext
        # the copies' sources are versioned like an adapter slot of their own, after the adapters', checked every step
        self.copies_slot = len(self.slots)
        versioned = self.lora_weights + self.copied
        self.handle = ext.hold(self.weights, self.lm_head, self.lora, self.sources, versioned,
                               self.slot_ends + [len(versioned)], self.mirrors)  # fmt: skip
        weakref.finalize(self, ext.release, self.handle)

    def _stack_adapters(self, body: Any, config: Any) -> None:
        """The LoRA stacks of every projection, one slot per adapter name (sorted), when any projection has one."""
        listed = [m for layer in body.layers for m in layer_matrices(layer, config)]
        matrices = [m.module for m in listed]
        self.wrappers = list({id(m): m for m in matrices if fused_lora.is_lora(m)}.values())  # a fused one once
        self.slots = sorted({n for m in self.wrappers for n in m.lora_A})
        # set_adapter(name) leaves layers without ``name`` at None: one name must explain every layer
        named = {m.active for m in self.wrappers if m.active is not None}
        self.active = next(iter(named)) if len(named) == 1 else None
        self.one_active = len(named) <= 1 and all(
            m.active == (self.active if self.active in m.lora_A else None) for m in self.wrappers
        )
        if self.slots:
            stacked: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per wrapper: a fused projection's, once
            for m in listed:
                if not fused_lora.is_lora(m.module):
                    self.lora += [torch.empty(0)] * 2
                    continue
                if id(m.module) not in stacked:
                    stacked[id(m.module)] = fused_lora.stacks(m.module, self.slots, self.lora_dtype)
                a, b = stacked[id(m.module)]  # [S, R, in], [S, NB, R, 16]
                if m.rows is not None and b.numel():  # the row range's output blocks (unsupported() checked them whole)
                    b = b[:, m.rows.start // fused_lora.LORA_BLOCK : m.rows.stop // fused_lora.LORA_BLOCK].contiguous()
                self.lora += [a, b]
            self.lora = huge_pages.side_by_side(self.lora)  # in the step's reading order, in 2 MiB pages (docs/lora.md)
        self.lora_changes = fused_lora.state_changes()
        # each slot's tensors, slot by slot (versions checked in C++ for the slots a step reads)
        self.lora_weights: list[torch.Tensor] = []
        self.slot_ends: list[int] = []
        for name in self.slots:
            self.lora_weights += [t for m in self.wrappers for t in fused_lora.weights(m, name)]
            self.slot_ends.append(len(self.lora_weights))
        self.slot_index = {name: s for s, name in enumerate(self.slots)}

    def _f32(self, t: torch.Tensor | None) -> torch.Tensor:
        """``t`` as the fp32 tensor the step reads (:func:`_f32`); where that is a copy (a bf16 model's norms and
        biases), ``t`` joins :attr:`copied`, whose versions :meth:`valid` checks: an in-place change of ``t``
        (training, ``load_state_dict``) leaves its pointer as it was, and the copy would go stale. A contiguous bf16 or
        fp16 ``t`` also joins :attr:`mirrors`, compared with its copy value by value before each step: a write through
        ``t.data`` (``param.data.copy_(new)``) changes neither its pointer nor its version."""
        out = _f32(t)
        if t is not None and out.data_ptr() != t.data_ptr():
            if not t.is_inference():  # inference tensors: no versions
                self.copied.append(t)
            if t.dtype in (torch.bfloat16, torch.float16) and t.is_contiguous():
                self.mirrors += [t, out]
        return out

    def _read(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        parts = _parts(module)  # unsupported() ran first: the module is fusable
        self.sources += [t for t in parts if t is not None]
        # scales the step reads as copies (NF4's double-quantized ones expanded, non-contiguous int4 scales and
        # zeros): an in-place change of their sources keeps every pointer, so their versions join the checks
        held = {t.data_ptr() for t in parts if t is not None}
        owned = [getattr(module, n, None) for n in ("scales", "zeros", "scales_q", "scales_scale", "scales_offset")]
        self.copied += [t for t in owned if isinstance(t, torch.Tensor) and t.numel() and t.data_ptr() not in held
                        and not t.is_inference()]  # fmt: skip
        return parts

    def valid(self, names: list[str | None] | None = None) -> bool:
        """Whether the snapshot still describes the model, for a step whose rows run adapters ``names``
        (``None``: check every adapter's tensors)."""
        if _ASSIGNED[0] != self.assigned or list(map(len, self._parents)) != self._sizes:
            # every check is (dict, name, object): a parent's _modules[name] is still that child, a module's
            # _parameters[name] or _buffers[name] still that tensor (compared by identity: tensors' == is elementwise)
            if any(map(operator.is_not, map(dict.get, self._dicts, self._names), self._children)):
                return False
            self.assigned, self._sizes = _ASSIGNED[0], list(map(len, self._parents))
        # every source's data pointer and dtype, and the versions of the adapters read (trained in place: restack)
        if fused_lora.state_changes() != self.lora_changes:
            return False
        read = range(len(self.slots)) if names is None else {self.slot_index[n] for n in names if n is not None}
        return self.ext.held_current(self.handle, [*read, self.copies_slot])

    def adapter_slots(self, names: list[str | None]) -> torch.Tensor:  # [n] int64
        """Each row's stack slot (``-1``: none); ``names`` as resolved by :meth:`FusedDecode.run`."""
        if not self.slots:
            return torch.empty(0, dtype=torch.long)
        return fused_lora.slot_ids(names, self.slots)
